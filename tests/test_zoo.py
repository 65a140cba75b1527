import json

import merging.zoo as zoo_module
import numpy as np
import pytest
import torch
from merging.datasets import UnknownTaskError, load_task
from merging.finetune import Recipe, fine_tune, predict
from merging.zoo import ZooError, build_zoo, open_zoo, zoo_report
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from serving.cli import main

TINY = Recipe(epochs=2, max_train_examples=96, batch_size=16, max_length=32, learning_rate=1e-3)


def test_fine_tune_lowers_the_loss_on_real_samples(tiny_backbone, cache_dir):
    task = load_task("sms_spam", cache_dir)
    result = fine_tune(
        tiny_backbone,
        task,
        Recipe(epochs=3, max_train_examples=128, batch_size=16, max_length=32, learning_rate=1e-3),
        show_progress=False,
    )
    assert result.steps == len(result.losses) == 24
    assert np.mean(result.losses[-6:]) < np.mean(result.losses[:6])


def test_zoo_build_saves_loadable_models_and_reuses_the_cache(tiny_backbone, cache_dir, tmp_path):
    zoo = build_zoo(
        ["sms_spam", "debate_party"], TINY, tmp_path, backbone=tiny_backbone, show_progress=False
    )
    assert set(zoo.tasks) == {"sms_spam", "debate_party"}
    assert json.loads((zoo.root / "zoo.json").read_text())["tasks"] == ["debate_party", "sms_spam"]
    entry = zoo.tasks["debate_party"]
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
    again = build_zoo(["debate_party"], TINY, tmp_path, backbone=tiny_backbone, show_progress=False)
    assert weights.stat().st_mtime_ns == mtime
    assert set(again.tasks) == {"sms_spam", "debate_party"}
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
    with pytest.raises(KeyboardInterrupt):
        build_zoo(
            ["sms_spam", "bbc_topic"], TINY, tmp_path, backbone=tiny_backbone, show_progress=False
        )
    root = zoo_module.zoo_dir(TINY, tiny_backbone, tmp_path)
    assert not (root / "zoo.json").exists()
    assert sorted(p.name for p in (root / "tasks").iterdir()) == ["sms_spam"]
    assert not [p for p in root.rglob(".*") if p.is_dir()]
    with pytest.raises(ZooError, match="zoo.json is missing"):
        open_zoo(root)


def test_unknown_task_writes_nothing(tiny_backbone, tmp_path):
    with pytest.raises(UnknownTaskError, match="known tasks: sms_spam, bbc_topic"):
        build_zoo(["sms_spam", "imdb"], TINY, tmp_path, backbone=tiny_backbone)
    assert not (tmp_path / "zoo").exists()


def test_cli_reports_unknown_task_without_traceback(tmp_path, capsys):
    assert main(["zoo", "build", "--tasks", "imdb", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("freemerge: error: unknown task 'imdb'; known tasks:")
    assert not (tmp_path / "zoo").exists()


def test_same_seed_gives_the_same_model(tiny_backbone, cache_dir):
    task = load_task("debate_party", cache_dir)
    recipe = Recipe(epochs=1, max_train_examples=32, batch_size=16, max_length=16)
    first = fine_tune(tiny_backbone, task, recipe, show_progress=False).model.state_dict()
    second = fine_tune(tiny_backbone, task, recipe, show_progress=False).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
