"""Router training, routing, softmax mixing and evaluation on a tiny artifact."""

import json

import numpy as np
import pytest
import torch

from freemerge.benchmarks.evaluate import evaluate_artifact, task_texts
from freemerge.merging.artifact import open_artifact, verify_artifact
from freemerge.merging.batching import Tokenized
from freemerge.merging.config import ConfigError, parse_config
from freemerge.merging.merge import run_merge
from freemerge.merging.router import load_router
from freemerge.merging.router_config import RouterConfig
from freemerge.serving.cli import main
from freemerge.serving.runtime import MergedClassifier, RouterMissingError


def routed_config(zoo, **router):
    return parse_config(
        {
            "zoo": str(zoo.root),
            "method": "free",
            "experts": {"kind": "sparse", "density": 0.05},
            "router": {"examples_per_task": 80, "epochs": 30, **router},
        }
    )


@pytest.fixture(scope="module")
def routed_model(tiny_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("routed") / "art"
    run_merge(routed_config(tiny_zoo), out, show_progress=False)
    return MergedClassifier(open_artifact(out))


def test_router_is_saved_in_the_artifact_and_covered_by_hashes(routed_model):
    root = routed_model.artifact.root
    files = routed_model.artifact.manifest["files"]
    assert "router.safetensors" in files and "router.json" in files
    assert verify_artifact(root) == []
    router, record = load_router(root)
    assert record["tasks"] == ["sms_spam", "bbc_topic", "debate_party"]  # the config order
    assert sorted(routed_model.tasks) == sorted(record["tasks"])
    assert record["metrics"]["examples"] == 240 and record["kind"] == RouterConfig.kind
    assert routed_model.artifact.manifest["router"]["held_out_accuracy"] > 0.6


def test_router_routes_held_out_texts_well_above_chance(routed_model):
    correct = total = 0
    for task in routed_model.router.tasks:
        texts, _ = task_texts(task, "validation")
        routes = routed_model.route(texts[:60])
        for route in routes:
            assert sum(route.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
            assert route.confidence == max(route.probabilities.values())
        correct += sum(route.task == task for route in routes)
        total += len(routes)
    assert correct / total > 0.6  # chance is 1/3


def test_routed_answer_equals_the_tagged_answer_for_the_routed_task(routed_model):
    texts = task_texts("bbc_topic", "test")[0][:10] + task_texts("sms_spam", "test")[0][:10]
    for answer, text in zip(routed_model.classify(texts), texts, strict=True):
        assert answer.routed and 0 < answer.router_confidence <= 1
        tagged = routed_model.classify([text], task=answer.task)[0]
        assert not tagged.routed and tagged.router_confidence is None
        assert tagged.label == answer.label
        assert tagged.scores == pytest.approx(answer.scores, abs=1e-5)


def test_softmax_mixing_with_one_hot_weights_is_the_single_expert(routed_model):
    texts = task_texts("debate_party", "test")[0][:8]
    tokens = Tokenized(routed_model.tokenizer, texts, 128)
    batch = tokens.padded(list(range(len(texts))), routed_model.device)
    with routed_model.mixture_applied({"debate_party": 1.0, "sms_spam": 0.0, "bbc_topic": 0.0}):
        mixed = routed_model.backbone(**batch).pooler_output
    with routed_model.expert_applied("debate_party"):
        single = routed_model.backbone(**batch).pooler_output
    assert torch.allclose(mixed, single, atol=1e-6)
    answers = routed_model.classify(texts, mixing="softmax")
    assert all(a.routed and a.label in routed_model.labels(a.task) for a in answers)


def test_untagged_input_without_a_router_is_refused(tiny_zoo, tmp_path):
    config = parse_config({"zoo": str(tiny_zoo.root), "method": "task_arithmetic"})
    run_merge(config, tmp_path / "art", show_progress=False)
    model = MergedClassifier(open_artifact(tmp_path / "art"))
    assert not (tmp_path / "art" / "router.json").exists()
    message = "no router, so a task is required; tasks: bbc_topic, debate_party, sms_spam"
    with pytest.raises(RouterMissingError, match=message):
        model.classify(["hello"])
    assert model.classify(["hello"], task="sms_spam")[0].label in ("ham", "spam")


def test_router_config_errors(tiny_zoo, tmp_path):
    with pytest.raises(
        ConfigError, match="router.data names 'imdb', which is not one of the models"
    ):
        routed_config(tiny_zoo, data={"imdb": "zoo"})
    with pytest.raises(ConfigError, match="file .*missing.jsonl for 'sms_spam' does not exist"):
        routed_config(tiny_zoo, data={"sms_spam": str(tmp_path / "missing.jsonl")})
    with pytest.raises(ConfigError, match="unknown key 'layers' in router"):
        routed_config(tiny_zoo, layers=3)
    with pytest.raises(ConfigError, match="router: unknown router kind 'tfidf'"):
        routed_config(tiny_zoo, kind="tfidf")
    with pytest.raises(ConfigError, match="router: router examples_per_task must be >= 1"):
        routed_config(tiny_zoo, examples_per_task=0)


def test_router_examples_from_a_jsonl_file(tiny_zoo, tmp_path):
    texts = task_texts("sms_spam", "train")[0][:40]
    path = tmp_path / "spam.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": "ham"}) for t in texts))
    config = routed_config(tiny_zoo, data={"sms_spam": str(path)})
    run_merge(config, tmp_path / "art", show_progress=False)
    _, record = load_router(tmp_path / "art")
    assert record["metrics"]["examples"] == 40 + 80 + 80


def test_eval_reports_true_task_routed_and_routing_accuracy(routed_model, tmp_path, capsys):
    result = evaluate_artifact(routed_model, "validation", show_progress=False)
    assert set(result["tasks"]) == {"sms_spam", "bbc_topic", "debate_party"}
    for scores in result["tasks"].values():
        assert set(scores) == {"accuracy", "routed_accuracy", "routing_accuracy"}
        assert scores["routed_accuracy"] <= min(scores["routing_accuracy"], 1.0)
    assert result["mean"]["accuracy"] == pytest.approx(
        np.mean([s["accuracy"] for s in result["tasks"].values()])
    )
    assert result["routed_seconds_per_text"] > 0
    out = tmp_path / "eval.json"
    assert (
        main(["eval", str(routed_model.artifact.root), "--split", "validation", "--out", str(out)])
        == 0
    )
    assert json.loads(out.read_text())["tasks"] == result["tasks"]
    assert "| mean |" in capsys.readouterr().out
