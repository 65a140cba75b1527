import dataclasses
import hashlib
import json
import logging

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

import freemerge.benchmarks.zoo as zoo_module
from freemerge.benchmarks.commands import ZOO_NAMES
from freemerge.benchmarks.datasets import UnknownTaskError, load_task
from freemerge.benchmarks.finetune import Recipe, fine_tune, predict
from freemerge.benchmarks.sources import BACKBONES
from freemerge.benchmarks.zoo import ZOOS, build_zoo, zoo_report
from freemerge.merging.zoo_folder import Zoo, ZooError, open_zoo, read_texts
from freemerge.serving.cli import main

TINY = Recipe(epochs=2, max_train_examples=96, batch_size=16, max_length=32, learning_rate=1e-3)


def test_fine_tune_lowers_the_loss_on_real_samples(tiny_backbone, cache_dir):
    task = load_task("sms_spam", cache_dir)
    reported = []  # transformers' log records, its load report among them
    handler = logging.Handler()
    handler.emit = lambda record: reported.append(record.getMessage())
    hf_logging.get_logger().addHandler(handler)
    result = fine_tune(
        tiny_backbone,
        task,
        Recipe(epochs=3, max_train_examples=128, batch_size=16, max_length=32, learning_rate=1e-3),
        show_progress=False,
    )
    assert result.steps == len(result.losses) == 24
    assert np.mean(result.losses[-6:]) < np.mean(result.losses[:6])
    hf_logging.get_logger().removeHandler(handler)
    assert not any("MISSING" in message for message in reported)  # the new head: expected


def test_zoo_build_saves_loadable_models_and_reuses_the_cache(tiny_backbone, cache_dir, tmp_path):
    names = ["sms_spam", "debate_party"]
    zoo = build_zoo(tmp_path / "z", names, TINY, tiny_backbone, show_progress=False)
    assert json.loads((zoo.root / "zoo.json").read_text())["tasks"] == names
    entry = zoo.tasks["debate_party"]
    train = load_task("debate_party", cache_dir)
    kept = read_texts(entry.texts)  # the router's texts: from the train split only
    assert len(kept) == 842 and set(kept) == set(train.subset(train.split()["train"])[0])
    assert entry.sizes == {"train": 842, "validation": 105, "test": 105}
    assert 0.0 <= entry.test_accuracy <= 1.0

    # The saved directory is a plain Hugging Face model that reproduces the recorded accuracy.
    model = AutoModelForSequenceClassification.from_pretrained(entry.path)
    tokenizer = AutoTokenizer.from_pretrained(entry.path)
    assert model.config.id2label == {0: "Democratic", 1: "Moderator", 2: "Republican"}
    task = load_task("debate_party", cache_dir)
    texts, labels = task.subset(task.split()["test"])
    assert (
        np.mean(predict(model, tokenizer, texts, TINY.max_length) == labels) == entry.test_accuracy
    )

    # A second build trains nothing: the cached tasks come back as they were.
    weights = entry.path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = build_zoo(tmp_path / "z", names, TINY, tiny_backbone, show_progress=False)
    assert weights.stat().st_mtime_ns == mtime
    # A changed recipe is a different model: that task is trained again.
    other = build_zoo(
        tmp_path / "z",
        ["sms_spam"],
        Recipe(epochs=1, max_train_examples=32, max_length=16),
        tiny_backbone,
        show_progress=False,
    )
    assert other.tasks["sms_spam"].fingerprint != zoo.tasks["sms_spam"].fingerprint
    assert open_zoo(zoo.root).tasks["sms_spam"].test_accuracy == zoo.tasks["sms_spam"].test_accuracy
    assert (
        "| debate_party | 3 (Democratic, Moderator, Republican) | 842 / 105 / 105 |"
        in zoo_report(again, "freemerge zoo build")
    )


def test_interrupted_build_leaves_only_whole_tasks(tiny_backbone, tmp_path, monkeypatch):
    real_fine_tune = zoo_module.fine_tune

    def fail_on_second(backbone, task, recipe, show_progress):
        if task.name == "bbc_topic":
            raise KeyboardInterrupt
        return real_fine_tune(backbone, task, recipe, show_progress)

    monkeypatch.setattr(zoo_module, "fine_tune", fail_on_second)
    root = tmp_path / "z"
    with pytest.raises(KeyboardInterrupt):
        build_zoo(root, ["sms_spam", "bbc_topic"], TINY, tiny_backbone, show_progress=False)
    assert not (root / "zoo.json").exists()
    assert sorted(p.name for p in (root / "tasks").iterdir()) == ["sms_spam"]
    assert not [p for p in root.rglob(".*") if p.is_dir()]
    with pytest.raises(ZooError, match="zoo.json is missing"):
        open_zoo(root)


def test_unknown_task_writes_nothing(tiny_backbone, tmp_path):
    with pytest.raises(UnknownTaskError, match="known tasks: sms_spam, bbc_topic"):
        build_zoo(tmp_path / "z", ["sms_spam", "imdb"], TINY, tiny_backbone)
    assert not (tmp_path / "z").exists()


def test_cli_reports_a_missing_zoo_without_traceback(tmp_path, capsys):
    assert main(["zoo", "show", "--zoo", "nowhere", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"freemerge: error: no zoo at {tmp_path}/zoo/nowhere")


def test_same_seed_gives_the_same_model(tiny_backbone, cache_dir):
    task = load_task("debate_party", cache_dir)
    recipe = Recipe(epochs=1, max_train_examples=32, batch_size=16, max_length=16)
    first = fine_tune(tiny_backbone, task, recipe, show_progress=False).model.state_dict()
    second = fine_tune(tiny_backbone, task, recipe, show_progress=False).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_mpnet_zoo_is_the_demo_on_the_mpnet_backbone():
    mpnet, demo = ZOOS["mpnet"], ZOOS["demo"]
    assert mpnet.backbone == "all-mpnet-base-v2" and mpnet.backbone in BACKBONES
    assert (mpnet.tasks, mpnet.recipe) == (demo.tasks, demo.recipe)
    assert demo.backbone == ZOOS["full"].backbone == "all-MiniLM-L6-v2"
    assert ZOO_NAMES == tuple(ZOOS)  # the CLI's --zoo choices


def test_build_named_zoo_uses_the_plans_backbone(tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setattr(
        zoo_module, "backbone_dir", lambda cache_dir, name: calls.setdefault("dir", name)
    )
    monkeypatch.setattr(
        zoo_module, "build_zoo", lambda *args, **kwargs: calls.setdefault("build", (args, kwargs))
    )
    zoo_module.build_named_zoo("mpnet", tmp_path, show_progress=False)
    args, kwargs = calls["build"]
    assert calls["dir"] == "all-mpnet-base-v2" and args[3] == "all-mpnet-base-v2"
    assert kwargs["backbone_name"] == "all-mpnet-base-v2"
    assert args[0] == tmp_path / "zoo" / "mpnet"


MACHINE = dict.fromkeys(
    ("cpus", "processor", "memory_gib", "accelerator", "python", "torch", "date_utc"), "x"
)


def _bare_zoo(root, record, config):
    (root / "base").mkdir(parents=True)
    (root / "zoo.json").write_text(json.dumps(record))
    (root / "base" / "config.json").write_text(json.dumps(config))
    return Zoo(root, {}, {}, MACHINE)


def test_zoo_report_names_the_zoos_backbone(tmp_path, monkeypatch):
    mpnet = {"model_type": "mpnet", "num_hidden_layers": 12, "hidden_size": 768}
    zoo = _bare_zoo(tmp_path / "a", {"backbone": "all-mpnet-base-v2"}, mpnet)
    assert "fine-tuned from all-mpnet-base-v2 (mpnet, 12 layers, hidden 768) (" in zoo_report(
        zoo, "freemerge zoo build --zoo mpnet"
    )
    # A zoo.json without the name: the backbone is known by the weights in base/.
    bert = {"model_type": "bert", "num_hidden_layers": 6, "hidden_size": 384}
    zoo = _bare_zoo(tmp_path / "b", {}, bert)
    (zoo.base / "model.safetensors").write_bytes(b"weights")
    minilm = dataclasses.replace(
        BACKBONES["all-MiniLM-L6-v2"], weights_sha256=hashlib.sha256(b"weights").hexdigest()
    )
    monkeypatch.setitem(zoo_module.BACKBONES, "all-MiniLM-L6-v2", minilm)
    assert "from all-MiniLM-L6-v2 (bert, 6 layers, hidden 384) (" in zoo_report(zoo, "c")


def test_a_zoo_of_every_kind_builds_and_copies_a_siblings_tasks(tiny_backbone, tmp_path):
    from freemerge.benchmarks.finetune import first_tokens
    from freemerge.benchmarks.zoo import EMBEDDING_TASK, NER_TASK
    from freemerge.merging.kinds import kind_of_model

    names = ["sms_spam", NER_TASK, EMBEDDING_TASK]
    zoo = build_zoo(tmp_path / "one", names, TINY, tiny_backbone, show_progress=False)
    kinds = {
        name: kind_of_model(task.path, json.loads((task.path / "config.json").read_text()))
        for name, task in zoo.tasks.items()
    }
    assert kinds == {
        "sms_spam": "single_label_classification",
        NER_TASK: "token_classification",
        EMBEDDING_TASK: "embedding",
    }
    ner = zoo.tasks[NER_TASK]
    assert ner.metric == "entity_f1" and 0.0 <= ner.test_accuracy <= 1.0
    assert ner.sizes == {"train": 1825, "validation": 228, "test": 228}
    assert zoo.tasks[EMBEDDING_TASK].test_accuracy is None
    report = zoo_report(zoo, "freemerge zoo build")
    assert f"| {NER_TASK} (entity_f1) | 21 (O, B-company" in report
    assert f"| {EMBEDDING_TASK} (none) | 0 () | - | - | - | - |" in report
    # the first token of each word carries its tag: "@user" is "@" then "user"
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    words = ["@user", "Paris", "rocks"]
    encoding = tokenizer(" ".join(words)).encodings[0]
    assert first_tokens(words, encoding) == [None, 0, None, 1, 2, None]
    # another zoo with a task of the same fingerprint copies it instead of training it
    built = zoo.tasks["sms_spam"]
    sibling = build_zoo(tmp_path / "two", ["sms_spam"], TINY, tiny_backbone, show_progress=False)
    copied = sibling.tasks["sms_spam"]
    assert copied.path != built.path and copied.fingerprint == built.fingerprint
    assert copied.build_seconds == built.build_seconds  # its record, not a new training's
    assert (copied.path / "model.safetensors").read_bytes() == (
        built.path / "model.safetensors"
    ).read_bytes()
