"""Tiny random BERT models of every task kind, and their merged artifact: a single-label
classifier, a multi-label tagger, a regression scorer, a cross-encoder (text pairs), a token
classifier (without the pooler BERT's token models leave out) and a sentence-transformers
embedding model, with experts that reconstruct each task exactly."""

import json
from pathlib import Path

import torch
from test_families import SIZE, WORDS, tiny_tokenizer
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from freemerge.merging.config import parse_config
from freemerge.merging.merge import run_merge

SETTINGS = {**SIZE, "vocab_size": 5 + len(WORDS)}
BIO = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
SEQUENCE = {  # task: config of its head
    "topic": {"id2label": {0: "sport", 1: "news", 2: "art"}},
    "tags": {
        "id2label": {0: "red", 1: "green", 2: "blue", 3: "grey"},
        "problem_type": "multi_label_classification",
    },
    "rating": {"num_labels": 1, "problem_type": "regression"},
    "rerank": {"num_labels": 1, "sentence_transformers": {"version": "4.1.0"}},
}
TEXTS = [
    "the people came back from work",
    "a good day",
    "which way is the water",
    "  we can show you how to write a new sentence every day if you like  ",
    "no",
]
PAIRS = [["which way is the water", "the water is down there"], ["a good day", "no"]]
EXACT = {"kind": "lowrank", "rank": 64, "dtype": "float32"}  # full rank: exact


def _moved(model: torch.nn.Module, base: torch.nn.Module, seed: int) -> None:
    """Load ``base``'s weights into ``model``'s backbone and move its linear layers' weights
    ~5%."""
    torch.manual_seed(seed)
    backbone = model.base_model if hasattr(model, "base_model") else model
    backbone.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, torch.nn.Linear):
                noise = torch.randn_like(module.weight)
                module.weight.add_(0.05 * module.weight.abs().mean() * noise)


def save_model(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    tiny_tokenizer(folder)
    return folder


def _embedding_folder(base: torch.nn.Module, folder: Path) -> Path:
    """A sentence-transformers folder: the backbone, mean pooling, normalize, 16 tokens."""
    model = AutoModel.from_config(base.config)
    _moved(model, base, seed=7)
    save_model(model, folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    settings = {"max_seq_length": 16, "do_lower_case": False}
    (folder / "sentence_bert_config.json").write_text(json.dumps(settings))
    return folder


def make_models(root: Path) -> dict[str, Path]:
    """The base and one model of every kind under ``root``: {name: folder}."""
    torch.manual_seed(0)
    base = AutoModel.from_config(AutoConfig.for_model("bert", **SETTINGS))
    folders = {"base": save_model(base, root / "base")}
    for k, (task, head) in enumerate(SEQUENCE.items()):
        model = AutoModelForSequenceClassification.from_config(
            AutoConfig.for_model("bert", **SETTINGS, **head)
        )
        _moved(model, base, seed=k + 1)
        with torch.no_grad():  # sharper scores: a wrong input shows beyond the tolerance
            model.classifier.weight.mul_(20)
        folders[task] = save_model(model, root / task)
    token = AutoModelForTokenClassification.from_config(
        AutoConfig.for_model("bert", **SETTINGS, id2label=dict(enumerate(BIO)))
    )
    _moved(token, base, seed=5)
    with torch.no_grad():  # sharper logits, fewer O's: entities to group
        token.classifier.weight.mul_(20)
        token.classifier.bias.copy_(torch.tensor([0.0, 0.3, 0.3, 0.3, 0.3]))
    folders["ner"] = save_model(token, root / "ner")
    folders["emb"] = _embedding_folder(base, root / "emb")
    return folders


def make_kinds_artifact(root: Path) -> dict:
    """Every kind's model under ``root`` merged into ``root/artifact``, with a router:
    ``{"folders": {name: folder}, "artifact": path}``."""
    folders = make_models(root)
    tasks = [name for name in folders if name != "base"]
    data = {}
    for k, task in enumerate(tasks):
        lines = [{"text": " ".join(WORDS[k * 12 + i : k * 12 + i + 5])} for i in range(8)]
        data[task] = str(root / f"{task}.jsonl")
        Path(data[task]).write_text("".join(json.dumps(line) + "\n" for line in lines))
    raw = {
        "base_model": str(folders["base"]),
        "models": [{"name": t, "path": str(folders[t])} for t in tasks],
        "method": "free",
        "experts": {**EXACT, "by_kind": {"embedding": {"vectors": "full"}}},
        "router": {"kind": "embeddings", "examples_per_task": 8, "epochs": 3, "data": data},
    }
    run_merge(parse_config(raw), root / "artifact", show_progress=False)
    return {"folders": folders, "artifact": root / "artifact"}
