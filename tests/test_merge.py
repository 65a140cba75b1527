"""The merge engine end to end on a tiny zoo: methods, artifact, verify, export, bad input."""

import json
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForSequenceClassification

from freemerge.merging.artifact import ArtifactError, open_artifact, verify_artifact
from freemerge.merging.checkpoint import Checkpoint, CheckpointError
from freemerge.merging.config import ConfigError, load_config, parse_config
from freemerge.merging.export import export_task
from freemerge.merging.merge import run_merge
from freemerge.serving.cli import main
from freemerge.serving.runtime import MergedClassifier

TEXTS = [
    "Free entry! Win a prize now, text WIN to 80086",
    "see you at lunch tomorrow?",
    "The central bank raised interest rates again.",
]


def config_for(zoo, method="free", experts=None, **parameters):
    raw = {
        "base_model": str(zoo.base),
        "models": [{"name": n, "path": str(t.path)} for n, t in zoo.tasks.items()],
        "method": method,
        "parameters": parameters,
    }
    return parse_config({**raw, "experts": experts} if experts else raw)


@pytest.fixture(scope="module")
def free_artifact(tiny_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "free"
    run_merge(
        config_for(
            tiny_zoo,
            "free",
            experts={"kind": "sparse"},
            scaling=0.5,
            filter={"mode": "radial", "cutoff": 0.1},
        ),
        out,
        show_progress=False,
    )
    return open_artifact(out)


def finetuned_logits(path, texts):
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    runtime_tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return model(**runtime_tokenizer(texts, padding=True, return_tensors="pt")).logits


def test_task_arithmetic_backbone_matches_the_formula(tiny_zoo, tmp_path):
    out = tmp_path / "ta"
    run_merge(config_for(tiny_zoo, "task_arithmetic", scaling=0.4), out, show_progress=False)
    merged = load_file(str(out / "backbone" / "model.safetensors"))
    base = Checkpoint(tiny_zoo.base)
    tuned = [Checkpoint(t.path) for t in tiny_zoo.tasks.values()]
    for name in (
        "encoder.layer.0.attention.self.query.weight",
        "embeddings.LayerNorm.bias",
        "pooler.dense.weight",
    ):
        theta0 = base.tensor(name)
        expected = theta0 + 0.4 * sum(c.tensor(name) - theta0 for c in tuned)
        assert torch.allclose(merged[name], expected, atol=1e-6)
    assert not list((out / "experts").iterdir())


@pytest.mark.parametrize("method", ["average", "ties", "fr"])
def test_every_method_writes_a_verified_loadable_artifact(tiny_zoo, tmp_path, method):
    out = tmp_path / method
    run_merge(config_for(tiny_zoo, method), out, show_progress=False)
    assert verify_artifact(out) == []
    artifact = open_artifact(out)
    assert artifact.manifest["method"] == method
    assert set(artifact.tasks) == set(tiny_zoo.tasks)
    model = AutoModel.from_pretrained(out / "backbone")  # plain transformers, offline
    merged = load_file(str(out / "backbone" / "model.safetensors"))
    assert all(torch.equal(p, merged[n]) for n, p in model.named_parameters())


def test_reference_filter_with_large_ratio_leaves_square_matrices_alone(tiny_zoo, tmp_path):
    fr, ta = tmp_path / "fr", tmp_path / "ta"
    run_merge(
        config_for(tiny_zoo, "fr", scaling=0.3, filter={"mode": "reference", "ratio": 0.71}),
        fr,
        show_progress=False,
    )
    run_merge(config_for(tiny_zoo, "task_arithmetic", scaling=0.3), ta, show_progress=False)
    a = load_file(str(fr / "backbone" / "model.safetensors"))
    b = load_file(str(ta / "backbone" / "model.safetensors"))
    square = "encoder.layer.1.attention.self.key.weight"  # 32 x 32
    assert a[square].shape[0] == a[square].shape[1]
    assert torch.allclose(a[square], b[square], atol=1e-6)
    rectangular = "encoder.layer.1.intermediate.dense.weight"  # 64 x 32
    assert not torch.allclose(a[rectangular], b[rectangular])
    report = json.loads((fr / "filter_report.json").read_text())
    assert report["removed_energy"][square]["sms_spam"] == 0.0
    assert report["removed_energy"][rectangular]["sms_spam"] > 0.0


def test_free_artifact_layout_sizes_and_manifest(free_artifact, tiny_zoo):
    manifest = free_artifact.manifest
    assert manifest["format"] == "freemerge-artifact" and manifest["format_version"] == 1
    assert manifest["parameters"]["experts"] == {
        "kind": "sparse",
        "settings": {"density": 0.01, "granularity": "tensor", "rescale": 1.0},
        "by_kind": {},
    }
    backbone_bytes = manifest["backbone"]["bytes"]
    for name, entry in manifest["tasks"].items():
        assert entry["labels"] == tiny_zoo.tasks[name].label_names
        assert (free_artifact.root / entry["expert"]).is_file()
        assert 0 < entry["expert_bytes"] <= 0.021 * backbone_bytes
    report = json.loads((free_artifact.root / "filter_report.json").read_text())
    assert len(report["removed_energy"]) == 12  # 6 matrices in each of 2 layers
    assert all(0 < v < 1 for v in report["mean_removed_energy"].values())


def test_full_density_expert_recovers_each_fine_tuned_model(tiny_zoo, tmp_path):
    out = tmp_path / "dense"
    run_merge(
        config_for(tiny_zoo, "task_arithmetic", experts={"kind": "sparse", "density": 1.0}),
        out,
        show_progress=False,
    )
    runtime = MergedClassifier(open_artifact(out))
    for name, task in tiny_zoo.tasks.items():
        assert torch.allclose(
            runtime.logits(name, TEXTS), finetuned_logits(task.path, TEXTS), atol=1e-4
        )


def test_export_equals_the_artifacts_own_forward(free_artifact, tmp_path):
    runtime = MergedClassifier(free_artifact)
    for task in free_artifact.tasks:
        out = export_task(free_artifact, task, tmp_path / task)
        exported = finetuned_logits(out, TEXTS)
        assert torch.allclose(exported, runtime.logits(task, TEXTS), atol=1e-5)
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["BertForSequenceClassification"]
        assert list(config["id2label"].values()) == free_artifact.tasks[task]["labels"]


def test_backbone_is_bitwise_unchanged_after_thousands_of_swaps(free_artifact):
    runtime = MergedClassifier(free_artifact)
    before = {n: p.detach().clone() for n, p in runtime.parameters.items()}
    tasks = list(free_artifact.tasks)
    for i in range(3000):
        with runtime.expert_applied(tasks[i % len(tasks)]):
            pass
    runtime.logits(tasks[0], TEXTS)
    assert all(torch.equal(before[n], p) for n, p in runtime.parameters.items())


def test_tampered_or_missing_files_are_detected(free_artifact, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(free_artifact.root, copy)
    expert = copy / "experts" / "sms_spam.safetensors"
    data = bytearray(expert.read_bytes())
    data[-1] ^= 0x01
    expert.write_bytes(bytes(data))
    (copy / "heads" / "bbc_topic.safetensors").unlink()
    problems = verify_artifact(copy)
    assert any(p.startswith("altered file: experts/sms_spam.safetensors") for p in problems)
    assert "missing file: heads/bbc_topic.safetensors" in problems
    with pytest.raises(ArtifactError, match="failed verification"):
        open_artifact(copy)
    assert main(["verify", str(copy)]) == 1
    assert main(["verify", str(free_artifact.root)]) == 0
    assert "OK" in capsys.readouterr().out


def test_cli_merge_from_a_zoo_config(tiny_zoo, tmp_path, capsys):
    config = tmp_path / "merge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "zoo": str(tiny_zoo.root),
                "models": ["sms_spam", "debate_party"],
                "method": "free",
                "experts": {"kind": "sparse", "density": 0.02},
            }
        )
    )
    assert main(["merge", str(config), "--out", str(tmp_path / "out")]) == 0
    assert "expert sms_spam" in capsys.readouterr().out
    assert set(open_artifact(tmp_path / "out").tasks) == {"sms_spam", "debate_party"}


def no_partial_output(parent):
    return not [p for p in parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"method": "slerp"},
            "unknown merge method 'slerp'; allowed: average, task_arithmetic, ties, fr, free",
        ),
        (
            {"parameters": {"scalling": 0.3}},
            "'scalling' is not a parameter of method free; allowed: scaling, other_scaling",
        ),
        ({"experts": {"kind": "sparse", "density": 0}}, r"density must be in \(0, 1\]"),
        (
            {"experts": {"density": 0.1}},
            "'density' is not a setting of lowrank experts; allowed: rank, vectors, skip",
        ),
        ({"experts": {"kind": "dense"}}, "unknown expert kind 'dense'"),
        ({"experts": {"kind": "sparse", "density": 1.5}}, r"density must be in \(0, 1\]"),
        ({"method": "ties", "parameters": {"density": 2}}, r"density must be in \(0, 1\]"),
        ({"method": "ties", "parameters": {"scaling": "big"}}, "scaling must be a number"),
        ({"parameters": {"task_weights": "loud"}}, "task_weights must be one of uniform, energy"),
        ({"parameters": {"experts": {}}}, "experts is a top-level block"),
        ({"parameters": {"filter": {"mode": "lowpass"}}}, "unknown filter mode 'lowpass'"),
        ({"parameters": {"filter": {"ratios": 1}}}, "unknown key 'ratios' in filter"),
        ({"extra": 1}, "unknown key 'extra' in the config"),
    ],
)
def test_bad_configs_are_refused(tiny_zoo, change, message):
    raw = {
        "base_model": str(tiny_zoo.base),
        "models": [{"name": "sms_spam", "path": str(tiny_zoo.tasks["sms_spam"].path)}],
    }
    raw.update(change)
    with pytest.raises(ValueError, match=message):
        parse_config(raw)


def test_missing_paths_are_refused(tiny_zoo, tmp_path):
    config = parse_config(
        {
            "base_model": str(tiny_zoo.base),
            "models": [{"name": "x", "path": str(tmp_path / "nope")}],
        }
    )
    with pytest.raises(CheckpointError, match="model x: model directory .* does not exist"):
        run_merge(config, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def _corrupt_copy(source, target, edit):
    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"))
    return target


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t["bert.encoder.layer.0.output.dense.weight"].__setitem__((0, 0), math.nan),
            "tensor 'encoder.layer.0.output.dense.weight' contains NaN or Inf",
        ),
        (lambda t: t["bert.pooler.dense.bias"].__setitem__(3, math.inf), "contains NaN or Inf"),
        (
            lambda t: t.__setitem__("bert.pooler.dense.bias", torch.zeros(7)),
            r"tensor 'pooler.dense.bias' has shape \(7,\), the base has \(32,\)",
        ),
        (lambda t: t.pop("bert.pooler.dense.bias"), "lacks tensor 'pooler.dense.bias'"),
    ],
)
def test_bad_checkpoints_are_refused_and_leave_no_output(tiny_zoo, tmp_path, edit, message):
    broken = _corrupt_copy(tiny_zoo.tasks["sms_spam"].path, tmp_path / "broken", edit)
    config = parse_config(
        {
            "base_model": str(tiny_zoo.base),
            "models": [
                {"name": "sms_spam", "path": str(broken)},
                {"name": "bbc_topic", "path": str(tiny_zoo.tasks["bbc_topic"].path)},
            ],
        }
    )
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    with pytest.raises(CheckpointError, match=message):
        run_merge(config, out_parent / "art", show_progress=False)
    assert list(out_parent.iterdir()) == []


def test_existing_output_is_not_overwritten_by_default(tiny_zoo, free_artifact):
    with pytest.raises(ArtifactError, match="already exists"):
        run_merge(config_for(tiny_zoo), free_artifact.root, show_progress=False)


def test_pickled_checkpoints_are_refused(tiny_zoo, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_zoo.tasks["sms_spam"].path, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled .bin checkpoints are refused"):
        Checkpoint(pickled)


def test_unknown_task_in_artifact(free_artifact):
    with pytest.raises(ArtifactError, match="unknown task 'nope'; this artifact has: "):
        MergedClassifier(free_artifact).logits("nope", TEXTS)
