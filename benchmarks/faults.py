"""``freemerge bench faults``: what hostile clients, overload and lost replicas do to a server.

On a local Ray (two model replicas of one CPU each, loopback only), it tries every hostile
input with its status and time, one bad request among good ones sent at the same moment,
overload at four times the sustainable rate, and ``kill -9`` of a model replica under
closed-loop load (failed requests and the seconds until both replicas run again). Beside the
server, in fresh processes: the token budget's effect on a pass's memory and speed (how the
default was chosen) and the peak memory of the largest legal batch. ``--full`` adds a real
two-node cluster (:mod:`freemerge.benchmarks.cluster`) whose worker node is killed under load.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from freemerge.benchmarks.evaluate import task_texts
from freemerge.benchmarks.judging import spread
from freemerge.benchmarks.loadgen import LoadSpec, call, run_load_in_process
from freemerge.benchmarks.spawn import run_in_child
from freemerge.benchmarks.tables import markdown_table, median_and_range
from freemerge.merging.artifact import open_artifact
from freemerge.serving.settings import ServingOptions

REPLICA_TITLE = "ServeReplica:freemerge:ModelReplica"
FRONT_TITLE = "ServeReplica:freemerge:ClassifierServer"
MAX_TEXT = "market growth team player vote debate film plot great spam prize " * 160


@dataclass
class Case:
    """One hostile request: ``body`` is sent raw (None: a GET); ``expect`` its statuses."""

    name: str
    path: str = "/v1/classify"
    body: bytes | None = None
    expect: tuple[int, ...] = (400,)
    headers: dict[str, str] = field(default_factory=dict)


def _json(payload: object) -> bytes:
    return json.dumps(payload).encode()


def hostile_cases(options: ServingOptions, task: str) -> list[Case]:
    """Every kind of bad request the issue names, and the largest legal one."""
    too_many = options.max_items + 1
    return [
        Case("lone surrogate", body=_json({"task": task, "inputs": ["ok", "\ud800"]})),
        Case("unknown field (typo)", body=_json({"Task": task, "inputs": ["x"]})),
        Case("empty inputs", body=_json({"task": task, "inputs": []})),
        Case("inputs not a list", body=_json({"task": task, "inputs": "x"})),
        Case("200,000 non-strings", body=_json({"inputs": [1] * 200_000}), expect=(413,)),
        Case("4,000 non-strings", body=_json({"inputs": [1] * 4_000})),
        Case("50,000-deep nesting", body=b"[" * 50_000 + b"]" * 50_000),
        Case("invalid UTF-8", body=b'{"task": "x", "inputs": ["\xff\xfe"]}'),
        Case("not JSON", body=b"hello"),
        Case("3 MiB body", body=b" " * (3 << 20), expect=(413,)),
        Case("1 MB task name", body=_json({"task": "t" * 1_000_000, "inputs": ["x"]})),
        Case("unknown task", body=_json({"task": "no-such-task", "inputs": ["x"]}), expect=(404,)),
        Case(
            f"{too_many} texts",
            body=_json({"task": task, "inputs": ["x"] * too_many}),
            expect=(413,),
        ),
        Case(
            "a text over max_chars",
            body=_json({"task": task, "inputs": ["x" * (options.max_chars + 1)]}),
            expect=(413,),
        ),
        Case("unknown route", path="/v1/nowhere", expect=(404,)),
        Case("wrong method", path="/v1/classify", expect=(405,)),
        Case(
            "largest legal request",
            body=_json(
                {"task": task, "inputs": [MAX_TEXT[: options.max_chars]] * options.max_items}
            ),
            expect=(200,),
        ),
    ]


def try_cases(url: str, cases: list[Case], task: str) -> list[dict]:
    """Each case's status, time and error; and whether a plain request still succeeds."""
    rows = []
    for case in cases:
        start = time.perf_counter()
        status, answer = call(url + case.path, raw=case.body, headers=case.headers, timeout=120)
        seconds = time.perf_counter() - start
        after = call(url + "/v1/classify", {"task": task, "inputs": ["still there?"]})[0]
        error = (answer or {}).get("error", "") if isinstance(answer, dict) else ""
        rows.append(
            {
                "case": case.name,
                "status": status,
                "expected": list(case.expect),
                "ms": round(seconds * 1000, 1),
                "error": error[:100],
                "json_error": status == 200 or bool(error),
                "server_ok_after": after == 200,
            }
        )
    return rows


def statuses_at_once(url: str, bodies: list[dict], timeout: float = 120) -> list[int]:
    """The status of each of ``bodies``, all sent to classify at the same moment."""
    statuses: list[int] = [0] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def send(index: int) -> None:
        barrier.wait()
        statuses[index] = call(url + "/v1/classify", bodies[index], timeout=timeout)[0]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout + 60)
    return statuses


def batch_isolation(url: str, task: str, texts: list[str]) -> dict:
    """Fifteen good requests and one bad one, sent at the same moment: the statuses."""
    bodies = [{"task": task, "inputs": [t]} for t in texts[:15]]
    bodies.insert(7, {"task": task, "inputs": ["fine", "\ud800"]})
    statuses = statuses_at_once(url, bodies)
    good = [s for i, s in enumerate(statuses) if i != 7]
    return {"good_requests": len(good), "good_answered": good.count(200), "bad_status": statuses[7]}


def load_spec(url: str, bodies: list[dict], **kwargs: object) -> LoadSpec:
    return LoadSpec(url=url + "/v1/classify", tasks=[], texts={}, bodies=bodies, **kwargs)


def latency_summary(records: list[dict]) -> dict:
    """Count, p50 and p99 in ms of a set of load records."""
    latencies = np.array([r["latency"] for r in records]) * 1000
    if not len(latencies):
        return {"count": 0, "p50_ms": None, "p99_ms": None}
    return {
        "count": len(latencies),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
    }


def overload(url: str, bodies: list[dict], seconds: float = 15.0) -> dict:
    """The sustainable rate (closed loop, 8 clients), then open-loop arrivals at 4x it: what
    the accepted requests wait, how fast the rest are refused, and what went unanswered."""
    closed = run_load_in_process(
        load_spec(url, bodies, concurrency=8, requests=100_000, max_seconds=seconds)
    )
    rate = len(closed.latencies) / closed.seconds
    spec = load_spec(url, bodies, mode="open", rate=4 * rate, requests=100_000, max_seconds=seconds)
    records = run_load_in_process(spec).records
    by_status: dict[str, int] = {}
    for record in records:
        by_status[str(record["status"])] = by_status.get(str(record["status"]), 0) + 1
    return {
        "sustainable_rps": round(rate, 1),
        "at_capacity": latency_summary([r for r in closed.records if r["status"] == 200]),
        "offered_rps": round(4 * rate, 1),
        "statuses": by_status,
        "accepted": latency_summary([r for r in records if r["status"] == 200]),
        "refused": latency_summary([r for r in records if r["status"] == 503]),
        "unanswered": sum(1 for r in records if r["status"] not in (200, 503)),
    }


def pids_matching(*needles: str) -> list[int]:
    """PIDs of this machine's processes whose command line holds every one of ``needles``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(needle in line for needle in needles):
            pids.append(int(entry.name))
    return sorted(pids)


def replica_pids() -> list[int]:
    """PIDs of this machine's model replica processes (Ray titles them by deployment)."""
    return pids_matching(REPLICA_TITLE)


def peak_resident_mib(pid: int) -> float | None:
    """A process's peak resident memory (VmHWM) in MiB, None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def replica_kill(
    url: str,
    bodies: list[dict],
    replicas: int,
    clients: int = 16,
    seconds: float = 30.0,
    title: str = REPLICA_TITLE,
) -> dict:
    """``kill -9`` of one replica of a deployment (``title``: the model replicas', or
    :data:`FRONT_TITLE` for the fronts') a third into closed-loop load: failed requests, and
    the seconds from the kill until ``replicas`` such processes run again."""
    victim = pids_matching(title)[0]

    def recovered() -> bool:
        alive = [p for p in pids_matching(title) if p != victim]
        return len(alive) >= replicas and _ready(url)

    spec = load_spec(url, bodies, concurrency=clients, requests=100_000, max_seconds=seconds)
    return kill_under_load(spec, lambda: os.kill(victim, signal.SIGKILL), recovered, seconds * 3)


def kill_under_load(
    spec: LoadSpec,
    kill: Callable[[], None],
    recovered: Callable[[], bool],
    wait_s: float,
    poll_s: float = 0.25,
) -> dict:
    """Closed-loop load from a separate process, ``kill()`` a third into it, then polling
    ``recovered()`` for up to ``wait_s``: :func:`kill_summary` of the load and the seconds
    from the kill until recovered."""
    outcome: dict = {}
    load = threading.Thread(target=lambda: outcome.update(result=run_load_in_process(spec)))
    load.start()
    time.sleep(spec.max_seconds / 3)
    killed = time.perf_counter()
    kill()
    back = None
    while time.perf_counter() - killed < wait_s:
        if recovered():
            back = time.perf_counter() - killed
            break
        time.sleep(poll_s)
    load.join()
    return kill_summary(outcome["result"].records, spec.concurrency, back)


def kill_summary(records: list[dict], clients: int, back: float | None) -> dict:
    """Failed requests of a kill scenario's load, and the seconds until capacity came back."""
    failed = [r for r in records if r["status"] != 200]
    return {
        "clients": clients,
        "requests": len(records),
        "failed": len(failed),
        "failed_statuses": sorted({r["status"] for r in failed}),
        "seconds_until_replicas_back": None if back is None else round(back, 1),
        "answered": latency_summary([r for r in records if r["status"] == 200]),
    }


def _ready(url: str) -> bool:
    return call(url + "/readyz", timeout=5)[0] == 200


def largest_legal_traffic(url: str, options: ServingOptions, task: str) -> dict:
    """``max_batch_size`` clients at once, each sending ``max_items`` texts of ``max_chars``:
    the statuses, the slowest answer, and the model replicas' peak resident memory."""
    body = {"task": task, "inputs": [MAX_TEXT[: options.max_chars]] * options.max_items}
    clients = options.max_batch_size
    start = time.perf_counter()
    statuses = statuses_at_once(url, [body] * clients, timeout=600)
    peaks = [peak_resident_mib(pid) for pid in replica_pids()]
    return {
        "clients": clients,
        "texts_per_request": options.max_items,
        "chars_per_text": options.max_chars,
        "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "seconds": round(time.perf_counter() - start, 1),
        "replica_peak_resident_mib": [round(p, 1) for p in peaks if p is not None],
    }


def good_bodies(tasks: list[str], per_task: int = 4) -> list[dict]:
    """Small real requests: test texts of every task, one text each."""
    return [
        {"task": task, "inputs": [text[:600]]}
        for task in tasks
        for text in task_texts(task, "test")[0][:per_task]
    ]


def budget_run(artifact: str, budget: int | None, rows: int) -> dict:
    """In a fresh process: ``rows`` texts of the longest length through the engine with a
    token budget (None: no bound); seconds and peak resident memory (after a warm-up)."""
    import torch

    from freemerge.serving.engine import MergedEngine
    from freemerge.serving.requests import ClassifyRequest, StageTimings

    torch.set_num_threads(2)
    engine = MergedEngine(Path(artifact), "cpu", max_batch_tokens=budget or 10**12)
    task = engine.task_names[0]
    engine.classify_requests([ClassifyRequest(task, ["warm-up"] * 4, 0.0)], StageTimings())
    loaded = peak_resident_mib(os.getpid())
    start = time.perf_counter()
    engine.classify_requests([ClassifyRequest(task, [MAX_TEXT] * rows, 0.0)], StageTimings())
    seconds = time.perf_counter() - start
    return {
        "budget": budget,
        "rows": rows,
        "seconds": seconds,
        "tokens_per_s": rows * engine.model.max_length / seconds,
        "loaded_mib": loaded,
        "peak_mib": peak_resident_mib(os.getpid()),
    }


def budget_sweep(
    artifact: Path, budgets: tuple[int | None, ...], rows: int = 64, rounds: int = 3
) -> list[dict]:
    """Each budget in interleaved rounds (A B C A B C ...), each run in a fresh process."""
    runs = [
        run_in_child(budget_run, str(artifact), budget, rows, timeout=900)
        for _ in range(rounds)
        for budget in budgets
    ]
    table = []
    for budget in budgets:
        mine = [r for r in runs if r["budget"] == budget]
        table.append(
            {
                "budget": budget,
                "tokens_per_s": _spread([r["tokens_per_s"] for r in mine]),
                "peak_mib": _spread([r["peak_mib"] for r in mine]),
                "peak_over_loaded_mib": _spread([r["peak_mib"] - r["loaded_mib"] for r in mine]),
            }
        )
    return table


def _spread(values: list[float]) -> dict:
    """Median and range of the rounds' values, to 0.1."""
    return {key: round(value, 1) for key, value in spread(values).items() if key != "per_round"}


# Two model replicas of one CPU; a long request timeout, so that the largest legal traffic
# (some 500,000 tokens on two cores) is answered whole and its memory peak is the whole run's.
SERVER = {"device": "cpu", "replicas": 2, "cpus_per_replica": 1, "request_timeout_s": 300.0}
BUDGETS = (2048, 4096, 8192, 16384, 32768, None)
BUDGET_FIGURES = ("tokens_per_s", "peak_mib", "peak_over_loaded_mib")  # per budget, over rounds


def server_scenarios(artifact: Path, tasks: list[str], bodies: list[dict]) -> dict:
    """The scenarios against one local server (two model replicas), in a fixed order, the
    largest legal traffic last."""
    from freemerge.serving.local import free_port, start_local, stop_local

    options = ServingOptions.from_mapping({"artifact": str(artifact), **SERVER})
    port = free_port()
    start_local(dict(artifact=str(artifact), **SERVER), port=port, metrics_port=free_port())
    url = f"http://127.0.0.1:{port}"
    try:
        print("== hostile inputs", flush=True)
        hostile = try_cases(url, hostile_cases(options, tasks[0]), tasks[0])
        print("== batch isolation", flush=True)
        isolation = batch_isolation(url, tasks[0], [b["inputs"][0] for b in bodies] * 2)
        print("== overload", flush=True)
        overloaded = overload(url, bodies)
        print("== replica kill", flush=True)
        killed = replica_kill(url, bodies, options.replicas)
        print("== largest legal traffic", flush=True)
        largest = largest_legal_traffic(url, options, tasks[0])
    finally:
        stop_local()
    return {
        "server": {**SERVER, "max_queued_requests": options.max_queued_requests},
        "hostile_inputs": hostile,
        "batch_isolation": isolation,
        "overload": overloaded,
        "replica_kill": killed,
        "largest_legal_traffic": largest,
    }


# The overload scenario again with room for the front: one model replica of one CPU, so a
# core is left to the proxy, the front and the client, and a tighter limit of requests held.
HEADROOM = {"device": "cpu", "replicas": 1, "cpus_per_replica": 1, "max_queued_requests": 8}


def overload_with_headroom(artifact: Path, bodies: list[dict]) -> dict:
    """:func:`overload` against a server set up as :data:`HEADROOM`."""
    from freemerge.serving.local import free_port, start_local, stop_local

    port = free_port()
    start_local({"artifact": str(artifact), **HEADROOM}, port=port, metrics_port=free_port())
    try:
        return {
            "server": HEADROOM,
            **overload(f"http://127.0.0.1:{port}", bodies),
        }
    finally:
        stop_local()


def run_faults(artifact: Path, full: bool = False) -> dict:
    """Every scenario; with ``full`` also the two-node cluster's node kill."""
    from freemerge.benchmarks.machine import describe_machine

    result = {"machine": describe_machine(), "artifact": str(artifact)}
    print("== token budget sweep", flush=True)
    result["token_budget"] = budget_sweep(artifact, BUDGETS)
    tasks = list(open_artifact(artifact, verify=False).tasks)
    bodies = good_bodies(tasks)
    result.update(server_scenarios(artifact, tasks, bodies))
    print("== overload, a core left to the front", flush=True)
    result["overload_with_headroom"] = overload_with_headroom(artifact, bodies)
    if full:
        from freemerge.benchmarks.cluster import node_kill

        print("== node kill on a two-node cluster", flush=True)
        result["node_kill"] = node_kill(artifact, bodies)
    return result


def _kill_lines(title: str, kill: dict) -> list[str]:
    back = kill["seconds_until_replicas_back"]
    return [
        f"## {title}",
        "",
        f"{kill['clients']} clients in a closed loop; {kill['requests']} requests, "
        f"**{kill['failed']} failed** (statuses {kill['failed_statuses'] or 'none'}); "
        f"capacity back after **{'not within the wait' if back is None else f'{back} s'}**; "
        f"answered p50 {kill['answered']['p50_ms']} ms, p99 {kill['answered']['p99_ms']} ms.",
        "",
    ]


def faults_markdown(result: dict, command: str) -> str:
    """The report: every scenario's figures, in the order they ran."""
    from freemerge.benchmarks.machine import machine_line

    lines = [
        "# Fault benchmark",
        "",
        f"Machine: {machine_line(result['machine'])}. Command: `{command}`.",
        f"Server: {json.dumps(result['server'])}, every other option at its default.",
        "",
        *_hostile_lines(result["hostile_inputs"]),
        *_isolation_lines(result["batch_isolation"]),
        *_overload_lines(result["overload"]),
        *_overload_lines(
            result["overload_with_headroom"],
            ", a core left to the front",
            f"Server: {json.dumps(result['overload_with_headroom']['server'])}. ",
        ),
        *_kill_lines("A model replica killed under load (kill -9)", result["replica_kill"]),
        *_largest_lines(result["largest_legal_traffic"]),
        *_budget_lines(result["token_budget"]),
    ]
    if "node_kill" in result:
        lines += _kill_lines(
            "A worker node of a two-node cluster killed under load", result["node_kill"]
        )
    return "\n".join(lines)


def _hostile_lines(rows: list[dict]) -> list[str]:
    fives = sum(1 for r in rows if r["status"] >= 500 or r["status"] == 0)
    lines = [
        "## Hostile inputs",
        "",
        f"{len(rows)} requests; {fives} got a 5xx or no answer; the server answered a plain "
        f"request after each: {all(r['server_ok_after'] for r in rows)}.",
        "",
        *markdown_table(
            ["request", "status", "expected", "ms", "error"],
            [
                [r["case"], r["status"], r["expected"], r["ms"], r["error"].replace("|", "/")]
                for r in rows
            ],
        ),
    ]
    return lines + [""]


def _isolation_lines(isolation: dict) -> list[str]:
    return [
        "## One bad request among good ones",
        "",
        f"{isolation['good_answered']} of {isolation['good_requests']} good requests sent at the "
        f"same moment as a bad one answered 200; the bad one got {isolation['bad_status']}.",
        "",
    ]


def _overload_lines(over: dict, title: str = "", server: str = "") -> list[str]:
    return [
        f"## Overload at four times the sustainable rate{title}",
        "",
        f"{server}Sustainable (8 clients, closed loop): {over['sustainable_rps']} req/s, p50 "
        f"{over['at_capacity']['p50_ms']} ms, p99 {over['at_capacity']['p99_ms']} ms. Offered "
        f"{over['offered_rps']} req/s (open loop): statuses {over['statuses']}; accepted p50 "
        f"{over['accepted']['p50_ms']} ms, p99 {over['accepted']['p99_ms']} ms; refused (503) "
        f"p50 {over['refused']['p50_ms']} ms, p99 {over['refused']['p99_ms']} ms; "
        f"unanswered or other: {over['unanswered']}.",
        "",
    ]


def _largest_lines(largest: dict) -> list[str]:
    return [
        "## The largest legal traffic",
        "",
        f"{largest['clients']} clients at once, each {largest['texts_per_request']} texts of "
        f"{largest['chars_per_text']:,} characters: statuses {largest['statuses']} after "
        f"{largest['seconds']} s; model replicas' peak resident memory "
        f"{largest['replica_peak_resident_mib']} MiB.",
        "",
    ]


def _budget_lines(table: list[dict]) -> list[str]:
    lines = [
        "## Token budget per forward pass (one request of 64 texts of 512 tokens)",
        "",
        "Each budget in a fresh process, in interleaved rounds; median (min..max).",
        "",
        *markdown_table(
            ["budget (tokens)", "tokens/s", "peak MiB", "peak over loaded MiB"],
            [
                ["none" if row["budget"] is None else f"{row['budget']:,}"]
                + [median_and_range(row[key], ",.0f") for key in BUDGET_FIGURES]
                for row in table
            ],
        ),
    ]
    return lines + [""]


def write_fault_results(artifact: Path, out: Path, command: str, full: bool = False) -> str:
    """Run the bench; write ``faults.json`` and ``faults.md`` under ``out``."""
    from freemerge.merging.files import write_json_atomically, write_text_atomically

    result = run_faults(artifact, full)
    result["command"] = command
    markdown = faults_markdown(result, command)
    write_json_atomically(out / "faults.json", result)
    write_text_atomically(out / "faults.md", markdown)
    return markdown
