"""The load harness runs end to end on a tiny artifact and its output parses (no timing goals)."""

import json

import pytest

from freemerge.benchmarks.load import LoadPlan, run_load_bench
from freemerge.benchmarks.load_plots import load_plots
from freemerge.benchmarks.load_report import load_markdown
from freemerge.benchmarks.load_targets import targets
from freemerge.benchmarks.loadgen import task_sequence

# Two rounds (the real default is 3): enough to see the rounds recorded and paired, while the
# report does not judge a target from them. Few scenarios: each start of Ray costs seconds.
TINY_PLAN = LoadPlan(
    concurrencies=[2],
    mixes=["distinct"],
    mix_concurrency=2,
    rates=[5.0],
    requests=6,
    max_seconds=20.0,
    memory_tasks=[1, 4],
    separate_measured_up_to=3,
    merge_methods=["task arithmetic", "FREE, low-rank experts rank 4"],
    rounds=2,
)


def test_task_mixes():
    tasks = ["a", "b", "c"]
    assert task_sequence(tasks, "identical", 4, 0) == ["a"] * 4
    assert task_sequence(tasks, "distinct", 5, 0) == ["a", "b", "c", "a", "b"]
    skewed = task_sequence(tasks, "skewed", 3000, 0)
    assert skewed.count("a") > skewed.count("b") > skewed.count("c") > 0
    uniform = task_sequence(tasks, "uniform", 3000, 0)
    assert all(800 < uniform.count(t) < 1200 for t in tasks)
    with pytest.raises(ValueError, match="unknown mix 'zipf'"):
        task_sequence(tasks, "zipf", 3, 0)


# Slow: 364 s of a 21.6-min make test on a 2-core AMD EPYC without AVX-512 (make test-all runs it)
@pytest.mark.slow
def test_load_harness_runs_and_its_output_parses(tiny_zoo, tiny_routed_artifact, tmp_path):
    artifact = tiny_routed_artifact
    result = json.loads(json.dumps(run_load_bench(artifact, tiny_zoo.root, TINY_PLAN)))
    names = [c["name"] for c in result["contenders"]]
    assert names == [
        "merged",
        "separate (all loaded)",
        "separate, multiplexed (2 of 3 per replica)",
        "one model alone (floor)",
    ]
    for contender in result["contenders"]:
        assert contender["runs"] and all(run["errors"] == 0 for run in contender["runs"])
        assert contender["memory"]["process_resident_bytes"] > 0
        assert len(contender["memory_rounds"]) == 2
        for run in contender["runs"]:  # the server's metrics saw every answered request
            assert run["server"]["requests"] == len(run["latencies_ms"])
    _check_rounds(result)
    multiplexed = result["contenders"][2]
    assert (
        multiplexed["memory"]["backbone_bytes"]
        <= 2 * result["contenders"][3]["memory"]["backbone_bytes"] * 1.01
    )
    assert sum(run["server"]["model_loads"] for run in multiplexed["runs"]) > 0
    assert any(not run["tagged"] for run in result["contenders"][0]["runs"])
    _check_memory_and_costs(result)
    _check_report(result, tmp_path)


def _scenario(run):
    return (run["mode"], run.get("concurrency"), run.get("rate"), run["mix"], run["tagged"])


def _check_rounds(result):
    """Round 1 holds every scenario once; round 2 repeats only the targets' scenarios."""
    target_scenarios = {
        "merged": {("closed", 2, None, "uniform", True), ("closed", 1, None, "identical", True)},
        "separate": {("closed", 2, None, "uniform", True)},
        "multiplexed": {("closed", 2, None, "uniform", True)},
        "floor": {("closed", 1, None, "identical", True)},
    }
    for contender in result["contenders"]:
        rounds = {k: [_scenario(r) for r in contender["runs"] if r["round"] == k] for k in (1, 2)}
        assert len(rounds[1]) == len(set(rounds[1])) > len(rounds[2])
        assert set(rounds[2]) == target_scenarios[contender["key"]] <= set(rounds[1])
        assert len(rounds[2]) == len(target_scenarios[contender["key"]])


def _check_memory_and_costs(result):
    scaling = result["memory_scaling"]
    assert [(r["kind"], r["tasks"], r["computed"]) for r in scaling] == [
        ("merged", 1, False),
        ("separate", 1, False),
        ("merged", 4, False),
        ("separate", 4, True),
    ]
    assert scaling[3]["weights_bytes"] > 3 * scaling[2]["weights_bytes"]
    assert scaling[1]["rss_bytes"] > scaling[1]["weights_bytes"]  # paged in, and an interpreter
    cost = result["costs"]
    assert cost["timing"]["rounds"] == 3  # costs take at least 3 rounds whatever the plan says
    batch_1 = cost["batch_1"]
    assert len(batch_1["rounds_ms"]) == 3 and batch_1["forward_ms"] > 0
    assert batch_1["row_adapter_forward_ms"] > 0
    share = batch_1["row_adapter_share_of_forward"]
    assert share["min"] <= share["median"] <= share["max"] and len(share["per_round"]) == 3
    plain, free = result["merge_costs"]
    assert plain["wall_seconds"] > 0 and plain["peak_rss_bytes"] > plain["rss_after_imports_bytes"]
    # experts make the artifact bigger per task; heads alone are tiny
    assert min(free["per_task_bytes"].values()) > max(plain["per_task_bytes"].values()) > 0


def _check_report(result, tmp_path):
    rows = targets(result)
    assert len(rows) == 5
    for row in rows[:4]:  # the server targets: two rounds, paired, reported but not judged
        assert row["rounds"] == 2 and row["met"] is None and row["min"] <= row["max"]
    assert rows[4]["rounds"] == 3 and rows[4]["met"] in (True, False)  # costs: 3 rounds
    assert (
        rows[4]["per_round"]
        == result["costs"]["batch_1"]["row_adapter_share_of_forward"]["per_round"]
    )
    markdown = load_markdown(result, "freemerge bench load")
    assert "## Targets" in markdown and "| merged | 2 | closed |" in markdown
    assert "| FREE, low-rank experts rank 4 |" in markdown
    paths = load_plots(result, tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths) and len(paths) == 3
