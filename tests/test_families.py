"""Every supported encoder family, end to end on tiny random models built here: a base and
three fine-tune-like variants, merged with experts that reconstruct each task exactly, answer
as the original fine-tuned models do through plain transformers (in process, over HTTP in
mixed-task batches, exported, added and removed, and as the separate-models baseline)."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from live_server import live_server
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    BertTokenizerFast,
)

from freemerge.benchmarks.loadgen import call
from freemerge.merging.artifact import open_artifact
from freemerge.merging.checkpoint import CheckpointError
from freemerge.merging.config import parse_config
from freemerge.merging.export import export_peft, export_task
from freemerge.merging.families import FAMILIES, head_tensor_names
from freemerge.merging.merge import run_merge
from freemerge.merging.task_edit import add_task, remove_task
from freemerge.serving.engine import TaskModel
from freemerge.serving.local import deploy_app
from freemerge.serving.requests import StageTimings
from freemerge.serving.runtime import MergedClassifier

SIZE = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
SIZE |= {"num_hidden_layers": 2, "max_position_embeddings": 64, "pad_token_id": 0}
# What each family's tiny config needs beyond SIZE (the shape of its real checkpoints).
CONFIGS = {
    "bert": {},
    "roberta": {"type_vocab_size": 1},
    "xlm-roberta": {"type_vocab_size": 1},
    "mpnet": {},
    "electra": {"embedding_size": 16},
    "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64},
    "deberta-v2": {
        "relative_attention": True,
        "pos_att_type": ["p2c", "c2p"],
        "position_buckets": 8,
        "max_relative_positions": -1,
        "position_biased_input": False,
        "share_att_key": True,
        "norm_rel_ebd": "layer_norm",
        "type_vocab_size": 0,
    },
    "modernbert": {
        "global_attn_every_n_layers": 2,
        "local_attention": 8,
        "classifier_pooling": "mean",
        "cls_token_id": 2,
        "sep_token_id": 3,
        "bos_token_id": 2,
        "eos_token_id": 3,
    },
    "albert": {"embedding_size": 16},
}
TASKS = {"alpha": 2, "beta": 3, "gamma": 4}
WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how said "
    "an each she which do their time if will way about many then them write would like so these "
    "her long make thing see him two has look more day could go come did number sound no most "
    "people my over know water than call first who may down side been now find any new work part "
    "take get place made live where after back little only round man year came show every good "
    "me give our under name very through just form sentence great think say help low line differ"
).split()
TEXTS = [
    "the people came back from work",
    "a good day",
    "which way is the water",
    "we can show you how to write a new sentence every day if you like",
    "no",
    "time",
    " ".join(WORDS[:70]),  # longer than every tiny model's positions: truncated
    "they said the first year was great",
]


def test_every_family_has_a_test_config():
    assert set(CONFIGS) == set(FAMILIES)


def tiny_tokenizer(folder: Path) -> None:
    """A WordPiece tokenizer over :data:`WORDS`, saved into ``folder``."""
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(str(vocab), model_max_length=512).save_pretrained(folder)


def make_family(model_type: str, root: Path, everywhere: bool) -> dict[str, Path]:
    """A base and three variants saved under ``root``: each variant's linear layers moved off
    the base by about 5% (with ``everywhere``, every backbone tensor), as fine-tuning moves
    them; its head random. {name: folder}."""
    torch.manual_seed(sum(map(ord, model_type)))
    settings = {**SIZE, **CONFIGS[model_type], "vocab_size": 5 + len(WORDS)}
    config = AutoConfig.for_model(model_type, **settings)
    base = AutoModel.from_config(config)  # as pretrained checkpoints: a pooler where it has one
    folders = {"base": root / "base"}
    base.save_pretrained(folders["base"])
    tiny_tokenizer(folders["base"])
    for task, labels in TASKS.items():
        task_config = AutoConfig.for_model(
            model_type, **settings, id2label={i: f"{task}{i}" for i in range(labels)}
        )
        model = AutoModelForSequenceClassification.from_config(task_config)
        model.base_model.load_state_dict(base.state_dict(), strict=False)
        linear = {f"{n}.weight" for n, m in model.base_model.named_modules() if _linear(m)}
        with torch.no_grad():
            for name, tensor in model.base_model.named_parameters():
                if everywhere or name in linear:
                    tensor.add_(0.05 * tensor.abs().mean() * torch.randn_like(tensor))
        folders[task] = root / task
        model.save_pretrained(folders[task])
        tiny_tokenizer(folders[task])
    return folders


def _linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear)


def reference_logits(folder: Path, texts: list[str]) -> torch.Tensor:
    """Each text alone (no padding) through plain ``AutoModelForSequenceClassification``."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    # positions counted from the padding index + 1: pad_token_id 0 here; MPNet's fixed at 1
    limit = {"roberta": 63, "xlm-roberta": 63, "mpnet": 62}.get(model.config.model_type, 64)
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=limit, return_tensors="pt")
            rows.append(model(input_ids=ids["input_ids"]).logits[0])
    return torch.stack(rows)


EXACT_LOWRANK = {"kind": "lowrank", "rank": 64, "dtype": "float32"}  # full rank: exact
EXACT_SPARSE = {"kind": "sparse", "density": 1.0}  # every entry: exact
ROUTER = {"kind": "embeddings+layers+experts", "examples_per_task": 12, "epochs": 5}


def merge_family(folders: dict[str, Path], out: Path, experts: dict, router: bool) -> Path:
    raw = {
        "base_model": str(folders["base"]),
        "models": [{"name": t, "path": str(folders[t])} for t in TASKS],
        "method": "free",
        "experts": experts,
    }
    if router:
        data = {}
        for k, task in enumerate(TASKS):
            texts = out.parent / f"{task}.jsonl"
            words = WORDS[k * 20 : k * 20 + 20]
            lines = [{"text": " ".join(words[i : i + 6])} for i in range(12)]
            texts.write_text("".join(json.dumps(line) + "\n" for line in lines))
            data[task] = str(texts)
        raw["router"] = {**ROUTER, "data": data}
    run_merge(parse_config(raw), out, show_progress=False)
    return out


_BUILT: dict[str, dict] = {}


def built(model_type: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One family's models, its row-adapter artifact (linear layers moved, low-rank experts,
    a router) and its in-place artifact (every tensor moved, sparse experts); built once."""
    if model_type not in _BUILT:
        root = tmp_path_factory.mktemp(model_type)
        linear = make_family(model_type, root / "linear", everywhere=False)
        everywhere = make_family(model_type, root / "everywhere", everywhere=True)
        _BUILT[model_type] = {
            "type": model_type,
            "linear": linear,
            "everywhere": everywhere,
            "adapters": merge_family(linear, root / "adapters", EXACT_LOWRANK, router=True),
            "in_place": merge_family(everywhere, root / "in_place", EXACT_SPARSE, router=False),
        }
    return _BUILT[model_type]


@pytest.fixture(params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


def mixed_rows() -> tuple[list[str], list[str]]:
    """Every text with every task, the tasks interleaved."""
    rows = [(text, task) for text in TEXTS for task in TASKS]
    return [text for text, _ in rows], [task for _, task in rows]


@pytest.mark.parametrize("kind", ["adapters", "in_place"])
def test_mixed_batches_answer_as_each_fine_tuned_model(family, kind):
    folders = family["linear" if kind == "adapters" else "everywhere"]
    model = MergedClassifier(open_artifact(family[kind]))
    assert (model.row_adapters is not None) == (kind == "adapters")
    texts, tasks = mixed_rows()
    answers = model.classify_rows(texts, tasks, timings=StageTimings())
    for task in TASKS:
        want = torch.softmax(reference_logits(folders[task], TEXTS), -1)
        got = [a for a in answers if a.task == task]
        assert len(got) == len(TEXTS)
        for row, answer in zip(want, got, strict=True):
            assert list(answer.scores) == [f"{task}{i}" for i in range(TASKS[task])]
            assert torch.allclose(torch.tensor(list(answer.scores.values())), row, atol=1e-4)
    assert [a.truncated for a in answers] == [t == TEXTS[6] for t in texts]


def test_routed_rows_run_with_the_chosen_task(family):
    model = MergedClassifier(open_artifact(family["adapters"]))
    routed = model.classify_rows(TEXTS, [None] * len(TEXTS))
    assert all(a.routed and a.task in TASKS for a in routed)
    tagged = model.classify_rows(TEXTS, [a.task for a in routed])
    assert [a.scores for a in routed] == [a.scores for a in tagged]


def test_export_hf_and_peft_give_the_fine_tuned_logits(family, tmp_path):
    from peft import PeftModel

    artifact = open_artifact(family["adapters"])
    want = reference_logits(family["linear"]["beta"], TEXTS)
    exported = export_task(artifact, "beta", tmp_path / "hf")
    assert torch.allclose(reference_logits(exported, TEXTS), want, atol=1e-4)
    adapter = export_peft(artifact, "beta", tmp_path / "peft")
    base = AutoModelForSequenceClassification.from_pretrained(exported)  # any weights: replaced
    base.base_model.load_state_dict(
        AutoModel.from_pretrained(artifact.backbone).state_dict(), strict=False
    )
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = BertTokenizerFast.from_pretrained(exported)
    with torch.no_grad():
        ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
        # PEFT's LoRA runs beside the layers, in another order of float32 sums
        assert torch.allclose(peft_model(input_ids=ids).logits[0], want[0], atol=1e-3)


def test_add_and_remove_a_task(family, tmp_path):
    folders = family["linear"]
    smaller = tmp_path / "smaller"
    remove_task(family["adapters"], "gamma", smaller)
    texts = tmp_path / "gamma.jsonl"
    texts.write_text("".join(json.dumps({"text": w}) + "\n" for w in WORDS[40:52]))
    add_task(smaller, "gamma", folders["gamma"], texts, tmp_path / "again")
    model = MergedClassifier(open_artifact(tmp_path / "again"))
    got = model.logits("gamma", TEXTS)
    assert torch.allclose(got, reference_logits(folders["gamma"], TEXTS), atol=1e-4)


def test_the_separate_baseline_loads_each_family(family):
    folder = family["everywhere"]["alpha"]
    answers = TaskModel(folder, "alpha", torch.device("cpu")).classify(TEXTS, StageTimings())
    want = torch.softmax(reference_logits(folder, TEXTS), -1)
    got = torch.tensor([list(a.scores.values()) for a in answers])
    assert torch.allclose(got, want, atol=1e-4)


def test_every_family_over_http_in_mixed_batches(tmp_path_factory):
    """One server moved through every family's artifact by live updates; for each, tagged
    requests for all tasks at once (one batch) answer as the fine-tuned models."""
    families = [built(model_type, tmp_path_factory) for model_type in sorted(FAMILIES)]
    options = {"device": "cpu", "batch_wait_timeout_s": 0.2, "max_batch_size": 16}
    first = {**options, "artifact": str(families[0]["adapters"])}
    with live_server(first, from_config=True) as (url, _):
        for family in families:
            artifact = family["adapters"]
            deploy_app(first, {"artifact": str(artifact)})
            bodies = [{"task": task, "inputs": TEXTS} for task in TASKS]
            with ThreadPoolExecutor(len(bodies)) as pool:
                replies = list(pool.map(lambda b: call(f"{url}/v1/classify", b), bodies))
            for task, (status, body) in zip(TASKS, replies, strict=True):
                assert status == 200, (family["type"], body)
                assert body["artifact_version"] == open_artifact(artifact).version
                want = torch.softmax(reference_logits(family["linear"][task], TEXTS), -1)
                got = torch.tensor([list(r["scores"].values()) for r in body["results"]])
                assert torch.allclose(got, want, atol=1e-4), family["type"]


def test_unsupported_and_mixed_families_are_refused_by_name(tmp_path):
    bert = make_family("bert", tmp_path / "bert", everywhere=False)
    other = make_family("distilbert", tmp_path / "distilbert", everywhere=False)
    raw = {
        "base_model": str(bert["base"]),
        "models": [
            {"name": "a", "path": str(bert["alpha"])},
            {"name": "b", "path": str(other["beta"])},
        ],
        "method": "task_arithmetic",
    }
    with pytest.raises(CheckpointError, match="'distilbert' differs from the base's 'bert'"):
        run_merge(parse_config(raw), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    config = json.loads((bert["base"] / "config.json").read_text())
    (bert["base"] / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    raw["models"] = raw["models"][:1]
    with pytest.raises(CheckpointError, match="'gpt2' is not supported; supported families: bert"):
        run_merge(parse_config(raw), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_filter_whose_targets_match_nothing_is_refused(tmp_path):
    folders = make_family("bert", tmp_path / "bert", everywhere=False)
    raw = {
        "base_model": str(folders["base"]),
        "models": [{"name": "a", "path": str(folders["alpha"])}],
        "method": "fr",
        "parameters": {"filter": {"targets": "q_lin"}},
    }
    with pytest.raises(CheckpointError, match="'q_lin' matches no tensor .* encoder.layer.0"):
        run_merge(parse_config(raw), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_heads_are_the_tensors_outside_the_backbone():
    heads = {}
    for model_type in FAMILIES:
        config = AutoConfig.for_model(model_type, **{**SIZE, **CONFIGS[model_type]}, num_labels=3)
        heads[model_type] = sorted(head_tensor_names(config))
    assert heads["bert"] == ["classifier.bias", "classifier.weight"]
    assert heads["roberta"] == [
        "classifier.dense.bias",
        "classifier.dense.weight",
        "classifier.out_proj.bias",
        "classifier.out_proj.weight",
    ]
    assert heads["distilbert"][-2:] == ["pre_classifier.bias", "pre_classifier.weight"]
    assert heads["deberta-v2"][-2:] == ["pooler.dense.bias", "pooler.dense.weight"]
    assert heads["modernbert"][-2:] == ["head.dense.weight", "head.norm.weight"]
