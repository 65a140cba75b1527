"""Router kinds, calibration, candidates and refitting without a re-merge, on the tiny zoo."""

import json
import pickle
import subprocess
import sys

import pytest
import torch

from freemerge.benchmarks.evaluate import task_texts
from freemerge.merging.artifact import open_artifact, read_manifest, verify_artifact
from freemerge.merging.config import parse_config
from freemerge.merging.merge import run_merge
from freemerge.merging.refit import refit_router
from freemerge.merging.router import RouterFormatError, load_router, text_hashes
from freemerge.merging.router_config import ROUTER_KINDS, RouterConfig, parse_kind
from freemerge.merging.router_training import (
    expected_calibration_error,
    fit_temperature,
    held_out_rows,
)
from freemerge.serving.cli import main
from freemerge.serving.engine import MergedEngine
from freemerge.serving.requests import RequestError, StageTimings
from freemerge.serving.runtime import MergedClassifier

TASKS = ("sms_spam", "bbc_topic", "debate_party")


def data(zoo):
    return {task: str(zoo.tasks[task].path / "texts.jsonl") for task in TASKS}


@pytest.fixture(scope="module")
def refitted(tiny_routed_artifact, tiny_zoo, tmp_path_factory):
    """Every kind fitted for the tiny artifact (low-rank experts), each a new artifact."""
    out = {}
    for kind in ROUTER_KINDS:
        folder = tmp_path_factory.mktemp("kinds") / kind.replace("+", "_")
        config = RouterConfig(kind=kind, examples_per_task=60, epochs=20, data=data(tiny_zoo))
        out[kind] = (folder, *refit_router(tiny_routed_artifact, config, folder))
    return out


@pytest.fixture(scope="module")
def texts():
    return {task: task_texts(task, "validation")[0][:20] for task in TASKS}


@pytest.mark.parametrize("kind", ROUTER_KINDS)
def test_every_kind_routes_and_answers_as_tagged(refitted, texts, kind):
    folder, metrics, version = refitted[kind]
    assert verify_artifact(folder) == [] and open_artifact(folder).version == version
    model = MergedClassifier(open_artifact(folder))
    assert model.router.kind == kind
    all_texts = [t for task in TASKS for t in texts[task]]
    routes = model.route(all_texts)
    truth = [t for t in TASKS for _ in range(20)]
    right = sum(r.task == task for r, task in zip(routes, truth, strict=True))
    assert right / len(routes) > 0.6  # chance is 1/3
    answers = model.classify(all_texts[::7])
    for answer, text in zip(answers, all_texts[::7], strict=True):
        tagged = model.classify([text], task=answer.task)[0]
        assert answer.routed and tagged.label == answer.label
        assert tagged.scores == pytest.approx(answer.scores, abs=1e-5)
    mixed = model.classify(all_texts[:3], mixing="softmax")
    assert all(a.routed and a.label in model.labels(a.task) for a in mixed)
    assert 0 <= metrics["held_out_ece"] <= 1 and metrics["examples"] == 180


def test_a_refit_shares_the_unchanged_files_and_is_a_new_version(refitted, tiny_routed_artifact):
    folder, _, version = refitted["experts"]
    old_manifest, old_version = read_manifest(tiny_routed_artifact)
    new_manifest = read_manifest(folder)[0]
    assert version != old_version
    changed = {
        n for n in new_manifest["files"] if new_manifest["files"][n] != old_manifest["files"][n]
    }
    assert changed == {"router.json", "router.safetensors"}
    shared = folder / "backbone" / "model.safetensors"
    assert (
        shared.stat().st_ino
        == (tiny_routed_artifact / "backbone" / "model.safetensors").stat().st_ino
    )
    assert new_manifest["parameters"]["router"]["kind"] == "experts"
    assert verify_artifact(tiny_routed_artifact) == []  # the source is untouched


def test_candidates_restrict_the_choice(refitted, texts):
    model = MergedClassifier(open_artifact(refitted["ngrams"][0]))
    routes = model.route(texts["bbc_topic"][:5], [["sms_spam", "debate_party"]] * 5)
    for route in routes:
        assert route.task in ("sms_spam", "debate_party")
        assert set(route.probabilities) == {"sms_spam", "debate_party"}
        assert sum(route.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    alone = model.route(texts["bbc_topic"][:1], [["debate_party"]])[0]
    assert alone.task == "debate_party" and alone.confidence == pytest.approx(1.0)


def test_the_experts_kind_needs_low_rank_experts(tiny_zoo, tmp_path):
    config = parse_config(
        {
            "zoo": str(tiny_zoo.root),
            "method": "free",
            "experts": {"kind": "sparse", "density": 0.05},
            "router": {"kind": "experts", "examples_per_task": 20},
        }
    )
    with pytest.raises(ValueError, match="needs a low-rank expert for every task"):
        run_merge(config, tmp_path / "art", show_progress=False)
    assert not (tmp_path / "art").exists()


def test_unknown_kinds_and_old_router_files_are_refused(refitted, tmp_path):
    assert parse_kind("layers+ngrams") == ("ngrams", "layers")
    with pytest.raises(ValueError, match="unknown router kind 'tfidf'"):
        RouterConfig(kind="tfidf")
    record = json.loads((refitted["ngrams"][0] / "router.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    (old / "router.json").write_text(json.dumps({**record, "format": 1}))
    with pytest.raises(RouterFormatError, match="refit it with `freemerge router fit"):
        load_router(old)


def test_router_fit_command(tiny_routed_artifact, tiny_zoo, tmp_path, capsys):
    out = tmp_path / "refit"
    missing = ["router", "fit", str(tiny_routed_artifact), "--data", "imdb=x.jsonl"]
    assert main(missing) != 0
    assert "--data names 'imdb', not a task of this artifact" in capsys.readouterr().err
    args = ["router", "fit", str(tiny_routed_artifact), "--kind", "embeddings", "--out", str(out)]
    args += ["--examples-per-task", "30"]
    assert main(args) == 0
    assert f"version {read_manifest(out)[1]}" in capsys.readouterr().out
    assert load_router(out)[1]["kind"] == "embeddings"
    assert main(args) != 0
    assert "already exists" in capsys.readouterr().err


def test_temperature_and_calibration_error():
    torch.manual_seed(0)
    logits = torch.randn(4000, 4) * 3
    labels = torch.multinomial(torch.softmax(logits / 2.0, -1), 1).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.1)
    calibrated = expected_calibration_error(torch.softmax(logits / 2.0, -1), labels)
    overconfident = expected_calibration_error(torch.softmax(logits, -1), labels)
    assert calibrated < 0.03 < overconfident


def test_held_out_rows_take_a_share_of_every_task():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 3)
    fit, held = held_out_rows(labels, 0.2, seed=0)
    assert sorted(fit + held) == list(range(33))
    assert [int((labels[held] == t).sum()) for t in range(3)] == [2, 4, 1]


def test_ngram_hashes_are_the_same_in_another_process():
    here = text_hashes("Free entry: WIN £1000 now!").tolist()
    code = (
        "from freemerge.merging.router import text_hashes; "
        "print(text_hashes('Free entry: WIN £1000 now!').tolist())"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(there.stdout) == here
    assert len(set(here)) > 50  # distinct n-grams of a 26-character text


def test_an_unsure_request_is_refused_alone_in_a_batch(tiny_routed_artifact, texts):
    engine = MergedEngine(tiny_routed_artifact, "cpu")
    inputs = texts["bbc_topic"][:3]
    requests = [
        engine.check("sms_spam", inputs),
        engine.check(None, inputs, min_confidence=1.0),
        engine.check(None, inputs, candidates=["debate_party", "sms_spam"]),
    ]
    answers = engine.classify_requests(requests, StageTimings())
    assert isinstance(answers[1], RequestError) and answers[1].status == 422
    assert [e["input"] for e in answers[1].body()["unrouted"]] == [0, 1, 2]
    assert pickle.loads(pickle.dumps(answers[1])).body() == answers[1].body()
    for k in (0, 2):
        alone = engine.classify_requests([requests[k]], StageTimings())[0]
        assert [(a.task, a.label) for a in answers[k]] == [(a.task, a.label) for a in alone]
    assert all(a.task in ("debate_party", "sms_spam") for a in answers[2])
