"""The load report's target arithmetic and rendering, on synthetic results (no Ray, no model)."""

import math

import pytest

from freemerge.benchmarks.judging import MIN_ROUNDS, ratio_target, spread
from freemerge.benchmarks.load import (
    Contender,
    LoadPlan,
    resolved_settings,
    round_scenarios,
    target_scenarios,
)
from freemerge.benchmarks.load_report import load_markdown
from freemerge.benchmarks.load_targets import targets

MIB = 2**20


def test_a_range_that_straddles_the_threshold_is_not_met():
    row = ratio_target("throughput", [0.95, 1.10, 1.02], 1.0, higher_is_better=True)
    assert row["median"] == pytest.approx(1.02)  # the median clears it, the range does not
    assert (row["min"], row["max"]) == (pytest.approx(0.95), pytest.approx(1.10))
    assert row["met"] is False


def test_a_range_that_clears_the_threshold_entirely_is_met():
    row = ratio_target("throughput", [1.20, 1.01, 1.05], 1.0, higher_is_better=True)
    assert row["met"] is True
    assert row["median"] == pytest.approx(1.05)
    assert row["per_round"] == [1.20, 1.01, 1.05]  # in round order, not sorted
    assert ratio_target("x", [3.0, 3.5, 4.0], 3.0, higher_is_better=True)["met"] is True
    assert ratio_target("x", [2.99, 3.5, 4.0], 3.0, higher_is_better=True)["met"] is False


def test_the_median_of_an_even_number_of_rounds_is_the_mean_of_the_middle_two():
    row = ratio_target("x", [10.0, 1.0, 3.0, 2.0], 0.5, higher_is_better=True)
    assert row["median"] == pytest.approx(2.5)
    assert (row["min"], row["max"], row["rounds"]) == (1.0, 10.0, 4)


def test_lower_is_better_targets_need_the_whole_range_below():
    # tagged p50 within 1.10x: inclusive
    assert ratio_target("p50", [1.02, 1.08, 1.10], 1.10, higher_is_better=False)["met"] is True
    straddles = ratio_target("p50", [0.90, 1.12, 1.01], 1.10, higher_is_better=False)
    assert straddles["median"] == pytest.approx(1.01) and straddles["met"] is False
    # expert apply < 5%: strict
    apply = dict(higher_is_better=False, inclusive=False, unit="%")
    assert ratio_target("apply", [0.01, 0.049, 0.02], 0.05, **apply)["met"] is True
    assert ratio_target("apply", [0.01, 0.05, 0.02], 0.05, **apply)["met"] is False
    assert ratio_target("apply", [0.01, 0.07, 0.02], 0.05, **apply)["met"] is False


def test_too_few_rounds_or_a_round_without_a_measurement_is_not_judged():
    assert MIN_ROUNDS == 3
    clears = ratio_target("x", [2.0, 2.0], 1.0, higher_is_better=True)
    assert clears["met"] is None and clears["median"] == 2.0
    assert ratio_target("x", [], 1.0, higher_is_better=True)["met"] is None
    assert ratio_target("x", [], 1.0, higher_is_better=True)["median"] is None
    assert ratio_target("x", [2.0, float("nan"), 2.0], 1.0, higher_is_better=True)["met"] is None
    assert ratio_target("x", [2.0, math.inf, 2.0], 1.0, higher_is_better=True)["met"] is None


def test_spread():
    assert spread([3, 1, 2]) == {
        "per_round": [3.0, 1.0, 2.0],
        "median": 2.0,
        "min": 1.0,
        "max": 3.0,
    }
    assert spread([])["median"] is None


def test_round_one_runs_the_targets_first_and_later_rounds_only_them():
    plan = LoadPlan(
        concurrencies=[1, 4], mixes=["uniform", "skewed"], mix_concurrency=4, rates=[5.0]
    )
    merged = Contender("merged", "merged", {}, ["a", "b"], {}, routed=True)
    first, later = round_scenarios(merged, plan, 1), round_scenarios(merged, plan, 2)
    assert later == target_scenarios(merged, plan) == first[:2]
    assert later == [
        {"mode": "closed", "concurrency": 4, "mix": "uniform", "tagged": True},
        {"mode": "closed", "concurrency": 1, "mix": "identical", "tagged": True},
    ]
    assert len(first) == len({str(s) for s in first})  # the sweep does not repeat a target run
    assert {"mode": "closed", "concurrency": 4, "mix": "uniform", "tagged": False} in first
    assert {"mode": "open", "rate": 5.0, "mix": "uniform", "tagged": True} in first
    floor = Contender("floor", "floor", {}, ["a"], {})
    assert round_scenarios(floor, plan, 3) == [_closed(1, "identical")]


def test_resolved_settings_are_serving_defaults_plus_the_bench_overrides():
    settings = resolved_settings()
    assert settings["cpus_per_replica"] == 2
    assert settings["max_batch_size"] == 16 and settings["device"] == "auto"
    assert not {"artifact", "zoo", "tasks", "models_per_replica"} & set(settings)


def _closed(concurrency, mix, tagged=True):
    return {"mode": "closed", "concurrency": concurrency, "mix": mix, "tagged": tagged}


def _run(round_number, scenario, rps, p50, loads=0):
    return {
        **scenario,
        "round": round_number,
        "requests": 20,
        "errors": 0,
        "seconds": 1.0,
        "throughput_rps": rps,
        "p50_ms": p50,
        "p90_ms": p50 * 1.5,
        "p99_ms": p50 * 2,
        "latencies_ms": [p50] * 20,
        "server": {
            "requests": 20,
            "p50_ms_bucket": 50.0,
            "p99_ms_bucket": 100.0,
            "batch_p50_texts_bucket": 2.0,
            "model_loads": loads,
        },
    }


def _memory(backbone, experts=0):
    return {
        "process_resident_bytes": 2 * backbone,
        "backbone_bytes": backbone,
        "resident_expert_bytes": experts,
        "pss_bytes": None,
    }


def _contender(key, name, runs, memory):
    return {
        "key": key,
        "name": name,
        "options": {},
        "tasks": ["a", "b"],
        "runs": runs,
        "memory": memory[0],
        "memory_rounds": memory,
    }


UNIFORM, ALONE = _closed(4, "uniform"), _closed(1, "identical")
# Throughput per round: the median ratio clears 1.0, round 2 does not. The p50s drift a lot
# between rounds, but merged / floor of the same round is 1.05 every time.
MERGED_RPS, SEPARATE_RPS, MUX_RPS = [100.0, 50.0, 80.0], [90.0, 55.0, 70.0], [20.0, 10.0, 15.0]
MERGED_P50, FLOOR_P50 = [10.5, 21.0, 31.5], [10.0, 20.0, 30.0]


def synthetic_result(rounds=3):
    merged_runs, separate_runs, mux_runs, floor_runs = [], [], [], []
    for k in range(rounds):
        merged_runs += [
            _run(k + 1, UNIFORM, MERGED_RPS[k], 40.0),
            _run(k + 1, ALONE, 9, MERGED_P50[k]),
        ]
        separate_runs.append(_run(k + 1, UNIFORM, SEPARATE_RPS[k], 45.0))
        mux_runs.append(_run(k + 1, UNIFORM, MUX_RPS[k], 400.0, loads=7))
        floor_runs.append(_run(k + 1, ALONE, 10, FLOOR_P50[k]))
    merged_runs.append(_run(1, _closed(4, "uniform", tagged=False), 70.0, 50.0))
    shares = [0.02, 0.03, 0.06]
    batch = {
        "forward_ms": 10.0,
        "expert_apply_restore_ms": 0.5,
        "row_adapter_forward_ms": 10.3,
        "rounds_ms": [
            {"forward": 9.0 + k, "expert_apply_restore": 0.5, "row_adapter_forward": 10.3}
            for k in range(3)
        ],
        "apply_share_of_forward": spread([0.05, 0.05, 0.06]),
        "row_adapter_share_of_forward": spread(shares),
    }
    return {
        "machine": {
            "cpus": 2,
            "processor": "x86_64",
            "memory_gib": 8,
            "accelerator": "none (CPU only)",
            "python": "3.12",
            "torch": "2",
            "date_utc": "2025-01-01 00:00",
        },
        "settings": resolved_settings(),
        "plan": {"mix_concurrency": 4, "rounds": rounds},
        "wall_seconds": 600,
        "contenders": [
            _contender("merged", "merged", merged_runs, [_memory(100 * MIB, 5 * MIB)] * rounds),
            _contender(
                "separate", "separate (all loaded)", separate_runs, [_memory(300 * MIB)] * rounds
            ),
            _contender(
                "multiplexed", "separate, multiplexed", mux_runs, [_memory(200 * MIB)] * rounds
            ),
            _contender(
                "floor", "one model alone (floor)", floor_runs, [_memory(100 * MIB)] * rounds
            ),
        ],
        "memory_scaling": [
            {"kind": "merged", "tasks": 1, "weights_bytes": 100 * MIB, "rss_bytes": 300 * MIB},
            {
                "kind": "separate",
                "tasks": 1,
                "weights_bytes": 100 * MIB,
                "rss_bytes": 310 * MIB,
                "computed": False,
            },
        ],
        "costs": {
            "timing": {"repeats": 30, "rounds": 3},
            "batch_1": batch,
            "batch_32": batch,
            "router": {
                "tagged_ms": 11.0,
                "untagged_ms": 14.0,
                "router_overhead_ms": spread([3, 3, 3]),
            },
        },
        "merge_costs": [
            {
                "name": "task arithmetic",
                "wall_seconds": 2.0,
                "peak_rss_bytes": 900 * MIB,
                "artifact_bytes": 100 * MIB,
                "per_task_bytes": {"a": 2048},
                "rss_after_imports_bytes": 400 * MIB,
            }
        ],
    }


def test_targets_pair_the_contenders_round_by_round():
    rows = {
        row["target"].split(" ")[0] + str(row["threshold"]): row
        for row in targets(synthetic_result())
    }
    memory = rows["replica1.15"]
    assert memory["per_round"] == [pytest.approx(1.05)] * 3 and memory["met"] is True
    throughput = rows["throughput1.0"]
    assert throughput["per_round"] == pytest.approx(
        [a / b for a, b in zip(MERGED_RPS, SEPARATE_RPS, strict=True)]
    )
    assert throughput["median"] > 1.0 and throughput["met"] is False
    assert "80.0 vs 70.0 req/s" in throughput["detail"]  # the medians of each side
    multiplexed = rows["throughput3.0"]
    assert multiplexed["min"] == pytest.approx(5.0) and multiplexed["met"] is True
    assert "21 model loads in 60 requests" in multiplexed["detail"]
    p50 = rows["tagged1.1"]  # merged round k against the floor's round k, not across rounds
    assert p50["per_round"] == pytest.approx([1.05, 1.05, 1.05])
    assert p50["met"] is True


def test_the_apply_target_reads_the_costs_tables_numbers():
    result = synthetic_result()
    (apply,) = [row for row in targets(result) if row["target"].startswith("expert apply")]
    assert (
        apply["per_round"]
        == result["costs"]["batch_1"]["row_adapter_share_of_forward"]["per_round"]
    )
    assert apply["median"] == pytest.approx(0.03) and apply["met"] is False  # round 3: 6%
    markdown = load_markdown(result, "freemerge bench load")
    assert "| row adapters, extra over a plain forward, batch 1 | 3.0% | 2.0%..6.0% |" in markdown
    assert "| 3 | 2.0%, 3.0%, 6.0% | 3.0% | 2.0%..6.0% | no |" in markdown
    del result["costs"]["batch_1"]["row_adapter_share_of_forward"]  # sparse experts: in place
    (apply,) = [row for row in targets(result) if row["target"].startswith("expert apply")]
    assert apply["median"] == pytest.approx(0.05) and apply["met"] is False


def test_load_markdown_renders_the_rounds():
    markdown = load_markdown(synthetic_result(), "freemerge bench load")
    assert "## Targets" in markdown and "3 rounds" in markdown
    assert "| target | measured (medians) | rounds | per round | median | range | met |" in markdown
    throughput = next(
        line for line in markdown.splitlines() if line.startswith("| throughput >= the")
    )
    assert "| 1.11x, 0.91x, 1.14x | 1.11x | 0.91x..1.14x | no |" in throughput
    p50 = next(line for line in markdown.splitlines() if line.startswith("| tagged p50"))
    assert p50.endswith("| 1.05x | 1.05x..1.05x | yes |")
    for round_number in (1, 2, 3):
        assert f"| merged | {round_number} | closed | 4 | uniform | True |" in markdown
    assert "| merged | 1 | closed | 4 | uniform | False |" in markdown
    assert "| plain forward, batch 32 | 10.00 ms | 9.00 ms..11.00 ms |" in markdown
    assert "| router overhead | 3.00 ms | 3.00 ms..3.00 ms |" in markdown
    assert '"cpus_per_replica": 2' in markdown and "| task arithmetic |" in markdown


def test_two_rounds_are_reported_but_not_judged():
    markdown = load_markdown(synthetic_result(rounds=2), "freemerge bench load")
    for row in targets(synthetic_result(rounds=2))[:4]:
        assert row["rounds"] == 2 and row["met"] is None
    line = next(line for line in markdown.splitlines() if line.startswith("| throughput >= the"))
    assert line.endswith("| - |")
