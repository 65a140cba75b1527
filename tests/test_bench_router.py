"""The router benchmark: its scores on known data, and a whole run on the tiny zoo."""

import numpy as np
import pytest
import torch

from freemerge.benchmarks.evaluate import task_texts
from freemerge.benchmarks.routing import (
    Split,
    confusion,
    coverage_curve,
    pick_default,
    routed_scores,
    router_markdown,
    run_router_bench,
)


def known_split():
    # 4 texts of task 0, 4 of task 1; the merged model is wrong on text 3, the individual on 7
    return Split(
        texts=[f"t{i}" for i in range(8)],
        task=np.array([0, 0, 0, 0, 1, 1, 1, 1]),
        merged_right=np.array([1, 1, 1, 0, 1, 1, 1, 1], dtype=bool),
        individual_right=np.array([1, 1, 1, 1, 1, 1, 1, 0], dtype=bool),
    )


def probabilities(chosen, confidence):
    rows = [[c, 1 - c] if k == 0 else [1 - c, c] for k, c in zip(chosen, confidence, strict=True)]
    return torch.tensor(rows)


def test_routed_scores_count_task_and_label():
    split = known_split()
    p = probabilities([0, 0, 1, 0, 1, 1, 1, 0], [0.9, 0.8, 0.6, 0.9, 0.9, 0.95, 0.7, 0.55])
    scores = routed_scores(p, split, ["a", "b"])
    assert scores["tasks"]["a"]["routing_accuracy"] == 0.75  # text 2 misrouted
    assert scores["tasks"]["a"]["routed_accuracy"] == 0.5  # text 3 routed but wrong label
    assert scores["tasks"]["b"]["routed_accuracy"] == 0.75  # text 7 misrouted
    assert scores["tasks"]["b"]["normalised"] == pytest.approx(0.75 / 0.75)
    assert scores["mean"]["routing_accuracy_all"] == 0.75
    assert confusion(p, split, ["a", "b"]) == [[3, 1], [1, 3]]


def test_coverage_keeps_the_confident_texts():
    split = known_split()
    p = probabilities([0, 0, 1, 0, 1, 1, 1, 0], [0.9, 0.8, 0.6, 0.9, 0.9, 0.95, 0.7, 0.55])
    rows = {row["threshold"]: row for row in coverage_curve(p, split)}
    assert rows[0.0]["coverage"] == 1.0 and rows[0.0]["routing_accuracy"] == 0.75
    assert rows[0.7]["coverage"] == 0.75  # 0.6 and 0.55 dropped: both misrouted
    assert rows[0.7]["routing_accuracy"] == 1.0
    # kept: texts 0, 1, 3 of a (the merged model wrong on 3), 4, 5, 6 of b; all routed right
    assert (
        rows[0.7]["normalised"]
        == rows[0.7]["true_task_normalised"]
        == pytest.approx((2 / 3 + 1) / 2)
    )
    assert rows[0.0]["true_task_normalised"] == pytest.approx((0.75 + 1 / 0.75) / 2)
    assert rows[0.99]["coverage"] == 0.0 and rows[0.99]["normalised"] is None
    at_90 = [row for row in coverage_curve(p, split) if row["at_90_coverage"]]
    assert len(at_90) == 1 and at_90[0]["coverage"] >= 0.875  # 7 of 8 texts at least


def test_the_default_is_the_best_within_the_cost_budget():
    def kind(accuracy, cost):
        return {
            "validation": {"mean": {"routing_accuracy_all": accuracy}},
            "cost_ms": {"max": cost},
        }

    kinds = {"cheap": kind(0.95, 0.4), "costly": kind(0.98, 20.0), "cheaper": kind(0.94, 0.1)}
    assert pick_default(kinds) == "cheap"
    assert pick_default({"costly": kind(0.98, 20.0)}) == "costly"  # none within: the best


def test_a_whole_run_on_the_tiny_zoo(tiny_zoo, tiny_routed_artifact):
    kinds = ["ngrams", "ngrams+embeddings", "experts"]
    result = run_router_bench(tiny_zoo, tiny_routed_artifact, kinds, rounds=1, examples_per_task=60)
    assert set(result["kinds"]) == set(kinds) and result["default"] in kinds
    for scores in result["kinds"].values():
        assert 0.5 < scores["test"]["mean"]["routing_accuracy_all"] <= 1
        assert scores["cost_ms"]["median"] > 0
    tests = sum(len(task_texts(task, "test")[0]) for task in result["tasks"])
    assert np.sum(result["confusion"]) == tests
    report = router_markdown(result, "freemerge bench router")
    assert "## Targets" in report and f"`{result['default']}` (default)" in report
