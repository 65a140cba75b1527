"""``freemerge bench scale``: a thousand tasks on one replica, and tasks added and removed live.

The real zoo's artifact (``configs/free.yaml``; its router left out, as the synthetic tasks have
no texts) plus synthetic tasks up to 1,000: each a low-rank expert with the layers, rank and
dtype of a real task's and random factors, and a link to that task's head. They are named
``synthetic-NNNN`` and marked ``"synthetic": true`` in the manifest: their answers mean nothing,
their costs are real. The six-task server is the same artifact with the real tasks alone.

1. memory: resident memory of a process that serves the 1,000 tasks (the engine, Zipf traffic
   through every tier, the default budgets) against one that serves one plain fine-tuned model
   the same texts, and one that serves the six tasks;
2. fetch latency per tier: from disk with the file dropped from the page cache first (cold) and
   with it cached, host memory to the device, and a device hit;
3. over HTTP, in interleaved rounds: the 1,000-task server on a Zipf mix over its tasks against
   the six-task server on a Zipf mix over its six, same client, same settings;
4. live: under load on the 1,000-task server, a task added (a zoo model under a new name) and a
   synthetic task removed by deploying the config again with another artifact in the
   deployments' ``user_config``; failed requests, and seconds until the new task answers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from freemerge.benchmarks.evaluate import task_texts
from freemerge.benchmarks.judging import clears, spread
from freemerge.benchmarks.load import SERVER_SETTINGS, Contender, LoadPlan, load_run
from freemerge.benchmarks.loadgen import LoadSpec, call, run_load_in_process
from freemerge.benchmarks.machine import describe_machine, machine_line
from freemerge.benchmarks.memory import MIB, replica_memory, synthetic_like
from freemerge.benchmarks.spawn import run_in_child
from freemerge.benchmarks.tables import markdown_table, median_and_range
from freemerge.merging.artifact import EXPERTS_FOLDER, open_artifact, verify_artifact
from freemerge.merging.experts import load_expert
from freemerge.merging.refit import verified_manifest, write_version
from freemerge.merging.task_edit import add_task, remove_task
from freemerge.merging.zoo_folder import Zoo
from freemerge.serving.local import deploy_app, free_port, start_local, stop_local

TASKS = 1000
ROUNDS = 3
CONCURRENCY = 16
ZIPF_A = 1.2  # the load generator's skewed mix
TRAFFIC_REQUESTS = 2000  # through the engine for the memory figures
FETCH_SAMPLES = 200  # per tier


def synthetic_name(i: int) -> str:
    return f"synthetic-{i:04d}"


def build_scale_artifact(source: Path, total: int, out: Path) -> Path:
    """``source``'s real tasks (no router) plus synthetic tasks up to ``total``, at ``out``
    (reused while it verifies)."""
    if out.exists() and not verify_artifact(out):
        return out
    manifest = verified_manifest(source)
    real = list(manifest["tasks"])
    experts = {task: load_expert(source / manifest["tasks"][task]["expert"]) for task in real}

    def edit(staged: Path, body: dict) -> None:
        body["router"] = None
        body["parameters"] = {**body["parameters"], "router": None}
        for i in range(total - len(real)):
            like, name = real[i % len(real)], synthetic_name(i)
            expert = synthetic_like(experts[like], seed=i)
            expert.save(staged / EXPERTS_FOLDER / f"{name}.safetensors")
            os.link(
                staged / "heads" / f"{like}.safetensors", staged / "heads" / f"{name}.safetensors"
            )
            body["tasks"][name] = {
                **manifest["tasks"][like],
                "head": f"heads/{name}.safetensors",
                "expert": f"{EXPERTS_FOLDER}/{name}.safetensors",
                "expert_bytes": expert.nbytes(),
                "source": f"synthetic: random factors shaped like {like}'s",
                "source_sha256": None,
                "synthetic": True,
            }

    if out.exists():
        import shutil

        shutil.rmtree(out)
    write_version(source, manifest, edit, out)
    return out


def zipf_order(tasks: list[str], seed: int = 0) -> list[str]:
    """The tasks in a fixed random order: the Zipf mix's most popular task is the first."""
    rng = np.random.default_rng(seed)
    return [tasks[i] for i in rng.permutation(len(tasks))]


def texts_for(tasks: list[str], real: list[str], count: int = 50) -> dict[str, list[str]]:
    """Test texts per task: a synthetic task gets those of the real task it is shaped like."""
    pools = {task: [t[:1000] for t in task_texts(task, "test")[0][:count]] for task in real}
    return {
        task: pools[task if task in pools else real[_index(task) % len(real)]] for task in tasks
    }


def _index(task: str) -> int:
    return int(task.rsplit("-", 1)[1])


def _served_memory_child(artifact: str, tasks: list[str], texts: dict, requests: int) -> dict:
    """Resident memory after ``requests`` one-text requests in batches of 8, Zipf over
    ``tasks``, through the engine with the default budgets; and its tier counts."""
    import torch

    from freemerge.benchmarks.loadgen import task_sequence
    from freemerge.serving.engine import MergedEngine, process_resident_bytes
    from freemerge.serving.requests import ClassifyRequest, StageTimings

    torch.set_num_threads(2)
    engine = MergedEngine(Path(artifact), "cpu")
    sequence = task_sequence(tasks, "skewed", requests, 0, ZIPF_A)
    for start in range(0, requests, 8):
        batch = [
            ClassifyRequest(t, [texts[t][k % len(texts[t])]], 0.0)
            for k, t in enumerate(sequence[start : start + 8])
        ]
        engine.classify_requests(batch, StageTimings())
    tiers = {tier: vars(counts) for tier, counts in engine.expert_tiers().items()}
    return {
        "tasks": len(tasks),
        "distinct_tasks_asked": len(set(sequence)),
        "rss_bytes": process_resident_bytes(),
        "expert_bytes_held": engine.model.expert_bytes(),
        "tiers": tiers,
    }


def _plain_memory_child(model_path: str, texts: list[str], requests: int) -> dict:
    """Resident memory of one plain fine-tuned model after ``requests`` texts in batches of 8."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from freemerge.serving.engine import process_resident_bytes

    torch.set_num_threads(2)
    model = AutoModelForSequenceClassification.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with torch.no_grad():
        for start in range(0, requests, 8):
            batch = [texts[k % len(texts)] for k in range(start, start + 8)]
            model(
                **tokenizer(
                    batch, padding=True, truncation=True, max_length=512, return_tensors="pt"
                )
            )
    return {"rss_bytes": process_resident_bytes()}


def memory(scale: Path, six: Path, zoo: Zoo, texts: dict) -> dict:
    real = list(zoo.tasks)
    tasks = zipf_order(list(open_artifact(scale, verify=False).tasks))
    first = zoo.tasks[real[0]]
    return {
        "scale": run_in_child(_served_memory_child, str(scale), tasks, texts, TRAFFIC_REQUESTS),
        "six": run_in_child(
            _served_memory_child, str(six), zipf_order(real), texts, TRAFFIC_REQUESTS
        ),
        "plain": run_in_child(
            _plain_memory_child, str(first.path), texts[real[0]], TRAFFIC_REQUESTS
        ),
    }


def _drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to drop ``path``'s cached pages, so the next read goes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _timed(function: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def _fetch_latency_child(artifact: str, samples: int) -> dict:
    """Seconds per fetch by tier, through the store with the default budgets."""
    import torch

    from freemerge.serving.expert_store import ExpertStore
    from freemerge.serving.settings import ServingOptions

    opened = open_artifact(Path(artifact), deferred=(EXPERTS_FOLDER,))
    store = ExpertStore(
        opened,
        torch.device("cpu"),
        torch.float32,
        ServingOptions.host_expert_bytes,
        ServingOptions.device_expert_bytes,
    )
    tasks = zipf_order(list(store.files), seed=1)
    samples = min(samples, (len(tasks) - 1) // 2)  # each task is fetched cold once
    store.get(tasks.pop())  # the first fetch's one-time costs are not a tier's
    cold, cached, to_device, hit = [], [], [], []
    for task in tasks[:samples]:
        _drop_from_page_cache(opened.path(store.files[task]))
        cold.append(_timed(store.prefetch, task))
    for task in tasks[samples : 2 * samples]:
        opened.path(store.files[task]).read_bytes()  # now in the page cache
        cached.append(_timed(store.prefetch, task))
    for task in tasks[:samples]:  # in host memory (the budget holds them): onto the device
        to_device.append(_timed(store.get, task))
        hit.append(_timed(store.get, task))
    return {
        "disk (dropped from the page cache)": _quantiles(cold),
        "disk (in the page cache)": _quantiles(cached),
        "host -> device": _quantiles(to_device),
        "device hit": _quantiles(hit),
    }


def _quantiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {
        "samples": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


def _serve_and_run(contender: Contender, scenario: dict, plan: LoadPlan) -> dict:
    """Start the contender, warm it with the same traffic (not kept), run, read its memory."""
    port, metrics_port = free_port(), free_port()
    start_local({**SERVER_SETTINGS, **contender.options}, port=port, metrics_port=metrics_port)
    base = f"http://127.0.0.1:{port}"
    endpoints = (f"{base}/v1/classify", f"http://127.0.0.1:{metrics_port}/metrics")
    try:
        load_run(contender, LoadPlan(requests=200, max_seconds=30.0), endpoints, scenario)
        run = load_run(contender, plan, endpoints, scenario)
        run["memory"] = replica_memory(base)
    finally:
        stop_local()
    return run


def http_rounds(contenders: list[Contender], rounds: int) -> dict[str, list[dict]]:
    """The contenders in turn, ``rounds`` times (A B A B ...), each on a Zipf mix over its own
    tasks at a fixed concurrency."""
    scenario = {"mode": "closed", "concurrency": CONCURRENCY, "mix": "skewed", "tagged": True}
    plan = LoadPlan(requests=800, max_seconds=40.0)
    runs: dict[str, list[dict]] = {c.key: [] for c in contenders}
    for round_number in range(1, rounds + 1):
        for contender in contenders:
            print(f"== round {round_number} of {rounds}: {contender.name}", flush=True)
            run = _serve_and_run(contender, scenario, plan)
            runs[contender.key].append({**run, "round": round_number})
    return runs


def _until(url: str, task: str, status: int, start: float, wait_s: float = 120.0) -> float | None:
    """Seconds from ``start`` until a request for ``task`` gets ``status`` (polled)."""
    while time.monotonic() < start + wait_s:
        got, _ = call(url, {"task": task, "inputs": ["a short text"]}, timeout=30)
        if got == status:
            return time.monotonic() - start
        time.sleep(0.2)
    return None


def live_update(scale: Path, zoo: Zoo, texts: dict, scratch: Path) -> dict:
    """Under load, add a task then remove one by deploying again with another artifact in the
    deployments' user_config; the load's failures and the seconds each change took."""
    real = list(zoo.tasks)
    added, removed = f"added-{real[0]}", synthetic_name(7)
    edits = {"add": time.perf_counter()}
    add_task(scale, added, zoo.tasks[real[0]].path, None, scratch / "v2")
    edits["add"] = time.perf_counter() - edits["add"]
    edits["remove"] = time.perf_counter()
    remove_task(scratch / "v2", removed, scratch / "v3")
    edits["remove"] = time.perf_counter() - edits["remove"]
    options = {**SERVER_SETTINGS, "artifact": str(scale)}
    port, metrics_port = free_port(), free_port()
    start_local(options, port=port, metrics_port=metrics_port, from_config=True)
    url = f"http://127.0.0.1:{port}/v1/classify"
    tasks = zipf_order([t for t in open_artifact(scale, verify=False).tasks if t != removed])
    spec = LoadSpec(url, tasks, texts, "skewed", concurrency=8, requests=20_000, max_seconds=70)
    outcome: dict = {}
    load = threading.Thread(target=lambda: outcome.update(result=run_load_in_process(spec)))
    try:
        load.start()
        time.sleep(10)
        start = time.monotonic()
        deploy_app(options, artifact=str(scratch / "v2"))
        add = {"deploy_s": time.monotonic() - start, "answering_s": _until(url, added, 200, start)}
        time.sleep(5)
        start = time.monotonic()
        deploy_app(options, artifact=str(scratch / "v3"))
        gone = {"deploy_s": time.monotonic() - start, "refused_s": _until(url, removed, 404, start)}
        load.join(120)
    finally:
        stop_local()
    summary = outcome["result"].summary()
    statuses = [r["status"] for r in outcome["result"].records]
    return {
        "added": added,
        "removed": removed,
        "edit_seconds": edits,
        "add": add,
        "remove": gone,
        "load": {k: v for k, v in summary.items() if k != "latencies_ms"},
        "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
    }


def run_scale_bench(source: Path, zoo: Zoo, cache_dir: Path, total: int, rounds: int) -> dict:
    """Every part of the bench on a ``total``-task artifact built from ``source``."""
    version = open_artifact(source, verify=False).version[:12]
    folder = cache_dir / "scale"
    start = time.perf_counter()
    scale = build_scale_artifact(source, total, folder / f"scale-{total}-{version}")
    built_s = time.perf_counter() - start
    six = build_scale_artifact(source, len(zoo.tasks), folder / f"scale-{len(zoo.tasks)}-{version}")
    real = list(zoo.tasks)
    tasks = zipf_order(list(open_artifact(scale, verify=False).tasks))
    texts = texts_for(tasks, real)
    texts[f"added-{real[0]}"] = texts[real[0]]
    result: dict = {
        "machine": describe_machine(),
        "tasks": total,
        "real_tasks": real,
        "synthetic_tasks": total - len(real),
        "artifact_build_s": built_s,
        "zipf_a": ZIPF_A,
    }
    result["memory"] = memory(scale, six, zoo, texts)
    result["fetch"] = run_in_child(_fetch_latency_child, str(scale), FETCH_SAMPLES)
    contenders = [
        Contender("scale", f"{total} tasks", {"artifact": str(scale)}, tasks, texts),
        Contender("six", f"{len(real)} tasks", {"artifact": str(six)}, zipf_order(real), texts),
    ]
    result["http"] = http_rounds(contenders, rounds)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="freemerge-scale-", dir=folder) as scratch:
        result["live"] = live_update(scale, zoo, texts, Path(scratch))
    result["targets"] = scale_targets(result)
    return result


def _ratio_target(name: str, values: list[float], limit: float) -> dict:
    """A target on per-round ratios: met when the whole range clears ``limit``."""
    spread_ = spread(values)
    return {
        "name": name,
        **spread_,
        "limit": limit,
        "met": clears(spread_, limit, higher_is_better=False),
    }


def _at_most(name: str, value: float | None, limit: float) -> dict:
    """A target on one measured value: met when it is at most ``limit`` (None: not met)."""
    return {
        "name": name,
        "value": value,
        "limit": limit,
        "met": value is not None and value <= limit,
    }


def scale_targets(result: dict) -> list[dict]:
    """The targets: memory against one plain model, latency against six tasks over rounds,
    the cold fetch, and the live update's failures and delay."""
    memory_ = result["memory"]
    rss = memory_["scale"]["rss_bytes"] / memory_["plain"]["rss_bytes"]
    scale_runs, six_runs = result["http"]["scale"], result["http"]["six"]
    pairs = list(zip(scale_runs, six_runs, strict=True))
    cold = result["fetch"]["disk (dropped from the page cache)"]["p99_ms"]
    live = result["live"]
    failed = sum(n for s, n in live["statuses"].items() if s != "200")
    return [
        _at_most("resident memory, 1,000 tasks / one plain model", rss, 2.0),
        _ratio_target(
            "p50, Zipf mix: 1,000 tasks / six tasks",
            [a["p50_ms"] / b["p50_ms"] for a, b in pairs],
            1.25,
        ),
        _ratio_target(
            "p99, Zipf mix: 1,000 tasks / six tasks",
            [a["p99_ms"] / b["p99_ms"] for a, b in pairs],
            2.0,
        ),
        _at_most("cold expert fetch from disk, p99 (ms)", cold, 5.0),
        _at_most("failed requests while a task is added and one removed", failed, 0),
        _at_most("seconds until the added task answers", live["add"]["answering_s"], 30.0),
    ]


def _target_cells(target: dict) -> list[str]:
    verdict = "met" if target["met"] else "not met"
    if "median" in target:
        value, limit = median_and_range(target, ".2f", "x"), f"<= {target['limit']:g}x"
    else:
        value = "none" if target["value"] is None else f"{target['value']:.3g}"
        limit = f"<= {target['limit']:g}"
    return [target["name"], value, limit, verdict]


def _memory_lines(memory_: dict) -> list[str]:
    rows = [
        [
            name,
            memory_[key]["tasks"],
            memory_[key]["distinct_tasks_asked"],
            f"{memory_[key]['rss_bytes'] / MIB:.0f} MiB",
            f"{memory_[key]['expert_bytes_held'] / MIB:.0f} MiB",
        ]
        for key, name in (("scale", "merged, 1,000 tasks"), ("six", "merged, six tasks"))
    ]
    rows.append(["one plain model", 1, 1, f"{memory_['plain']['rss_bytes'] / MIB:.0f} MiB", ""])
    header = [
        "process",
        "tasks",
        "distinct tasks asked",
        "resident",
        "experts held (host + device)",
    ]
    tiers = memory_["scale"]["tiers"]
    return [
        *markdown_table(header, rows),
        "",
        "Tiers of the 1,000-task process after the traffic: "
        + "; ".join(
            f"{tier}: {t['hits']} hits, {t['misses']} misses, {t['evictions']} evictions, "
            f"{t['bytes'] / MIB:.0f} MiB"
            for tier, t in tiers.items()
        )
        + ".",
    ]


def _fetch_lines(fetch: dict) -> list[str]:
    rows = [
        [tier, q["samples"], f"{q['p50_ms']:.3f}", f"{q['p99_ms']:.3f}", f"{q['max_ms']:.3f}"]
        for tier, q in fetch.items()
    ]
    return markdown_table(["tier", "samples", "p50 (ms)", "p99 (ms)", "max (ms)"], rows)


def _http_lines(http: dict) -> list[str]:
    rows = []
    for key, name in (("scale", "1,000 tasks"), ("six", "six tasks")):
        for run in http[key]:
            resident = run["memory"]["process_resident_bytes"] / MIB
            rows.append(
                [
                    run["round"],
                    name,
                    f"{run['throughput_rps']:.1f}",
                    f"{run['p50_ms']:.1f}",
                    f"{run['p99_ms']:.1f}",
                    run["errors"],
                    f"{resident:.0f} MiB",
                ]
            )
    header = [
        "round",
        "server",
        "throughput (req/s)",
        "p50 (ms)",
        "p99 (ms)",
        "errors",
        "replica resident",
    ]
    return markdown_table(header, rows)


def _secs(value: float | None) -> str:
    return "never (within the wait)" if value is None else f"{value:.1f} s"


def scale_markdown(result: dict, command: str) -> str:
    """The report: targets, resident memory, fetch latency per tier, HTTP rounds, live edits."""
    target_header = ["target", "measured (median and range over rounds)", "limit", ""]
    lines = [
        "# Experts at scale: a thousand tasks on one replica",
        "",
        machine_line(result["machine"]) + f". Command: `{command}`.",
        "",
        f"{result['tasks']} tasks: the zoo's {len(result['real_tasks'])} real ones "
        f"({', '.join(result['real_tasks'])}) and {result['synthetic_tasks']} synthetic ones "
        "(random low-rank factors with the layers, rank and dtype of a real task's expert, and "
        "that task's head; their answers mean nothing, their costs are real). No router "
        "(synthetic tasks have no texts): all traffic is tagged. Default budgets: "
        "`--host-expert-bytes` 256 MiB, `--device-expert-bytes` 128 MiB. Zipf mixes with "
        f"a = {result['zipf_a']} over a fixed random order of each server's tasks.",
        "",
        "## Targets",
        "",
        *markdown_table(target_header, [_target_cells(t) for t in result["targets"]]),
        "",
        "## Resident memory",
        "",
        f"Each in its own process after {TRAFFIC_REQUESTS} one-text requests in batches of 8 "
        "(the servers: a Zipf mix over their tasks through the engine; the plain model: the "
        "same number of its own task's texts).",
        "",
        *_memory_lines(result["memory"]),
        "",
        "## Expert fetch latency per tier",
        "",
        *_fetch_lines(result["fetch"]),
        "",
        "A fetch from disk reads the file once, checks its sha256 against the manifest and "
        "parses those bytes; *dropped*: `posix_fadvise(DONTNEED)` on the file first.",
        "",
        f"## Over HTTP: Zipf mix, {CONCURRENCY} clients, interleaved rounds",
        "",
        *_http_lines(result["http"]),
        "",
        *_live_lines(result["live"]),
    ]
    return "\n".join(lines) + "\n"


def _live_lines(live: dict) -> list[str]:
    return [
        "## A task added and one removed under load",
        "",
        f"Task `{live['added']}` (a zoo model under a new name) added with `add-task` in "
        f"{live['edit_seconds']['add']:.1f} s, then `{live['removed']}` removed with "
        f"`remove-task` in {live['edit_seconds']['remove']:.1f} s (each a new artifact "
        "version, unchanged files linked). Each deployed to the running server by deploying "
        "its config again with the version in the deployments' `user_config`, under a Zipf "
        f"load of 8 clients: added task answering {_secs(live['add']['answering_s'])} after the "
        f"deploy began; removed task refused (404) {_secs(live['remove']['refused_s'])} after "
        f"its. Load: {live['load']['requests']} requests, statuses {live['statuses']}.",
    ]
