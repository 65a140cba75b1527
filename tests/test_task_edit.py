"""Adding and removing a task without re-merging (``freemerge add-task`` / ``remove-task``),
on the tiny zoo."""

import json
import shutil

import pytest
import torch
from tiny_merges import LINEAR_LOWRANK, QUICK_ROUTER, merged
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

from freemerge.merging.artifact import ArtifactError, open_artifact, read_manifest, verify_artifact
from freemerge.merging.checkpoint import Checkpoint, CheckpointError
from freemerge.merging.experts import load_expert
from freemerge.merging.router import load_router
from freemerge.merging.task_edit import MAX_DISTANCE, add_task, remove_task
from freemerge.merging.zoo_folder import read_texts
from freemerge.serving.cli import main
from freemerge.serving.runtime import MergedClassifier

NEW = "debate_party"


@pytest.fixture(scope="module")
def routed(tiny_zoo, tmp_path_factory):
    """The tiny zoo's three tasks, rank-4 experts on the linear layers, and a router."""
    out = tmp_path_factory.mktemp("edit") / "routed"
    return merged(tiny_zoo, out, LINEAR_LOWRANK, router=QUICK_ROUTER)


@pytest.fixture(scope="module")
def removed(routed, tmp_path_factory):
    out = tmp_path_factory.mktemp("edit") / "removed"
    return out, remove_task(routed, NEW, out)


@pytest.fixture(scope="module")
def readded(removed, tiny_zoo, tmp_path_factory):
    """The removed task added back from its model: its expert built against the backbone the
    merge built it against."""
    out = tmp_path_factory.mktemp("edit") / "readded"
    task = tiny_zoo.tasks[NEW]
    return out, add_task(removed[0], NEW, task.path, task.texts, out)


@pytest.fixture(scope="module")
def plain(tiny_zoo, tmp_path_factory):
    """Two tasks, sparse experts with settings other than the defaults, no router."""
    out = tmp_path_factory.mktemp("edit") / "plain"
    experts = {"kind": "sparse", "density": 0.05, "granularity": "row"}
    return merged(tiny_zoo, out, experts, models=["sms_spam", "bbc_topic"])


@pytest.fixture(scope="module")
def foreign(tiny_zoo, tmp_path_factory):
    """Models the artifact must refuse: same config with fresh weights, a narrower BERT,
    another model type."""
    root = tmp_path_factory.mktemp("foreign")
    config = BertConfig.from_pretrained(tiny_zoo.tasks[NEW].path)
    narrow = BertConfig(**{**config.to_dict(), "hidden_size": 16, "intermediate_size": 32})
    distil = DistilBertConfig(
        vocab_size=config.vocab_size, dim=32, n_layers=1, n_heads=2, hidden_dim=64
    )
    torch.manual_seed(1)
    models = {
        "random": BertForSequenceClassification(config),
        "narrow": BertForSequenceClassification(narrow),
        "distilbert": DistilBertForSequenceClassification(distil),
    }
    for name, model in models.items():
        model.save_pretrained(root / name, safe_serialization=True)
    return root


def shares_inode(a, b):
    return a.stat().st_ino == b.stat().st_ino


def changed_files(old, new):
    before, after = read_manifest(old)[0]["files"], read_manifest(new)[0]["files"]
    return {n for n in set(before) | set(after) if before.get(n) != after.get(n)}


def test_remove_writes_a_version_without_the_task_and_a_router_refitted(routed, removed):
    out, done = removed
    old, old_version = read_manifest(routed)
    new, version = read_manifest(out)
    assert verify_artifact(out) == [] and version == done.version != old_version
    rest = [t for t in old["tasks"] if t != NEW]
    assert done.tasks == list(new["tasks"]) == rest
    assert new["tasks"] == {t: old["tasks"][t] for t in rest}
    assert load_router(out)[1]["tasks"] == rest and done.router["examples"] == 30 * len(rest)
    old_router = old["parameters"]["router"]
    assert new["parameters"]["router"] == {
        **old_router,
        "data": {t: old_router["data"][t] for t in rest},
    }
    assert changed_files(routed, out) == {
        f"heads/{NEW}.safetensors",
        f"heads/{NEW}.json",
        f"experts/{NEW}.safetensors",
        "router.json",
        "router.safetensors",
    }
    assert not (out / "heads" / f"{NEW}.safetensors").exists()
    for name in ("backbone/model.safetensors", "heads/sms_spam.safetensors"):
        assert shares_inode(out / name, routed / name)
    assert read_manifest(routed)[1] == old_version and verify_artifact(routed) == []
    assert {
        k: v for k, v in new.items() if k not in ("files", "tasks", "router", "parameters")
    } == {k: v for k, v in old.items() if k not in ("files", "tasks", "router", "parameters")}


def test_a_task_added_back_is_what_the_merge_built(routed, removed, readded, tiny_zoo):
    out, done = readded
    old, new = read_manifest(routed)[0], read_manifest(out)[0]
    assert verify_artifact(out) == [] and read_manifest(out)[1] == done.version
    assert done.tasks == list(new["tasks"]) == sorted([*removed[1].tasks, NEW])
    assert 0 < done.distance < MAX_DISTANCE / 4  # fine-tuned from the same base: far inside
    assert new["tasks"][NEW] == old["tasks"][NEW]  # labels, paths, sizes, source and its hash
    assert new["tasks"][NEW]["labels"] == tiny_zoo.tasks[NEW].label_names
    head = f"heads/{NEW}.safetensors"
    assert (out / head).read_bytes() == (routed / head).read_bytes()
    rebuilt = load_expert(out / f"experts/{NEW}.safetensors")
    original = load_expert(routed / f"experts/{NEW}.safetensors")
    assert rebuilt.settings == original.settings and set(rebuilt.factors) == set(original.factors)
    for name in original.factors:
        expected = original.delta(name)
        torch.testing.assert_close(
            rebuilt.delta(name), expected, rtol=0, atol=2e-3 * float(expected.abs().max())
        )
    assert load_router(out)[1]["tasks"] == [*removed[1].tasks, NEW]
    assert new["parameters"]["router"]["data"][NEW] == str(tiny_zoo.tasks[NEW].texts.resolve())
    texts = read_texts(tiny_zoo.tasks[NEW].texts)[:8]
    logits = [MergedClassifier(open_artifact(a)).logits(NEW, texts) for a in (routed, out)]
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-3)


def test_an_added_task_shares_every_file_it_leaves_alone(removed, readded):
    before, after = removed[0], readded[0]
    changed = changed_files(before, after)
    assert changed == {
        f"heads/{NEW}.safetensors",
        f"heads/{NEW}.json",
        f"experts/{NEW}.safetensors",
        "router.json",
        "router.safetensors",
    }
    for name in set(read_manifest(before)[0]["files"]) - changed:
        assert shares_inode(after / name, before / name), name
    assert verify_artifact(before) == [] and read_manifest(before)[1] == removed[1].version


def test_in_place_without_a_router_the_expert_keeps_the_artifact_settings(
    plain, tiny_zoo, tmp_path
):
    art = tmp_path / "art"
    shutil.copytree(plain, art)
    version = read_manifest(art)[1]
    done = add_task(art, NEW, tiny_zoo.tasks[NEW].path)  # no router: no texts needed
    manifest = read_manifest(art)[0]
    assert verify_artifact(art) == [] and done.version == read_manifest(art)[1] != version
    assert done.router is None and manifest["router"] is None
    assert done.tasks == list(manifest["tasks"]) == ["bbc_topic", NEW, "sms_spam"]
    expert = load_expert(art / manifest["tasks"][NEW]["expert"])
    assert expert.settings == load_expert(art / "experts/sms_spam.safetensors").settings
    assert (expert.density, expert.granularity) == (0.05, "row")
    backbone, model = Checkpoint(art / "backbone"), Checkpoint(tiny_zoo.tasks[NEW].path)
    name = "encoder.layer.0.attention.self.query.weight"
    residual = (model.tensor(name) - backbone.tensor(name)).reshape(-1)
    indices, values = expert.entries[name]
    assert len(indices) == round(0.05 * 32) * 32  # the top 5% of each 32-wide row
    torch.testing.assert_close(values, residual[indices.long()])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # nothing left beside it
    remove_task(art, "sms_spam")
    remove_task(art, "bbc_topic")
    assert verify_artifact(art) == [] and list(read_manifest(art)[0]["tasks"]) == [NEW]
    with pytest.raises(ArtifactError, match=f"'{NEW}' is the artifact's only task"):
        remove_task(art, NEW)


@pytest.mark.parametrize(
    ("name", "model", "error", "message"),
    [
        ("sms_spam", NEW, ArtifactError, "task 'sms_spam' is already in the artifact"),
        ("../up", NEW, ArtifactError, r"task name '../up' is not allowed"),
        (".hidden", NEW, ArtifactError, "is not allowed"),
        ("a/b", NEW, ArtifactError, "is not allowed"),
        ("x" * 65, NEW, ArtifactError, "is not allowed"),
        ("other", "random", CheckpointError, r"lie \d\.\d+ \(relative distance\).*another base"),
        ("other", "narrow", CheckpointError, r"hidden_size is 16 where the artifact has 32"),
        ("other", "distilbert", CheckpointError, "model type 'distilbert' differs"),
        ("other", "base", CheckpointError, "a BertModel is not a task this server runs"),
    ],
)
def test_add_refusals_leave_the_artifact_as_it_was(
    plain, tiny_zoo, foreign, tmp_path, name, model, error, message
):
    path = {NEW: tiny_zoo.tasks[NEW].path, "base": tiny_zoo.base}.get(model, foreign / model)
    version = read_manifest(plain)[1]
    with pytest.raises(error, match=message):
        add_task(plain, name, path, out=tmp_path / "out")
    assert not (tmp_path / "out").exists() and read_manifest(plain)[1] == version


def test_an_altered_artifact_is_refused_before_anything(plain, tiny_zoo, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(plain, art)
    with open(art / "heads" / "sms_spam.safetensors", "ab") as handle:
        handle.write(b"\0")
    for edit in (
        lambda: add_task(art, NEW, tiny_zoo.tasks[NEW].path),
        lambda: remove_task(art, "bbc_topic"),
    ):
        with pytest.raises(ArtifactError, match="does not verify: altered file: heads/sms_spam"):
            edit()
    assert list(read_manifest(art)[0]["tasks"]) == ["bbc_topic", "sms_spam"]


def test_a_router_whose_texts_are_gone_is_refused_with_the_way_out(tiny_zoo, tmp_path):
    texts = {}
    for task in ("sms_spam", "bbc_topic"):
        texts[task] = tmp_path / f"{task}.jsonl"
        shutil.copy(tiny_zoo.tasks[task].texts, texts[task])
    router = {**QUICK_ROUTER, "data": {t: str(p) for t, p in texts.items()}}
    art = merged(tiny_zoo, tmp_path / "art", LINEAR_LOWRANK, ["sms_spam", "bbc_topic"], router)
    texts["bbc_topic"].unlink()
    version = read_manifest(art)[1]
    for edit in (
        lambda: remove_task(art, "sms_spam"),
        lambda: add_task(art, NEW, tiny_zoo.tasks[NEW].path, tiny_zoo.tasks[NEW].texts),
    ):
        with pytest.raises(ArtifactError, match=r"bbc_topic.jsonl does not exist .*router fit"):
            edit()
    assert read_manifest(art)[1] == version


def test_the_commands(routed, removed, tiny_zoo, tmp_path, capsys):
    task = tiny_zoo.tasks[NEW]
    args = ["add-task", str(removed[0]), "--name", NEW, "--model", str(task.path)]
    assert main(args) == 2
    assert f"router, fitted again with task '{NEW}': give --router-data" in capsys.readouterr().err
    assert main([*args, "--router-data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err
    assert main(["remove-task", str(routed), "--name", "imdb"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'imdb'; this artifact has: " in err and "Traceback" not in err
    assert all(t in err for t in read_manifest(routed)[0]["tasks"])
    out = tmp_path / "cli"
    assert main(["remove-task", str(routed), "--name", "sms_spam", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"version {read_manifest(out)[1]}" in printed and "router fitted again over 2" in printed
    assert main(["remove-task", str(routed), "--name", "sms_spam", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    add = [*args, "--router-data", str(task.texts), "--out", str(tmp_path / "cli2")]
    assert main(add) == 0
    assert "relative distance from the merged backbone 0.0" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli2" / "router.json").read_text())["tasks"][-1] == NEW
