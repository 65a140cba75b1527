"""``freemerge bench serve``: the served rate against the engine's own rate on the same cores.

Each round measures the engine alone (``MergedEngine.classify_requests`` in a fresh process,
no HTTP; 1 and 16 requests per call), then the server (started fresh: Ray's proxy, a front, a
model replica) at 1, 4, 16 and 64 closed-loop clients: one short tagged text per request,
tasks mixed. Per run: the rate, p50 and p99, the texts per batch the model ran, and the CPU
each process spent per answered request (from /proc). Targets are judged on the per-round
ratios, met only when the whole range clears them.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import psutil

from freemerge.benchmarks.load import (
    MIN_ROUNDS,
    SERVER_SETTINGS,
    contender_texts,
    ratio_target,
    server_side,
    spread,
)
from freemerge.benchmarks.loadgen import LoadSpec, run_load_in_process
from freemerge.benchmarks.machine import describe_machine, machine_line
from freemerge.benchmarks.spawn import run_in_child
from freemerge.merging.artifact import open_artifact
from freemerge.serving.local import free_port, start_local, stop_local
from freemerge.serving.metrics import scrape

CLIENTS = (1, 4, 16, 64)
PER_CALL = (1, 16)
ROLES = {"proxy": "ProxyActor", "front": "ClassifierServer", "model": "ModelReplica"}
SHORT = (40, 120)  # characters of the texts sent


def short_texts(tasks: list[str]) -> dict[str, list[str]]:
    """Each task's test texts of 40 to 120 characters (all of them if none is that short)."""
    pools = contender_texts(tasks, 400)
    return {t: [x for x in v if SHORT[0] <= len(x) <= SHORT[1]] or v for t, v in pools.items()}


def engine_rate(artifact: str, texts: dict, per_call: int, total: int, threads: int) -> float:
    """Texts per second of the engine alone, ``per_call`` one-text requests per call."""
    import torch

    from freemerge.serving.engine import MergedEngine
    from freemerge.serving.runtime import StageTimings

    torch.set_num_threads(threads)
    engine, rng = MergedEngine(Path(artifact), "cpu"), random.Random(per_call)
    tasks = list(texts)

    def requests() -> list:
        chosen = [rng.choice(tasks) for _ in range(per_call)]
        return [engine.check(task, [rng.choice(texts[task])]) for task in chosen]

    engine.classify_requests(requests(), StageTimings())  # warm-up
    start = time.perf_counter()
    for _ in range(total // per_call):
        engine.classify_requests(requests(), StageTimings())
    return (total // per_call) * per_call / (time.perf_counter() - start)


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


def served_runs(artifact: Path, texts: dict, requests: int, round_number: int) -> list[dict]:
    """Start the server, then one closed-loop run per client count; stop it."""
    port, metrics_port = free_port(), free_port()
    start_local(
        {**SERVER_SETTINGS, "artifact": str(artifact)},
        port=port,
        metrics_port=metrics_port,
        metrics_interval_ms=1000,
    )
    url, metrics = (
        f"http://127.0.0.1:{port}/v1/classify",
        f"http://127.0.0.1:{metrics_port}/metrics",
    )
    tasks, runs = list(texts), []
    try:
        warm = LoadSpec(url=url, tasks=tasks, texts=texts, concurrency=4, requests=40)
        run_load_in_process(warm)
        for clients in CLIENTS:
            spec = LoadSpec(
                url=url, tasks=tasks, texts=texts, concurrency=clients,
                requests=max(requests, 4 * clients), max_seconds=60.0, seed=round_number,
            )  # fmt: skip
            before, cpu_before = scrape(metrics), cpu_seconds()
            summary = run_load_in_process(spec).summary()
            cpu_after, answered = cpu_seconds(), len(summary["latencies_ms"])
            server = server_side(before, metrics, answered)
            runs.append({
                "round": round_number, "clients": clients,
                "rate": summary["throughput_rps"], "errors": summary["errors"],
                "p50_ms": summary["p50_ms"], "p99_ms": summary["p99_ms"],
                "batch_p50_texts": server["batch_p50_texts_bucket"],
                "cpu_ms_per_request": {
                    role: 1000 * (cpu_after[role] - cpu_before[role]) / max(answered, 1)
                    for role in ROLES
                },
            })  # fmt: skip
            print(f"  round {round_number}, {clients} clients: {runs[-1]}", flush=True)
    finally:
        stop_local()
    return runs


def run_serve_bench(artifact: Path, rounds: int = MIN_ROUNDS, requests: int = 300) -> dict:
    """Engine and server in interleaved rounds (engine, served, engine, served, ...)."""
    tasks = list(open_artifact(artifact, verify=False).tasks)
    texts = short_texts(tasks)
    threads = int(SERVER_SETTINGS["cpus_per_replica"])
    engine, served = [], []
    for round_number in range(1, rounds + 1):
        for per_call in PER_CALL:
            rate = run_in_child(engine_rate, str(artifact), texts, per_call, 320, threads)
            engine.append({"round": round_number, "per_call": per_call, "rate": rate})
            print(f"  round {round_number}, engine {per_call} per call: {rate:.1f}", flush=True)
        served += served_runs(artifact, texts, requests, round_number)
    return {
        "machine": describe_machine(),
        "settings": SERVER_SETTINGS,
        "artifact": str(artifact),
        "rounds": rounds,
        "engine": engine,
        "served": served,
    }


def _per_round(rows: list[dict], **match: object) -> list[dict]:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return sorted(found, key=lambda r: r["round"])


def serve_targets(result: dict) -> list[dict]:
    """Served rate at 16 and 64 clients against the engine's at 16 per call, per round; the
    median texts per batch at 16 clients."""
    engine = [r["rate"] for r in _per_round(result["engine"], per_call=16)]
    rows = []
    for clients in (16, 64):
        served = [r["rate"] for r in _per_round(result["served"], clients=clients)]
        ratios = [s / e if e else float("nan") for s, e in zip(served, engine, strict=True)]
        name = f"served rate at {clients} clients / engine at 16 per call"
        rows.append(ratio_target(name, ratios, 0.6, True, unit="%"))
    batches = [r["batch_p50_texts"] or 0.0 for r in _per_round(result["served"], clients=16)]
    rows.append(
        ratio_target("texts per batch at 16 clients (median, bucket bound)", batches, 8, True)
    )
    return rows


def _cell(values: list[float], spec: str = ".1f", unit: str = "") -> str:
    s = spread(values)
    if s["median"] is None:
        return "-"
    return f"{s['median']:{spec}}{unit} ({s['min']:{spec}}{unit} to {s['max']:{spec}}{unit})"


def serve_markdown(result: dict, command: str) -> str:
    lines = [
        "# Served rate against the engine's own rate",
        "",
        f"Machine: {machine_line(result['machine'])}. Command: `{command}`. "
        f"Artifact: `{result['artifact']}`; {result['rounds']} interleaved rounds "
        "(engine, then a freshly started server); medians with the range over rounds. "
        f"One tagged text of {SHORT[0]} to {SHORT[1]} characters per request, tasks mixed; "
        f"server settings `{result['settings']}`.",
        "",
        "| what | texts/s | p50 ms | p99 ms | texts per batch (p50) | CPU ms per request: "
        "proxy / front / model |",
        "|---|---|---|---|---|---|",
    ]
    for per_call in PER_CALL:
        rates = [r["rate"] for r in _per_round(result["engine"], per_call=per_call)]
        lines.append(f"| engine alone, {per_call} per call | {_cell(rates)} | | | | |")
    for clients in CLIENTS:
        runs = _per_round(result["served"], clients=clients)
        cpu = " / ".join(_cell([r["cpu_ms_per_request"][role] for r in runs]) for role in ROLES)
        lines.append(
            f"| served, {clients} clients | {_cell([r['rate'] for r in runs])} "
            f"| {_cell([r['p50_ms'] for r in runs], '.0f')} "
            f"| {_cell([r['p99_ms'] for r in runs], '.0f')} "
            f"| {_cell([r['batch_p50_texts'] or 0.0 for r in runs], '.0f')} | {cpu} |"
        )
    errors = sum(r["errors"] for r in result["served"])
    lines += ["", f"Failed requests in all runs: {errors}.", ""]
    lines += ["| target | median (range) | met |", "|---|---|---|"]
    for row in serve_targets(result):
        scale, unit = (100, "%") if row["unit"] == "%" else (1, "")
        values = [v * scale for v in row["per_round"]]
        threshold = f">= {row['threshold'] * scale:g}{unit}"
        met = {True: "yes", False: "no", None: "not judged"}[row["met"]]
        lines.append(f"| {row['target']} {threshold} | {_cell(values, unit=unit)} | {met} |")
    return "\n".join(lines) + "\n"
