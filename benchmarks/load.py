"""``freemerge bench load``: the merged server against N separate models, side by side.

Each contender is started in turn on a local Ray with the same settings and driven over HTTP
from a separate process: closed loop at several concurrencies, Punica's task mixes, tagged
and untagged traffic, and open loop at Poisson rates. Also: replica memory against the number
of tasks, and the costs of expert apply, routing and one forward. Writes JSON, markdown and
PNG plots.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from freemerge.benchmarks.evaluate import task_texts
from freemerge.benchmarks.loadgen import LoadSpec, call, run_load_in_process
from freemerge.benchmarks.machine import describe_machine, machine_line
from freemerge.benchmarks.spawn import run_in_child
from freemerge.merging.artifact import open_artifact
from freemerge.merging.experts import LowRankExpert, SparseExpert
from freemerge.merging.zoo_folder import open_zoo
from freemerge.serving.adapters import rows_assigned
from freemerge.serving.local import free_port, start_local, stop_local
from freemerge.serving.metrics import (
    bucket_counts,
    counter_total,
    quantile_of_buckets,
    scrape,
    scrape_until,
)
from freemerge.serving.runtime import MergedClassifier

METRICS_INTERVAL_MS = 1000  # Ray's metrics export interval during the bench

SERVER_SETTINGS = {
    "device": "auto",
    "max_batch_size": 16,
    "batch_wait_timeout_s": 0.005,
    "cpus_per_replica": 2,
}


@dataclass
class LoadPlan:
    concurrencies: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    mixes: list[str] = field(default_factory=lambda: ["identical", "uniform", "skewed", "distinct"])
    mix_concurrency: int = 16
    rates: list[float] = field(default_factory=lambda: [5.0, 10.0, 20.0, 40.0])
    requests: int = 200
    max_seconds: float = 30.0
    memory_tasks: list[int] = field(default_factory=lambda: [1, 2, 4, 6, 16, 64, 128])
    separate_measured_up_to: int = 16
    models_per_replica: int = 2  # the multiplexed contender holds this many of the N models
    merge_methods: list[str] = field(default_factory=lambda: list(MERGE_METHODS))

    @classmethod
    def quick(cls) -> LoadPlan:
        return cls(
            concurrencies=[1, 8],
            mixes=["uniform", "distinct"],
            mix_concurrency=8,
            rates=[5.0],
            requests=40,
            max_seconds=20.0,
            memory_tasks=[1, 6, 16],
            separate_measured_up_to=6,
            merge_methods=["task arithmetic", "FREE, low-rank experts rank 4"],
        )


def pss_bytes(pid: int) -> int | None:
    """Proportional set size of a process (Linux), or None where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def replica_memory(base_url: str) -> dict:
    status, ready = call(f"{base_url}/readyz", timeout=30)
    if status != 200:
        raise RuntimeError(f"{base_url}/readyz answered {status}: {ready}")
    memory = dict(ready["memory"])
    memory["pss_bytes"] = pss_bytes(ready["pid"])
    return memory


def bench_contender(
    key: str,
    name: str,
    options: dict,
    tasks: list[str],
    texts: dict[str, list[str]],
    plan: LoadPlan,
    routed: bool,
    full: bool = True,
) -> dict:
    """Start one contender, run the load scenarios against it, stop it.

    ``full=False`` runs the closed-loop uniform and skewed mixes and one client only (for a
    contender whose every scenario would take the whole time budget, e.g. a thrashing one).
    """
    port, metrics_port = free_port(), free_port()
    start_local(
        {**SERVER_SETTINGS, **options},
        port=port,
        metrics_port=metrics_port,
        metrics_interval_ms=METRICS_INTERVAL_MS,
    )
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/v1/classify"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    runs = []
    try:

        def load(**kwargs: object) -> None:
            kwargs.setdefault("tagged", True)
            spec = LoadSpec(
                url=url,
                tasks=tasks,
                texts=texts,
                requests=plan.requests,
                max_seconds=plan.max_seconds,
                **kwargs,
            )
            before = scrape(metrics_url)
            summary = run_load_in_process(spec).summary()
            server = server_side(before, metrics_url, answered=len(summary["latencies_ms"]))
            runs.append({**kwargs, **summary, "server": server})
            brief = {k: v for k, v in summary.items() if k != "latencies_ms"}
            print(f"  {name} {kwargs}: {brief}, server {server}", flush=True)

        load(mode="closed", concurrency=1, mix="identical")  # warm-up, also the floor's scenario
        runs.clear()
        if full:
            for concurrency in plan.concurrencies:
                load(
                    mode="closed",
                    concurrency=concurrency,
                    mix="uniform" if len(tasks) > 1 else "identical",
                )
            if len(tasks) > 1:
                for mix in plan.mixes:
                    load(mode="closed", concurrency=plan.mix_concurrency, mix=mix)
                if routed:
                    load(
                        mode="closed", concurrency=plan.mix_concurrency, mix="uniform", tagged=False
                    )
            for rate in plan.rates:
                load(mode="open", rate=rate, mix="uniform" if len(tasks) > 1 else "identical")
            load(mode="closed", concurrency=1, mix="identical")
        else:
            load(mode="closed", concurrency=1, mix="uniform")
            for mix in ("uniform", "skewed"):
                load(mode="closed", concurrency=plan.mix_concurrency, mix=mix)
        memory = replica_memory(base)
    finally:
        stop_local()
    return {
        "key": key,
        "name": name,
        "options": options,
        "tasks": tasks,
        "runs": runs,
        "memory": memory,
    }


def _histogram_delta(before: dict, after: dict, name: str) -> dict[float, float]:
    """Bucket counts of a histogram's observations between two scrapes. (Ray exports a
    histogram's ``_sum`` from bucket midpoints, so only the buckets are exact.)"""
    old = bucket_counts(before[name]) if name in before else {}
    new = bucket_counts(after[name]) if name in after else {}
    return {b: new[b] - old.get(b, 0.0) for b in new}


def server_side(before: dict, metrics_url: str, answered: int, wait_s: float = 15.0) -> dict:
    """What the server's Prometheus metrics saw during one run (after minus before): requests
    answered, latency and batch-size medians (bucket upper bounds) and model loads. Waits
    until Ray has exported every answered request, at most ``wait_s``.
    """
    name = "ray_freemerge_request_latency_seconds"

    def seen(after: dict) -> float:
        return max(_histogram_delta(before, after, name).values(), default=0.0)

    after = scrape_until(metrics_url, lambda families: seen(families) >= answered, wait_s)
    latency = _histogram_delta(before, after, name)
    batches = _histogram_delta(before, after, "ray_freemerge_batch_size")
    p50, p99 = quantile_of_buckets(latency, 0.5), quantile_of_buckets(latency, 0.99)
    loads = "ray_freemerge_model_loads"
    return {
        "requests": int(seen(after)),
        "p50_ms_bucket": None if p50 is None else p50 * 1000,
        "p99_ms_bucket": None if p99 is None else p99 * 1000,
        "batch_p50_texts_bucket": quantile_of_buckets(batches, 0.5),
        "model_loads": int(counter_total(after, loads) - counter_total(before, loads)),
    }


def _measure_memory_child(kind: str, n: int, artifact: str, zoo: str) -> dict:
    from freemerge.serving.engine import process_resident_bytes

    torch.set_num_threads(1)
    before = process_resident_bytes()
    if kind == "merged":
        model = MergedClassifier(open_artifact(artifact))
        real = [e for e in model.experts.values() if e is not None]
        for i in range(len(model.experts), n):  # synthetic experts of the same kind and shapes
            model.experts[f"synthetic_{i}"] = _synthetic_like(real[i % len(real)], seed=i)
        experts = list(model.experts.values())[:n]
        weights = sum(p.numel() * p.element_size() for p in model.parameters.values())
        weights += sum(e.nbytes() for e in experts if e is not None)
    else:
        from transformers import AutoModelForSequenceClassification

        paths = [task.path for task in open_zoo(Path(zoo)).tasks.values()]
        models = [
            AutoModelForSequenceClassification.from_pretrained(paths[i % len(paths)])
            for i in range(n)
        ]
        weights = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    return {
        "kind": kind,
        "tasks": n,
        "weights_bytes": weights,
        "rss_bytes": process_resident_bytes(),
        "rss_growth_bytes": process_resident_bytes() - before,
    }


def _synthetic_like(
    expert: LowRankExpert | SparseExpert, seed: int
) -> LowRankExpert | SparseExpert:
    generator = torch.Generator().manual_seed(seed)
    if isinstance(expert, LowRankExpert):
        copy = LowRankExpert(expert.rank, expert.vectors, expert.skip)
        copy.factors = {
            n: (
                torch.randn(b.shape, generator=generator) * 1e-3,
                torch.randn(a.shape, generator=generator),
            )
            for n, (b, a) in expert.factors.items()
        }
        return copy
    copy = SparseExpert(expert.density, expert.granularity, expert.rescale)
    copy.entries = {
        n: (i.clone(), torch.randn(v.shape, generator=generator) * 1e-3)
        for n, (i, v) in expert.entries.items()
    }
    return copy


def measure_memory(kind: str, n: int, artifact: Path, zoo: Path) -> dict:
    return run_in_child(_measure_memory_child, kind, n, str(artifact), str(zoo), timeout=900)


def memory_scaling(artifact: Path, zoo: Path, plan: LoadPlan) -> list[dict]:
    rows = []
    per_model = None
    for n in plan.memory_tasks:
        merged = measure_memory("merged", n, artifact, zoo)
        if n <= plan.separate_measured_up_to:
            separate = {**measure_memory("separate", n, artifact, zoo), "computed": False}
            per_model = separate["weights_bytes"] / n
        else:
            separate = {
                "kind": "separate",
                "tasks": n,
                "weights_bytes": per_model * n,
                "rss_bytes": None,
                "computed": True,
            }
        rows += [merged | {"computed": False}, separate]
        print(
            f"  memory N={n}: merged {merged['weights_bytes'] / 2**20:.0f} MiB, "
            f"separate {separate['weights_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
    return rows


@torch.no_grad()
def costs(artifact: Path, texts: list[str], repeats: int = 30) -> dict:
    """Against one forward at batch 1 and 32: the expert applied in place and restored (the
    path for sparse experts) and, where the artifact has them, row adapters (the path the
    server takes for low-rank experts: their cost is the forward with the task's adapters
    minus the forward without). Also the router against a tagged request.
    """
    in_place = MergedClassifier(open_artifact(artifact), row_adapters=False)
    served = MergedClassifier(open_artifact(artifact))
    task = in_place.tasks[0]
    out = {}
    for batch_size in (1, 32):
        batch = in_place.encode((texts * 32)[:batch_size], 128)
        in_place.backbone(**batch)
        forward = _timed(lambda batch=batch: in_place.backbone(**batch), repeats)
        apply = _timed(lambda: _enter_and_exit(in_place.expert_applied(task)), repeats)
        figures = {
            "forward_ms": forward * 1000,
            "expert_apply_restore_ms": apply * 1000,
            "apply_share_of_forward": apply / forward,
        }
        if served.row_adapters is not None:
            bare, adapted = _timed_pair(
                lambda batch=batch: served.backbone(**batch),
                lambda batch=batch: _adapted_forward(served, task, batch),
                repeats,
            )
            figures |= {
                "row_adapter_forward_ms": adapted * 1000,
                "row_adapter_share_of_forward": (adapted - bare) / bare,
            }
        out[f"batch_{batch_size}"] = figures
    one = texts[:1]
    tagged = _timed(lambda: in_place.classify(one, task=task), repeats)
    if in_place.router is not None:
        routed = _timed(lambda: in_place.classify(one), repeats)
        out["router"] = {
            "tagged_ms": tagged * 1000,
            "untagged_ms": routed * 1000,
            "router_overhead_ms": (routed - tagged) * 1000,
        }
    return out


def _adapted_forward(model: MergedClassifier, task: str, batch: object) -> None:
    with rows_assigned(model.row_adapters, [task] * len(batch["input_ids"])):
        model.backbone(**batch)


def _timed_pair(first: object, second: object, repeats: int) -> tuple[float, float]:
    """Median seconds of ``first()`` and of ``second()``, run alternately so that the
    machine's drift hits both alike."""
    first()
    second()
    seconds: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for function, out in ((first, seconds[0]), (second, seconds[1])):
            start = time.perf_counter()
            function()
            out.append(time.perf_counter() - start)
    return float(np.median(seconds[0])), float(np.median(seconds[1]))


# Merge methods for the cost table, each with its parameters as picked on validation
# (benchmarks/results/merge_quality.md); the FREE rows without a router.
FR_PARAMETERS = {"scaling": 0.5, "filter": {"mode": "reference", "ratio": 0.5}}
MERGE_METHODS = {
    "average": ("average", {}),
    "task arithmetic": ("task_arithmetic", {"scaling": 0.3}),
    "TIES": ("ties", {"scaling": 1.0, "density": 0.2}),
    "FR (reference filter)": ("fr", FR_PARAMETERS),
    "FREE, sparse experts 1%": (
        "free",
        {**FR_PARAMETERS, "experts": {"kind": "sparse", "density": 0.01}},
    ),
    "FREE, low-rank experts rank 4": (
        "free",
        {**FR_PARAMETERS, "experts": {"kind": "lowrank", "rank": 4}},
    ),
}


def _merge_child(zoo: str, method: str, parameters: dict, out: str, queue: object) -> None:
    from merging.config import parse_config
    from merging.merge import run_merge
    from serving.engine import process_resident_bytes

    imported = process_resident_bytes()  # the interpreter with torch and transformers
    config = parse_config({"zoo": zoo, "method": method, "parameters": parameters})
    summary = run_merge(config, Path(out), show_progress=False)
    artifact = open_artifact(Path(out), verify=False)  # just written
    heads = {t: artifact.path(e["head"]).stat().st_size for t, e in artifact.tasks.items()}
    return {
        "wall_seconds": summary.wall_seconds,
        "peak_rss_bytes": int(summary.peak_rss_mib * 2**20),
        "rss_after_imports_bytes": imported,
        "backbone_bytes": summary.backbone_bytes,
        "per_task_bytes": {t: summary.expert_bytes.get(t, 0) + heads[t] for t in heads},
        "artifact_bytes": sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()),
    }


def merge_costs(zoo: Path, names: list[str], scratch: Path) -> list[dict]:
    """Wall time, peak resident memory and artifact bytes of each merge method, every merge
    in a fresh process (so the peak is that merge's own)."""
    rows = []
    for name in names:
        method, parameters = MERGE_METHODS[name]
        out = scratch / name.replace(" ", "_").replace(",", "")
        measured = run_in_child(_merge_child, str(zoo), method, parameters, str(out), timeout=1800)
        row = {"name": name, "method": method, "parameters": parameters, **measured}
        rows.append(row)
        print(
            f"  merge {name}: {row['wall_seconds']:.1f} s, "
            f"peak {row['peak_rss_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
    return rows


def _enter_and_exit(context: object) -> None:
    with context:
        pass


def _timed(function: object, repeats: int) -> float:
    """Median seconds of ``function()`` over ``repeats`` runs (after one warm-up run)."""
    function()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def contender_texts(tasks: list[str], count: int = 50) -> dict[str, list[str]]:
    return {task: [t[:1000] for t in task_texts(task, "test")[0][:count]] for task in tasks}


def run_load_bench(artifact: Path, zoo: Path, plan: LoadPlan) -> dict:
    """Every contender, memory scaling and costs; the JSON-able result."""
    start = time.perf_counter()
    tasks = list(open_artifact(artifact).tasks)
    texts = contender_texts(tasks)
    per_replica = min(plan.models_per_replica, len(tasks))
    contenders = [
        bench_contender(
            "merged", "merged", {"artifact": str(artifact)}, tasks, texts, plan, routed=True
        ),
        bench_contender(
            "separate",
            "separate (all loaded)",
            {"zoo": str(zoo)},
            tasks,
            texts,
            plan,
            routed=False,
        ),
        bench_contender(
            "multiplexed",
            f"separate, multiplexed ({per_replica} of {len(tasks)} per replica)",
            {"zoo": str(zoo), "models_per_replica": per_replica},
            tasks,
            texts,
            plan,
            routed=False,
            full=False,
        ),
        bench_contender(
            "floor",
            "one model alone (floor)",
            {"zoo": str(zoo), "tasks": [tasks[0]]},
            tasks[:1],
            {tasks[0]: texts[tasks[0]]},
            plan,
            routed=False,
        ),
    ]
    print("== memory against the number of tasks", flush=True)
    scaling = memory_scaling(artifact, zoo, plan)
    print("== costs", flush=True)
    cost = costs(artifact, texts[tasks[0]])
    print("== merge costs", flush=True)
    with tempfile.TemporaryDirectory(prefix="freemerge-merge-costs-") as scratch:
        merges = merge_costs(zoo, plan.merge_methods, Path(scratch))
    return {
        "machine": describe_machine(),
        "settings": SERVER_SETTINGS,
        "plan": plan.__dict__,
        "artifact": str(artifact),
        "contenders": contenders,
        "memory_scaling": scaling,
        "costs": cost,
        "merge_costs": merges,
        "wall_seconds": round(time.perf_counter() - start),
    }


def _run(contender: dict, **match: object) -> dict | None:
    for run in contender["runs"]:
        if all(run.get(k) == v for k, v in match.items()):
            return run
    return None


def targets(result: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) rows for the report."""
    by_key = {contender["key"]: contender for contender in result["contenders"]}
    merged, separate = by_key["merged"], by_key["separate"]
    multiplexed, floor = by_key["multiplexed"], by_key["floor"]
    rows = []
    ratio = merged["memory"]["process_resident_bytes"] / floor["memory"]["process_resident_bytes"]
    weights = (
        merged["memory"]["backbone_bytes"] + merged["memory"]["resident_expert_bytes"]
    ) / floor["memory"]["backbone_bytes"]
    rows.append(
        (
            "replica memory for all tasks <= 1.15x one model",
            f"resident {ratio:.2f}x, weights {weights:.2f}x",
            weights <= 1.15,
        )
    )
    m = _run(merged, mode="closed", mix="uniform", concurrency=result["plan"]["mix_concurrency"])
    sep = _run(
        separate, mode="closed", mix="uniform", concurrency=result["plan"]["mix_concurrency"]
    )
    if m and sep:
        rows.append(
            (
                "throughput >= the all-loaded separate models (uniform mix)",
                f"{m['throughput_rps']:.1f} vs {sep['throughput_rps']:.1f} req/s",
                m["throughput_rps"] >= sep["throughput_rps"],
            )
        )
    mux = _run(
        multiplexed, mode="closed", mix="uniform", concurrency=result["plan"]["mix_concurrency"]
    )
    if m and mux:
        rows.append(
            (
                "throughput >= 3x the thrashing multiplexed setup (uniform mix)",
                f"{m['throughput_rps']:.1f} vs {mux['throughput_rps']:.1f} req/s "
                f"({m['throughput_rps'] / mux['throughput_rps']:.1f}x; "
                f"{mux['server']['model_loads']} model loads in {mux['requests']} requests)",
                m["throughput_rps"] >= 3 * mux["throughput_rps"],
            )
        )
    m1 = _run(merged, mode="closed", mix="identical", concurrency=1)
    f1 = _run(floor, mode="closed", mix="identical", concurrency=1)
    if m1 and f1:
        rows.append(
            (
                "tagged p50 within 1.10x of one plain model (concurrency 1)",
                f"{m1['p50_ms']:.1f} vs {f1['p50_ms']:.1f} ms ({m1['p50_ms'] / f1['p50_ms']:.2f}x)",
                m1["p50_ms"] <= 1.10 * f1["p50_ms"],
            )
        )
    batch_1 = result["costs"]["batch_1"]
    if "row_adapter_share_of_forward" in batch_1:  # the path the server takes
        share = batch_1["row_adapter_share_of_forward"]
        measured = (
            f"row adapters (served): {100 * share:.1f}%; in place + restore (sparse path): "
            f"{100 * batch_1['apply_share_of_forward']:.1f}%"
        )
    else:
        share = batch_1["apply_share_of_forward"]
        measured = f"in place + restore: {100 * share:.1f}%"
    rows.append(("expert apply (+ restore) < 5% of a batch-1 forward", measured, share < 0.05))
    return rows


def load_markdown(result: dict, command: str) -> str:
    mib = 2**20
    lines = [
        "# Load test: merged server against separate models",
        "",
        f"Machine: {machine_line(result['machine'])}. "
        f"Whole run: {result['wall_seconds'] / 60:.0f} min.",
        f"Server settings (every contender): `{json.dumps(result['settings'])}`.",
        "",
        f"Command: `{command}`",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for target, measured, met in targets(result):
        lines.append(
            f"| {target} | {measured} | {'yes' if met else 'no' if met is False else '-'} |"
        )
    lines += [
        "",
        "## Runs",
        "",
        "Client side, and what the server's Prometheus metrics saw (p50 as the histogram "
        "bucket's upper bound, texts per batch at the median, models loaded).",
        "",
        "| contender | mode | concurrency / rate | mix | tagged | requests | errors | req/s "
        "| p50 ms | p90 ms | p99 ms | server p50 ms <= | batch p50 <= | loads |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for contender in result["contenders"]:
        for run in contender["runs"]:
            level = run.get("concurrency") if run["mode"] == "closed" else f"{run.get('rate')}/s"
            server = run["server"]
            lines.append(
                f"| {contender['name']} | {run['mode']} | {level} | {run['mix']} "
                f"| {run.get('tagged', True)} | {run['requests']} | {run['errors']} "
                f"| {run['throughput_rps']:.1f} | {run['p50_ms']:.1f} "
                f"| {run['p90_ms']:.1f} | {run['p99_ms']:.1f} "
                f"| {_figure(server['p50_ms_bucket'], '.0f')} "
                f"| {_figure(server['batch_p50_texts_bucket'], '.0f')} | {server['model_loads']} |"
            )
    lines += [
        "",
        "## Replica memory",
        "",
        "| contender | resident (RSS) MiB | PSS MiB | weights MiB |",
        "|---|---|---|---|",
    ]
    for contender in result["contenders"]:
        memory = contender["memory"]
        pss = "-" if memory.get("pss_bytes") is None else f"{memory['pss_bytes'] / mib:.0f}"
        weights = (memory["backbone_bytes"] + memory["resident_expert_bytes"]) / mib
        lines.append(
            f"| {contender['name']} | {memory['process_resident_bytes'] / mib:.0f} | {pss} "
            f"| {weights:.1f} |"
        )
    lines += [
        "",
        "## Memory against the number of tasks",
        "",
        "| tasks | merged weights MiB | merged RSS MiB | separate weights MiB | separate RSS MiB |",
        "|---|---|---|---|---|",
    ]
    scaling = result["memory_scaling"]
    for merged, separate in zip(scaling[::2], scaling[1::2], strict=True):
        rss = "-" if separate["rss_bytes"] is None else f"{separate['rss_bytes'] / mib:.0f}"
        mark = " (computed from per-model bytes)" if separate["computed"] else ""
        lines.append(
            f"| {merged['tasks']} | {merged['weights_bytes'] / mib:.1f} "
            f"| {merged['rss_bytes'] / mib:.0f} "
            f"| {separate['weights_bytes'] / mib:.1f}{mark} | {rss} |"
        )
    cost = result["costs"]
    lines += ["", "## Costs", "", "| what | ms |", "|---|---|"]
    for batch in ("batch_1", "batch_32"):
        lines.append(f"| forward, {batch.replace('_', ' ')} | {cost[batch]['forward_ms']:.2f} |")
        lines.append(
            f"| expert apply + restore in place, {batch.replace('_', ' ')} "
            f"| {cost[batch]['expert_apply_restore_ms']:.2f} |"
        )
        if "row_adapter_forward_ms" in cost[batch]:
            lines.append(
                f"| forward with row adapters, {batch.replace('_', ' ')} "
                f"| {cost[batch]['row_adapter_forward_ms']:.2f} |"
            )
    if "router" in cost:
        lines.append(f"| one text, tagged | {cost['router']['tagged_ms']:.2f} |")
        lines.append(
            f"| one text, untagged (router + forward) | {cost['router']['untagged_ms']:.2f} |"
        )
    lines += [
        "",
        "## Merge costs",
        "",
        "Each merge in a fresh process; peak resident memory includes the interpreter with "
        "torch and transformers (the last column). Artifact bytes per task: expert + head.",
        "",
        "| method | wall s | peak RSS MiB | artifact MiB | per task KiB | RSS after imports MiB |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["merge_costs"]:
        per_task = max(row["per_task_bytes"].values()) / 1024
        lines.append(
            f"| {row['name']} | {row['wall_seconds']:.1f} | {row['peak_rss_bytes'] / mib:.0f} "
            f"| {row['artifact_bytes'] / mib:.1f} | {per_task:.0f} "
            f"| {row['rss_after_imports_bytes'] / mib:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def load_plots(result: dict, out_dir: Path, prefix: str = "load_") -> list[Path]:
    """Throughput against concurrency, and memory against the number of tasks (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    figure, axis = plt.subplots(figsize=(6, 4))
    for contender in result["contenders"]:
        mix = "uniform" if len(contender["tasks"]) > 1 else "identical"
        points: dict[int, float] = {}
        for r in contender["runs"]:  # the first run per concurrency (the floor repeats c=1)
            if r["mode"] == "closed" and r.get("tagged", True) and r["mix"] == mix:
                points.setdefault(r["concurrency"], r["throughput_rps"])
        points = sorted(points.items())
        axis.plot(
            [p[0] for p in points], [p[1] for p in points], marker="o", label=contender["name"]
        )
    axis.set(xscale="log", xlabel="concurrent clients", ylabel="requests / s", title="Throughput")
    axis.legend()
    figure.tight_layout()
    paths.append(out_dir / f"{prefix}throughput.png")
    figure.savefig(paths[-1], dpi=120)
    figure, axis = plt.subplots(figsize=(6, 4))
    level = result["plan"]["mix_concurrency"]
    for contender in result["contenders"]:
        run = _run(contender, mode="closed", concurrency=level, mix="uniform", tagged=True) or _run(
            contender, mode="closed", concurrency=level, mix="identical", tagged=True
        )
        if run and run["latencies_ms"]:
            values = np.sort(run["latencies_ms"])
            axis.plot(values, np.arange(1, len(values) + 1) / len(values), label=contender["name"])
    axis.set(
        xlabel="latency (ms)",
        ylabel="fraction of requests",
        title=f"Latency CDF, {level} concurrent clients",
    )
    axis.legend()
    figure.tight_layout()
    paths.append(out_dir / f"{prefix}latency_cdf.png")
    figure.savefig(paths[-1], dpi=120)
    figure, axis = plt.subplots(figsize=(6, 4))
    scaling = result["memory_scaling"]
    for kind in ("merged", "separate"):
        rows = [r for r in scaling if r["kind"] == kind]
        axis.plot(
            [r["tasks"] for r in rows],
            [r["weights_bytes"] / 2**20 for r in rows],
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
    axis.legend()
    figure.tight_layout()
    paths.append(out_dir / f"{prefix}memory_scaling.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close("all")
    return paths


def write_load_results(
    artifact: Path, zoo: Path, plan: LoadPlan, out: Path, command: str, quick: bool
) -> str:
    """Run the bench; write JSON, markdown and plots under ``out``; the markdown."""
    from freemerge.merging.files import write_json_atomically, write_text_atomically

    result = run_load_bench(artifact, zoo, plan)
    name = "load_quick" if quick else "load"
    write_json_atomically(out / f"{name}.json", result)
    markdown = load_markdown(result, command)
    write_text_atomically(out / f"{name}.md", markdown)
    load_plots(result, out, prefix=f"{name}_")
    return markdown
