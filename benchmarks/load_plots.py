"""The plots of ``freemerge bench load`` (PNG): throughput, latency CDF, weights per task."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from freemerge.benchmarks.judging import runs_by_round
from freemerge.benchmarks.load import closed_loop
from freemerge.benchmarks.memory import MIB


def load_plots(result: dict, out_dir: Path, prefix: str = "load_") -> list[Path]:
    """Throughput against concurrency, the latency CDF at the mix concurrency (both from
    round 1), and weights against the number of tasks (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, draw in (
        ("throughput", _plot_throughput),
        ("latency_cdf", _plot_latency_cdf),
        ("memory_scaling", _plot_memory_scaling),
    ):
        figure, axis = plt.subplots(figsize=(6, 4))
        draw(result, axis)
        axis.legend()
        figure.tight_layout()
        paths.append(out_dir / f"{prefix}{name}.png")
        figure.savefig(paths[-1], dpi=120)
    plt.close("all")
    return paths


def _plot_throughput(result: dict, axis: object) -> None:
    for contender in result["contenders"]:
        mix = "uniform" if len(contender["tasks"]) > 1 else "identical"
        points: dict[int, float] = {}
        for run in contender["runs"]:
            if run["round"] == 1 and run["mode"] == "closed" and run["mix"] == mix:
                if run.get("tagged", True):
                    points.setdefault(run["concurrency"], run["throughput_rps"])
        levels = sorted(points)
        axis.plot(levels, [points[c] for c in levels], marker="o", label=contender["name"])
    axis.set(xscale="log", xlabel="concurrent clients", ylabel="requests / s", title="Throughput")


def _plot_latency_cdf(result: dict, axis: object) -> None:
    level = result["plan"]["mix_concurrency"]
    for contender in result["contenders"]:
        uniform = runs_by_round(contender["runs"], **closed_loop(level, "uniform"))
        identical = runs_by_round(contender["runs"], **closed_loop(level, "identical"))
        run = uniform.get(1) or identical.get(1)
        if run and run["latencies_ms"]:
            values = np.sort(run["latencies_ms"])
            axis.plot(values, np.arange(1, len(values) + 1) / len(values), label=contender["name"])
    axis.set(
        xlabel="latency (ms)",
        ylabel="fraction of requests",
        title=f"Latency CDF, {level} concurrent clients",
    )


def _plot_memory_scaling(result: dict, axis: object) -> None:
    for kind in ("merged", "separate"):
        rows = [r for r in result["memory_scaling"] if r["kind"] == kind]
        axis.plot(
            [r["tasks"] for r in rows],
            [r["weights_bytes"] / MIB for r in rows],
            marker="o",
            label=f"{kind} (weights)",
        )
    axis.set(
        xscale="log",
        yscale="log",
        xlabel="tasks N",
        ylabel="MiB",
        title="Weights held against tasks",
    )
