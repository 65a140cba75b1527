"""Figures over interleaved rounds and the targets judged on them (shared by every bench)."""

import math

import pytest

from freemerge.benchmarks.judging import (
    MIN_ROUNDS,
    clears,
    ratio,
    ratio_target,
    runs_by_round,
    spread,
)


def test_spread_keeps_the_rounds_in_order_with_their_median_and_range():
    assert spread([3, 1, 2, 10]) == {
        "per_round": [3.0, 1.0, 2.0, 10.0],
        "median": 2.5,
        "min": 1.0,
        "max": 10.0,
    }
    assert spread([]) == {"per_round": [], "median": None, "min": None, "max": None}


def test_a_range_clears_a_threshold_only_whole():
    straddles = spread([0.95, 1.10, 1.02])  # its median clears 1.0, its min does not
    assert not clears(straddles, 1.0, higher_is_better=True)
    assert clears(straddles, 1.10, higher_is_better=False)
    assert not clears(straddles, 1.05, higher_is_better=False)
    assert clears(spread([1.0, 1.2]), 1.0, higher_is_better=True)  # inclusive by default
    assert not clears(spread([1.0, 1.2]), 1.0, higher_is_better=True, inclusive=False)
    assert not clears(spread([0.01, 0.05]), 0.05, higher_is_better=False, inclusive=False)


def test_a_target_is_judged_on_its_whole_range_and_from_enough_rounds():
    assert MIN_ROUNDS == 3
    straddles = ratio_target("t", [0.95, 1.10, 1.02], 1.0, higher_is_better=True)
    assert straddles["median"] == pytest.approx(1.02) and straddles["met"] is False
    assert ratio_target("t", [1.2, 1.01, 1.05], 1.0, higher_is_better=True)["met"] is True
    assert ratio_target("t", [1.2, 1.05], 1.0, higher_is_better=True)["met"] is None
    assert ratio_target("t", [1.2, math.nan, 1.05], 1.0, higher_is_better=True)["met"] is None
    row = ratio_target("t", [0.02, 0.03, 0.04], 0.05, False, inclusive=False, unit="%")
    assert row["met"] is True
    assert {k: row[k] for k in ("target", "threshold", "higher_is_better", "unit", "rounds")} == {
        "target": "t",
        "threshold": 0.05,
        "higher_is_better": False,
        "unit": "%",
        "rounds": 3,
    }


def test_a_ratio_over_nothing_measured_is_nan():
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(3.0, 0))


def test_runs_by_round_takes_the_first_matching_run_of_each_round_in_round_order():
    runs = [
        {"round": 2, "mix": "uniform", "rate": 1},
        {"round": 1, "mix": "uniform", "rate": 2},
        {"round": 1, "mix": "skewed", "rate": 3},
        {"round": 2, "mix": "uniform", "rate": 4},
        {"round": 3, "rate": 5},  # no mix: matches no mix asked for
    ]
    found = runs_by_round(runs, mix="uniform")
    assert list(found) == [1, 2]
    assert [run["rate"] for run in found.values()] == [2, 1]
    assert [run["rate"] for run in runs_by_round(runs).values()] == [2, 1, 5]
    assert runs_by_round(runs, mix="distinct") == {}
