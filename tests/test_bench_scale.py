"""``bench scale``'s parts on the tiny zoo: the synthetic artifact, fetch timings per tier, the
memory child and the targets."""

import os

import pytest

from freemerge.benchmarks.scale import (
    _fetch_latency_child,
    _served_memory_child,
    build_scale_artifact,
    scale_targets,
    synthetic_name,
    texts_for,
    zipf_order,
)
from freemerge.merging.artifact import open_artifact, verify_artifact
from freemerge.merging.experts import load_expert


@pytest.fixture(scope="module")
def scaled(tiny_routed_artifact, tmp_path_factory):
    return build_scale_artifact(tiny_routed_artifact, 12, tmp_path_factory.mktemp("s") / "a")


def test_the_synthetic_artifact_verifies_and_says_what_is_synthetic(scaled, tiny_routed_artifact):
    assert verify_artifact(scaled) == []
    opened = open_artifact(scaled, verify=False)
    real = list(open_artifact(tiny_routed_artifact, verify=False).tasks)
    assert len(opened.tasks) == 12 and opened.manifest["router"] is None
    synthetic = [t for t, e in opened.tasks.items() if e.get("synthetic")]
    assert synthetic == [synthetic_name(i) for i in range(12 - len(real))]
    first = opened.tasks[synthetic_name(0)]
    like = real[0]
    made, model = (
        load_expert(scaled / first["expert"]),
        load_expert(scaled / f"experts/{like}.safetensors"),
    )
    assert made.settings == model.settings and set(made.factors) == set(model.factors)
    assert first["labels"] == opened.tasks[like]["labels"]
    # the head is the real task's file, linked; the backbone is shared with the source
    assert os.path.samefile(scaled / first["head"], scaled / f"heads/{like}.safetensors")
    backbone = "backbone/model.safetensors"
    assert os.path.samefile(scaled / backbone, tiny_routed_artifact / backbone)
    assert build_scale_artifact(tiny_routed_artifact, 12, scaled) == scaled  # reused


def test_fetch_timings_and_memory_are_measured(scaled, tiny_routed_artifact):
    fetch = _fetch_latency_child(str(scaled), 3)
    assert set(fetch) == {
        "disk (dropped from the page cache)",
        "disk (in the page cache)",
        "host -> device",
        "device hit",
    }
    assert all(q["samples"] == 3 and 0 < q["p50_ms"] <= q["max_ms"] for q in fetch.values())
    real = list(open_artifact(tiny_routed_artifact, verify=False).tasks)
    tasks = zipf_order(list(open_artifact(scaled, verify=False).tasks))
    served = _served_memory_child(str(scaled), tasks, texts_for(tasks, real, 4), 40)
    assert served["tasks"] == 12 and 1 < served["distinct_tasks_asked"] <= 12
    assert served["tiers"]["disk"]["hits"] == served["distinct_tasks_asked"]
    assert served["rss_bytes"] > served["expert_bytes_held"] > 0


def test_targets_are_met_only_when_every_round_clears_them():
    run = {"p50_ms": 10.0, "p99_ms": 20.0}
    result = {
        "memory": {"scale": {"rss_bytes": 3}, "plain": {"rss_bytes": 2}},
        "http": {
            "scale": [{"p50_ms": 12.0, "p99_ms": 30.0}, {"p50_ms": 13.0, "p99_ms": 50.0}],
            "six": [run, run],
        },
        "fetch": {"disk (dropped from the page cache)": {"p99_ms": 4.0}},
        "live": {"statuses": {"200": 10, "503": 1}, "add": {"answering_s": 12.0}},
    }
    met = {t["name"]: t["met"] for t in scale_targets(result)}
    assert met == {
        "resident memory, 1,000 tasks / one plain model": True,
        "p50, Zipf mix: 1,000 tasks / six tasks": False,  # 1.3x in the second round
        "p99, Zipf mix: 1,000 tasks / six tasks": False,  # 2.5x in the second round
        "cold expert fetch from disk, p99 (ms)": True,
        "failed requests while a task is added and one removed": False,
        "seconds until the added task answers": True,
    }
