"""The markdown reports of ``freemerge bench load``: the whole run's, and ``--costs-only``'s."""

from __future__ import annotations

import json

from freemerge.benchmarks.judging import MIN_ROUNDS, spread
from freemerge.benchmarks.load_targets import apply_target, targets
from freemerge.benchmarks.machine import machine_line
from freemerge.benchmarks.memory import MIB, replica_weights
from freemerge.benchmarks.tables import markdown_table, with_unit

COST_QUANTITIES = {
    "forward": "plain forward",
    "expert_apply_restore": "expert apply + restore in place (no forward)",
    "row_adapter_forward": "forward with row adapters",
    "served_forward": "forward as served (row adapters, or merged for a large one-task pass)",
}
COST_SHARES = {
    "apply_share_of_forward": "expert apply + restore in place, share of a plain forward",
    "row_adapter_share_of_forward": "row adapters, extra over a plain forward",
    "served_share_of_forward": "as served, extra over a plain forward",
}


def load_markdown(result: dict, command: str) -> str:
    """The whole run's report: targets, runs, replica memory, scaling and costs."""
    sections = (
        _header_lines(result, command),
        _target_lines(result),
        _run_lines(result),
        _replica_memory_lines(result),
        _scaling_lines(result),
        _cost_lines(result),
        _merge_cost_lines(result),
    )
    return "\n".join(line for lines in sections for line in lines) + "\n"


def costs_markdown(result: dict, command: str) -> str:
    """The report of ``bench load --costs-only``: the apply target and the costs table."""
    target = apply_target(result["costs"]["batch_1"])
    lines = [
        "# Costs of the expert path",
        "",
        f"Machine: {machine_line(result['machine'])}. Whole run: {result['wall_seconds']} s.",
        f"Artifact: `{result['artifact']}`. Command: `{command}`",
        "",
        f"Target: {target['target']}: {with_unit(target['median'], '%')} "
        f"({_range(target, '%')}), {'met' if target['met'] else 'not met'}.",
        *_cost_lines(result),
    ]
    return "\n".join(lines) + "\n"


def _range(row: dict, unit: str) -> str:
    if row["min"] is None:
        return "-"
    return f"{with_unit(row['min'], unit)}..{with_unit(row['max'], unit)}"


def _figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _header_lines(result: dict, command: str) -> list[str]:
    return [
        "# Load test: merged server against separate models",
        "",
        f"Machine: {machine_line(result['machine'])}. "
        f"Whole run: {result['wall_seconds'] / 60:.0f} min.",
        f"Server settings (every contender): `{json.dumps(result['settings'])}`.",
        "",
        f"Command: `{command}`",
    ]


def _target_lines(result: dict) -> list[str]:
    rows = []
    for row in targets(result):
        unit = row["unit"]
        per_round = ", ".join(with_unit(v, unit) for v in row["per_round"]) or "-"
        met = {True: "yes", False: "no", None: "-"}[row["met"]]
        median = with_unit(row["median"], unit)
        rows.append(
            [row["target"], row["detail"], row["rounds"], per_round, median, _range(row, unit), met]
        )
    header = ["target", "measured (medians)", "rounds", "per round", "median", "range", "met"]
    return [
        "",
        "## Targets",
        "",
        f"Each ratio is taken per round and given as the median and the range (min..max) "
        f"over the rounds. Server targets: {result['plan']['rounds']} rounds, each starting "
        "every contender in turn on this machine, a ratio pairing runs of the same round; "
        "costs: interleaved timings in one process (see Costs). A target is met only when "
        f"its whole range clears it; from fewer than {MIN_ROUNDS} rounds it is not judged (-).",
        "",
        *markdown_table(header, rows),
    ]


RUN_COLUMNS = [
    "contender",
    "round",
    "mode",
    "concurrency / rate",
    "mix",
    "tagged",
    "requests",
    "errors",
    "req/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "server p50 ms <=",
    "batch p50 <=",
    "loads",
]


def _run_lines(result: dict) -> list[str]:
    rows = [
        _run_cells(contender["name"], run)
        for contender in result["contenders"]
        for run in sorted(contender["runs"], key=lambda run: run["round"])
    ]
    return [
        "",
        "## Runs",
        "",
        "Client side, and what the server's Prometheus metrics saw (p50 as the histogram "
        "bucket's upper bound, texts per batch at the median, models loaded). Round 1 runs "
        "every scenario; later rounds only those the targets read.",
        "",
        *markdown_table(RUN_COLUMNS, rows),
    ]


def _run_cells(name: str, run: dict) -> list[object]:
    """One run's row: :data:`RUN_COLUMNS`."""
    level = run.get("concurrency") if run["mode"] == "closed" else f"{run.get('rate')}/s"
    server = run["server"]
    return [
        name,
        run["round"],
        run["mode"],
        level,
        run["mix"],
        run.get("tagged", True),
        run["requests"],
        run["errors"],
        f"{run['throughput_rps']:.1f}",
        f"{run['p50_ms']:.1f}",
        f"{run['p90_ms']:.1f}",
        f"{run['p99_ms']:.1f}",
        _figure(server["p50_ms_bucket"], ".0f"),
        _figure(server["batch_p50_texts_bucket"], ".0f"),
        server["model_loads"],
    ]


def _replica_memory_lines(result: dict) -> list[str]:
    rows = []
    for contender in result["contenders"]:
        memory = contender["memory"]
        pss = "-" if memory.get("pss_bytes") is None else f"{memory['pss_bytes'] / MIB:.0f}"
        rss, weights = memory["process_resident_bytes"] / MIB, replica_weights(memory) / MIB
        rows.append([contender["name"], f"{rss:.0f}", pss, f"{weights:.1f}"])
    header = ["contender", "resident (RSS) MiB", "PSS MiB", "weights MiB"]
    return ["", "## Replica memory", "", "After round 1's runs.", "", *markdown_table(header, rows)]


def _scaling_lines(result: dict) -> list[str]:
    rows = []
    scaling = result["memory_scaling"]
    for merged, separate in zip(scaling[::2], scaling[1::2], strict=True):
        rss = "-" if separate["rss_bytes"] is None else f"{separate['rss_bytes'] / MIB:.0f}"
        mark = " (computed from per-model bytes)" if separate["computed"] else ""
        rows.append(
            [
                merged["tasks"],
                f"{merged['weights_bytes'] / MIB:.1f}",
                f"{merged['rss_bytes'] / MIB:.0f}",
                f"{separate['weights_bytes'] / MIB:.1f}{mark}",
                rss,
            ]
        )
    header = [
        "tasks",
        "merged weights MiB",
        "merged RSS MiB",
        "separate weights MiB",
        "separate RSS MiB",
    ]
    return [
        "",
        "## Memory against the number of tasks",
        "",
        "Each N in a fresh process; resident memory read after one forward through every "
        "model (one classify for merged), so that the weights are paged in.",
        "",
        *markdown_table(header, rows),
    ]


def _cost_lines(result: dict) -> list[str]:
    timing = result["costs"].get("timing", {})
    return [
        "",
        "## Costs",
        "",
        f"One process; each quantity timed once, those of a group interleaved (one call of "
        f"each in turn), {timing.get('rounds', '?')} rounds of {timing.get('repeats', '?')} "
        "alternations. ms: the median of the rounds' medians; shares: one per round. The "
        "targets table reads the same shares.",
        "",
        *markdown_table(["what", "median", "range over rounds"], _cost_rows(result["costs"])),
    ]


def _cost_rows(cost: dict) -> list[list[str]]:
    """Per batch size the times (ms) and the shares of a plain forward; then the router's."""
    rows = []
    for batch in ("batch_1", "batch_32"):
        figures, size = cost[batch], batch.replace("_", " ")
        for name, label in COST_QUANTITIES.items():
            if f"{name}_ms" in figures:
                ms = spread([r[name] for r in figures["rounds_ms"]])
                rows.append([f"{label}, {size}", with_unit(ms["median"], "ms"), _range(ms, "ms")])
        for name, label in COST_SHARES.items():
            if name in figures:
                share = figures[name]
                rows.append(
                    [f"{label}, {size}", with_unit(share["median"], "%"), _range(share, "%")]
                )
    if "router" in cost:
        router = cost["router"]
        overhead = router["router_overhead_ms"]
        rows += [
            ["one text, tagged", with_unit(router["tagged_ms"], "ms"), ""],
            ["one text, untagged (router + forward)", with_unit(router["untagged_ms"], "ms"), ""],
            ["router overhead", with_unit(overhead["median"], "ms"), _range(overhead, "ms")],
        ]
        if "untagged_over_tagged" in router:  # runs before the router issue lack it
            ratio = router["untagged_over_tagged"]
            name = "untagged / tagged, one text (target <= 1.10x)"
            rows.append([name, with_unit(ratio["median"], "x"), _range(ratio, "x")])
    return rows


def _merge_cost_lines(result: dict) -> list[str]:
    rows = []
    for row in result["merge_costs"]:
        per_task = max(row["per_task_bytes"].values()) / 1024
        rows.append(
            [
                row["name"],
                f"{row['wall_seconds']:.1f}",
                f"{row['peak_rss_bytes'] / MIB:.0f}",
                f"{row['artifact_bytes'] / MIB:.1f}",
                f"{per_task:.0f}",
                f"{row['rss_after_imports_bytes'] / MIB:.0f}",
            ]
        )
    header = [
        "method",
        "wall s",
        "peak RSS MiB",
        "artifact MiB",
        "per task KiB",
        "RSS after imports MiB",
    ]
    return [
        "",
        "## Merge costs",
        "",
        "Each merge in a fresh process; peak resident memory includes the interpreter with "
        "torch and transformers (the last column). Artifact bytes per task: expert + head.",
        "",
        *markdown_table(header, rows),
    ]
