"""Autoscaling 1 -> 2 -> 1 and a rolling update under load, on the local Ray (slow)."""

import pytest

from freemerge.benchmarks.autoscale import autoscale_plot, run_autoscale_bench
from freemerge.merging.config import parse_config
from freemerge.merging.merge import run_merge


@pytest.mark.slow
def test_autoscaling_and_rolling_update(tiny_zoo, tmp_path):
    artifacts = []
    for name, scaling in (("a", 0.3), ("b", 0.6)):
        run_merge(
            parse_config(
                {"zoo": str(tiny_zoo.root), "method": "free", "parameters": {"scaling": scaling}}
            ),
            tmp_path / name,
            show_progress=False,
        )
        artifacts.append(tmp_path / name)
    result = run_autoscale_bench(*artifacts, load_seconds=25, concurrency=8, settle_seconds=60)
    scale, update = result["scale"], result["rolling_update"]
    assert scale["max_replicas_seen"] == 2
    assert scale["back_to_one"]
    assert scale["answers"]["failed"] == 0 and scale["answers"]["wrong"] == 0
    assert update["answers"]["failed"] == 0 and update["answers"]["wrong"] == 0
    assert update["last_version"] == update["new_version"]
    assert len(update["answers"]["versions"]) == 2
    assert autoscale_plot(result, tmp_path / "t.png").stat().st_size > 1000
