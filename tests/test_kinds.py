"""Task kinds end to end on tiny random BERT models built here: a single-label classifier, a
multi-label tagger, a regression scorer, a cross-encoder (text pairs), a token classifier
(without the pooler BERT's token models leave out) and a sentence-transformers embedding
model, merged into one artifact with experts that reconstruct each task exactly. Each kind
answers as the original model does through plain transformers (the token-classification
pipeline for entities, the pooling on the model's own hidden states for embeddings), over
HTTP with every kind in one batch."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from live_server import live_server
from tiny_kinds import BIO, PAIRS, SETTINGS, TEXTS, save_model
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertTokenizerFast,
    pipeline,
)

from freemerge.benchmarks.loadgen import call
from freemerge.merging.artifact import open_artifact
from freemerge.merging.checkpoint import CheckpointError
from freemerge.merging.config import parse_config
from freemerge.merging.kind_rules import AGGREGATIONS
from freemerge.merging.merge import run_merge
from freemerge.serving.engine import MergedEngine
from freemerge.serving.requests import Limits, RequestError, StageTimings
from freemerge.serving.runtime import MergedClassifier


def sequence_scores(folder: Path, rows: list) -> torch.Tensor:
    """Each input alone through plain ``AutoModelForSequenceClassification``: logits."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    with torch.no_grad():
        return torch.stack(
            [
                model(
                    **tokenizer(*([row] if isinstance(row, str) else row), return_tensors="pt")
                ).logits[0]
                for row in rows
            ]
        )


def reference_entities(folder: Path, text: str, aggregation: str) -> list[dict]:
    """transformers' token-classification pipeline on the original model, in our fields."""
    model = AutoModelForTokenClassification.from_pretrained(folder).eval()
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    tagger = pipeline(
        "token-classification", model=model, tokenizer=tokenizer, aggregation_strategy=aggregation
    )
    return [
        {
            "label": e.get("entity_group", e.get("entity")),
            "score": float(e["score"]),
            "start": e["start"],
            "end": e["end"],
            "text": text[e["start"] : e["end"]],
        }
        for e in tagger(text)
    ]


def reference_embeddings(folder: Path, texts: list[str]) -> torch.Tensor:
    """Mean pooling of the original model's hidden states, as sentence-transformers computes
    it: the text stripped, cut to 16 tokens, normalized."""
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text.strip(), truncation=True, max_length=16, return_tensors="pt")
            rows.append(model(**ids).last_hidden_state[0].mean(0))
    return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def assert_entities(got: list[dict], want: list[dict]) -> None:
    assert [(e["label"], e["start"], e["end"], e["text"]) for e in got] == [
        (e["label"], e["start"], e["end"], e["text"]) for e in want
    ]
    assert [e["score"] for e in got] == pytest.approx([e["score"] for e in want], abs=1e-4)


def test_the_manifest_records_each_kind(kinds):
    tasks = open_artifact(kinds["artifact"]).tasks
    assert {t: e["task_kind"] for t, e in tasks.items()} == {
        "topic": "single_label_classification",
        "tags": "multi_label_classification",
        "rating": "regression",
        "rerank": "regression",
        "ner": "token_classification",
        "emb": "embedding",
    }
    assert tasks["rerank"]["scoring"] == "sigmoid" and tasks["rating"]["scoring"] == "none"
    assert (
        tasks["rerank"]["text_pairs"] == "required" and tasks["topic"]["text_pairs"] == "accepted"
    )
    assert tasks["emb"]["embedding"] == {
        "pooling": ["mean_tokens"],
        "normalize": True,
        "max_seq_length": 16,
        "do_lower_case": False,
        "dimensions": 32,
    }
    assert tasks["emb"]["head"] is None and tasks["ner"]["labels"] == BIO


@pytest.mark.parametrize("aggregation", ["none", "simple", "first", "average", "max"])
def test_entities_are_the_pipelines(kinds, aggregation):
    model = MergedClassifier(open_artifact(kinds["artifact"]))
    # the embedding's expert keeps biases and LayerNorms whole (by_kind), and runs per row too
    assert model.row_adapters is not None
    layouts = model.store.layouts
    assert layouts["emb"].other and not layouts["ner"].other
    texts = TEXTS[:3] + ["the water came back, from the way we came!"]
    options = [{"aggregation": aggregation}] * len(texts)
    answers = model.classify_rows(texts, ["ner"] * len(texts), options=options)
    found = 0
    for text, answer in zip(texts, answers, strict=True):
        want = reference_entities(kinds["folders"]["ner"], text, aggregation)
        assert_entities(answer.entities, want)
        found += len(want)
    assert found > 0  # the test has entities to compare


def test_a_token_model_without_the_pooler_is_merged(kinds):
    from safetensors import safe_open

    with safe_open(str(kinds["folders"]["ner"] / "model.safetensors"), "pt") as f:
        assert not any("pooler" in name for name in f.keys())
    backbone = kinds["artifact"] / "backbone" / "model.safetensors"
    with safe_open(str(backbone), "pt") as f:
        assert "pooler.dense.weight" in f.keys()  # the classifiers' pooler is kept


def http_bodies() -> dict[str, tuple[str, dict]]:
    return {
        "topic": ("/v1/classify", {"task": "topic", "inputs": TEXTS}),
        "pairs": ("/v1/classify", {"task": "topic", "inputs": PAIRS}),
        "tags": ("/v1/classify", {"task": "tags", "inputs": TEXTS, "threshold": 0.4}),
        "rating": ("/v1/classify", {"task": "rating", "inputs": TEXTS}),
        "rerank": ("/v1/classify", {"task": "rerank", "inputs": PAIRS}),
        "ner": ("/v1/classify", {"task": "ner", "inputs": TEXTS, "aggregation": "first"}),
        "emb": ("/v1/embed", {"task": "emb", "inputs": TEXTS}),
        "raw": ("/v1/embed", {"task": "emb", "inputs": TEXTS, "normalize": False}),
    }


def check_http_answers(replies: dict[str, dict], folders: dict[str, Path]) -> None:
    """Every kind's answer equals the original model's."""
    topic = torch.softmax(sequence_scores(folders["topic"], TEXTS), -1)
    for row, result in zip(topic, replies["topic"]["results"], strict=True):
        assert set(result) == {"task", "routed", "router_confidence", "truncated"} | {
            "label",
            "score",
            "scores",
        }
        assert list(result["scores"].values()) == pytest.approx(row.tolist(), abs=1e-4)
        assert result["label"] == ["sport", "news", "art"][int(row.argmax())]
    pairs = torch.softmax(sequence_scores(folders["topic"], PAIRS), -1)
    got = torch.tensor([list(r["scores"].values()) for r in replies["pairs"]["results"]])
    assert torch.allclose(got, pairs, atol=1e-4)
    alone = torch.softmax(sequence_scores(folders["topic"], [a for a, _ in PAIRS]), -1)
    assert (got - alone).abs().max() > 2e-4  # the second text counts (tiny models vary little)
    tags = torch.sigmoid(sequence_scores(folders["tags"], TEXTS))
    for row, result in zip(tags, replies["tags"]["results"], strict=True):
        assert list(result["scores"].values()) == pytest.approx(row.tolist(), abs=1e-4)
        names = ["red", "green", "blue", "grey"]
        assert result["labels"] == [n for n, s in zip(names, row.tolist(), strict=True) if s >= 0.4]
        assert "label" not in result
    rating = sequence_scores(folders["rating"], TEXTS)[:, 0]
    assert [r["score"] for r in replies["rating"]["results"]] == pytest.approx(
        rating.tolist(), abs=1e-4
    )
    rerank = torch.sigmoid(sequence_scores(folders["rerank"], PAIRS)[:, 0])
    assert [r["score"] for r in replies["rerank"]["results"]] == pytest.approx(
        rerank.tolist(), abs=1e-4
    )
    for text, result in zip(TEXTS, replies["ner"]["results"], strict=True):
        assert_entities(result["entities"], reference_entities(folders["ner"], text, "first"))
    want = reference_embeddings(folders["emb"], TEXTS)
    assert replies["emb"]["dimensions"] == 32
    assert torch.allclose(torch.tensor(replies["emb"]["embeddings"]), want, atol=1e-4)
    raw = torch.tensor(replies["raw"]["embeddings"])
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=1), want, atol=1e-4)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-3)


def test_every_kind_over_http_in_one_batch(kinds):
    options = {"artifact": str(kinds["artifact"]), "device": "cpu"}
    options |= {"batch_wait_timeout_s": 0.3, "max_batch_size": 16}
    bodies = http_bodies()
    with live_server(options) as (url, _):
        with ThreadPoolExecutor(len(bodies)) as pool:
            replies = dict(
                zip(
                    bodies,
                    pool.map(lambda b: call(f"{url}{b[0]}", b[1]), bodies.values()),
                    strict=True,
                )
            )
        for name, (status, body) in replies.items():
            assert status == 200, (name, body)
        check_http_answers({k: body for k, (_, body) in replies.items()}, kinds["folders"])
        status, listed = call(f"{url}/v1/tasks", None)
        assert status == 200
        assert {t["task"]: t["kind"] for t in listed["tasks"]}["ner"] == "token_classification"
        for route, body, message in wrong_kind_requests():
            status, answer = call(f"{url}{route}", body)
            assert status == 400 and message in answer["error"], (body, answer)


def wrong_kind_requests() -> list[tuple[str, dict, str]]:
    return [
        (
            "/v1/classify",
            {"task": "emb", "inputs": ["a"]},
            "of kind embedding: send it to /v1/embed",
        ),
        ("/v1/embed", {"task": "topic", "inputs": ["a"]}, "send it to /v1/classify"),
        ("/v1/classify", {"task": "rerank", "inputs": ["a"]}, "scores text pairs"),
        ("/v1/classify", {"task": "ner", "inputs": [["a", "b"]]}, "takes single texts"),
        ("/v1/classify", {"task": "ner", "inputs": ["a"], "aggregation": "mean"}, "aggregation"),
        ("/v1/classify", {"inputs": [["a", "b"]]}, "text pairs need a `task`"),
        ("/v1/classify", {"inputs": ["a"], "candidates": ["emb"]}, "not routable on /v1/classify"),
        ("/v1/classify", {"task": "topic", "inputs": [["a", "b", "c"]]}, "inputs"),
    ]


def test_the_router_chooses_among_the_routes_tasks(kinds):
    engine = MergedEngine(kinds["artifact"], "cpu", Limits())
    request = engine.check(None, TEXTS)
    assert sorted(request.candidates) == ["ner", "rating", "tags", "topic"]  # not rerank, emb
    answers = engine.classify_requests([request], StageTimings())[0]
    assert all(a.routed and a.task in request.candidates for a in answers)
    with pytest.raises(RequestError, match="threshold must be within"):
        engine.check("tags", ["a"], options={"threshold": 2.0})


def test_a_model_of_no_served_kind_is_refused(kinds, tmp_path):
    from transformers import AutoModelForMaskedLM

    config = AutoConfig.for_model("bert", **SETTINGS)
    folder = save_model(AutoModelForMaskedLM.from_config(config), tmp_path / "mlm")
    raw = {
        "base_model": str(kinds["folders"]["base"]),
        "models": [{"name": "mlm", "path": str(folder)}],
        "method": "task_arithmetic",
    }
    with pytest.raises(CheckpointError, match="BertForMaskedLM is not a task this server runs"):
        run_merge(parse_config(raw), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_aggregations_a_front_accepts_are_transformers_own():
    """A front checks `aggregation` against kind_rules' copy; the grouping is transformers'."""
    from transformers.pipelines.token_classification import AggregationStrategy

    assert AGGREGATIONS == tuple(strategy.value for strategy in AggregationStrategy)
