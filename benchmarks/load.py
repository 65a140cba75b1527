"""``freemerge bench load``: the merged server against N separate models, side by side.

Each contender is started in turn on a local Ray with the same settings and driven over HTTP
from a separate process: closed loop at several concurrencies, Punica's task mixes, tagged
and untagged traffic, and open loop at Poisson rates. Also: replica memory against the number
of tasks, and the costs of expert apply, routing and one forward. Writes JSON, markdown and
PNG plots.

The targets are measured in rounds. One round starts every contender in turn (merged,
separate, multiplexed, floor), and the rounds follow each other (A B C D A B C D ...), so that
the machine's drift hits every contender alike. Round 1 runs every scenario; later rounds run
only the scenarios the targets read. A target's ratio is taken per round, contenders of the
same round paired, and reported as the median and the range over the rounds; a target is met
only when the whole range clears it, and is not judged from fewer than :data:`MIN_ROUNDS`.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from freemerge.benchmarks.evaluate import task_texts
from freemerge.benchmarks.loadgen import LoadSpec, call, run_load_in_process
from freemerge.benchmarks.machine import describe_machine, machine_line
from freemerge.benchmarks.spawn import run_in_child
from freemerge.merging.artifact import open_artifact
from freemerge.merging.batching import Tokenized
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
from freemerge.serving.runtime import MergedClassifier, StageTimings
from freemerge.serving.settings import ServingOptions

METRICS_INTERVAL_MS = 1000  # Ray's metrics export interval during the bench
MIN_ROUNDS = 3  # a target's ratio from fewer rounds is reported, but not judged met or not

# What the bench sets on top of ServingOptions' defaults, for every contender alike: every
# client of the sweep (up to 64) queues rather than being refused, as the bench measures
# capacity (refusing under overload is `bench faults`' subject).
SERVER_SETTINGS = {"cpus_per_replica": 2, "max_queued_requests": 128}
# ServingOptions' fields that say what a contender serves (they differ between contenders).
CONTENDER_FIELDS = ("artifact", "zoo", "tasks", "models_per_replica")


def resolved_settings() -> dict:
    """Every serving option the contenders share, defaults filled in (for the report)."""
    options = dataclasses.asdict(ServingOptions(artifact="x", **SERVER_SETTINGS))
    return {k: v for k, v in options.items() if k not in CONTENDER_FIELDS}


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
    rounds: int = MIN_ROUNDS  # of the target scenarios, every contender once per round

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")

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


@dataclass
class Contender:
    """One server setup the bench starts: what it serves, and the traffic it gets."""

    key: str
    name: str
    options: dict
    tasks: list[str]
    texts: dict[str, list[str]]
    routed: bool = False  # also untagged traffic (the router picks each text's task)
    full: bool = True  # every scenario; False: one client and two mixes (a thrashing setup)


def contenders_for(
    artifact: Path, zoo: Path, tasks: list[str], texts: dict[str, list[str]], plan: LoadPlan
) -> list[Contender]:
    """Merged; the N models all loaded; N models multiplexed a few per replica; one model."""
    per_replica = min(plan.models_per_replica, len(tasks))
    return [
        Contender("merged", "merged", {"artifact": str(artifact)}, tasks, texts, routed=True),
        Contender("separate", "separate (all loaded)", {"zoo": str(zoo)}, tasks, texts),
        Contender(
            "multiplexed",
            f"separate, multiplexed ({per_replica} of {len(tasks)} per replica)",
            {"zoo": str(zoo), "models_per_replica": per_replica},
            tasks,
            texts,
            full=False,
        ),
        Contender(
            "floor",
            "one model alone (floor)",
            {"zoo": str(zoo), "tasks": [tasks[0]]},
            tasks[:1],
            {tasks[0]: texts[tasks[0]]},
        ),
    ]


def _closed(concurrency: int, mix: str, tagged: bool = True) -> dict:
    return {"mode": "closed", "concurrency": concurrency, "mix": mix, "tagged": tagged}


WARM_UP = _closed(1, "identical")  # before the measured runs of every start; not kept


def target_scenarios(contender: Contender, plan: LoadPlan) -> list[dict]:
    """The scenarios the targets read, run in every round: the uniform mix at
    ``mix_concurrency`` (merged, separate, multiplexed) and one client with one task (merged
    and the floor)."""
    uniform, alone = _closed(plan.mix_concurrency, "uniform"), _closed(1, "identical")
    return {
        "merged": [uniform, alone],
        "separate": [uniform],
        "multiplexed": [uniform],
        "floor": [alone],
    }.get(contender.key, [])


def sweep_scenarios(contender: Contender, plan: LoadPlan) -> list[dict]:
    """Round 1's other scenarios: every concurrency, mix and open-loop rate, and untagged
    traffic where the contender routes. Not ``full``: one client and two mixes only."""
    if not contender.full:
        level = plan.mix_concurrency
        return [_closed(1, "uniform"), _closed(level, "uniform"), _closed(level, "skewed")]
    spread = "uniform" if len(contender.tasks) > 1 else "identical"
    scenarios = [_closed(concurrency, spread) for concurrency in plan.concurrencies]
    if len(contender.tasks) > 1:
        scenarios += [_closed(plan.mix_concurrency, mix) for mix in plan.mixes]
        if contender.routed:
            scenarios.append(_closed(plan.mix_concurrency, "uniform", tagged=False))
    open_loop = [
        {"mode": "open", "rate": rate, "mix": spread, "tagged": True} for rate in plan.rates
    ]
    return scenarios + open_loop


def round_scenarios(contender: Contender, plan: LoadPlan, round_number: int) -> list[dict]:
    """The target scenarios first (every round alike), then in round 1 the rest of the sweep."""
    scenarios = target_scenarios(contender, plan)
    if round_number == 1:
        scenarios = scenarios + [s for s in sweep_scenarios(contender, plan) if s not in scenarios]
    return scenarios


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


def bench_contender(contender: Contender, plan: LoadPlan, round_number: int) -> dict:
    """Start one contender, warm it up, run its scenarios of this round, read its replica's
    memory, stop it. Every run records its round."""
    port, metrics_port = free_port(), free_port()
    start_local(
        {**SERVER_SETTINGS, **contender.options},
        port=port,
        metrics_port=metrics_port,
        metrics_interval_ms=METRICS_INTERVAL_MS,
    )
    base = f"http://127.0.0.1:{port}"
    endpoints = (f"{base}/v1/classify", f"http://127.0.0.1:{metrics_port}/metrics")
    try:
        load_run(contender, plan, endpoints, WARM_UP)
        runs = [
            {**load_run(contender, plan, endpoints, scenario), "round": round_number}
            for scenario in round_scenarios(contender, plan, round_number)
        ]
        memory = replica_memory(base)
    finally:
        stop_local()
    return {"runs": runs, "memory": memory}


def load_run(
    contender: Contender, plan: LoadPlan, endpoints: tuple[str, str], scenario: dict
) -> dict:
    """One scenario from a separate client process: its summary and what the server saw."""
    url, metrics_url = endpoints
    spec = LoadSpec(
        url=url,
        tasks=contender.tasks,
        texts=contender.texts,
        requests=plan.requests,
        max_seconds=plan.max_seconds,
        **scenario,
    )
    before = scrape(metrics_url)
    summary = run_load_in_process(spec).summary()
    server = server_side(before, metrics_url, answered=len(summary["latencies_ms"]))
    brief = {k: v for k, v in summary.items() if k != "latencies_ms"}
    print(f"  {contender.name} {scenario}: {brief}, server {server}", flush=True)
    return {**scenario, **summary, "server": server}


def run_contenders(contenders: list[Contender], plan: LoadPlan) -> list[dict]:
    """Every contender in turn, the whole sequence ``plan.rounds`` times (A B C D A B C D ...);
    per contender its runs of all rounds, and its replica's memory per round."""
    results = [
        {"key": c.key, "name": c.name, "options": c.options, "tasks": c.tasks, "runs": []}
        for c in contenders
    ]
    memory: list[list[dict]] = [[] for _ in contenders]
    for round_number in range(1, plan.rounds + 1):
        for contender, result, held in zip(contenders, results, memory, strict=True):
            print(f"== round {round_number} of {plan.rounds}: {contender.name}", flush=True)
            measured = bench_contender(contender, plan, round_number)
            result["runs"] += measured["runs"]
            held.append(measured["memory"])
    for result, held in zip(results, memory, strict=True):
        result |= {"memory": held[0], "memory_rounds": held}
    return results


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
        "batches": int(max(batches.values(), default=0.0)),
        "model_loads": int(counter_total(after, loads) - counter_total(before, loads)),
    }


WARM_TEXT = "a short text to page the weights in"


def _measure_memory_child(kind: str, n: int, artifact: str, zoo: str) -> dict:
    """Weights held and resident memory of ``n`` tasks, merged or as separate models, read
    after one forward through every model (so that their weights are paged in)."""
    from freemerge.serving.engine import process_resident_bytes

    torch.set_num_threads(1)
    before = process_resident_bytes()
    if kind == "merged":
        weights = _merged_weights(MergedClassifier(open_artifact(Path(artifact))), n)
    else:
        weights = _separate_weights(zoo, n)
    rss = process_resident_bytes()
    return {
        "kind": kind,
        "tasks": n,
        "weights_bytes": weights,
        "rss_bytes": rss,
        "rss_growth_bytes": rss - before,
    }


@torch.no_grad()
def _merged_weights(model: MergedClassifier, n: int) -> int:
    """Bytes of the backbone and ``n`` experts (synthetic ones of the same kind and shapes
    beyond the artifact's), after one classify."""
    real = [model.store.prefetch(task) for task in model.store.files]
    experts = real + [
        synthetic_like(real[i % len(real)], seed=i) for i in range(len(real), n if real else 0)
    ]
    model.classify([WARM_TEXT], task=model.tasks[0])
    weights = sum(p.numel() * p.element_size() for p in model.parameters.values())
    return weights + sum(e.nbytes() for e in experts[:n])


@torch.no_grad()
def _separate_weights(zoo: str, n: int) -> int:
    """Bytes of ``n`` separate models (the zoo's, cycled), after one forward through each."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    paths = [task.path for task in open_zoo(Path(zoo)).tasks.values()]
    models = [
        AutoModelForSequenceClassification.from_pretrained(paths[i % len(paths)]).eval()
        for i in range(n)
    ]
    batch = AutoTokenizer.from_pretrained(paths[0])([WARM_TEXT], return_tensors="pt")
    for model in models:
        model(**batch)
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


def synthetic_like(expert: LowRankExpert | SparseExpert, seed: int) -> LowRankExpert | SparseExpert:
    """An expert of the same kind, settings, shapes and dtypes as ``expert``, with random
    values (B small, so the update stays small)."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(expert, LowRankExpert):
        copy = LowRankExpert(expert.rank, expert.vectors, expert.skip, expert.dtype)
        copy.factors = {
            n: (
                (torch.randn(b.shape, generator=generator) * 1e-3).to(b.dtype),
                torch.randn(a.shape, generator=generator).to(a.dtype),
            )
            for n, (b, a) in expert.factors.items()
        }
        return copy
    copy = SparseExpert(expert.density, expert.granularity, expert.rescale)
    copy.entries = {
        n: (i.clone(), (torch.randn(v.shape, generator=generator) * 1e-3).to(v.dtype))
        for n, (i, v) in expert.entries.items()
    }
    return copy


def measure_memory(kind: str, n: int, artifact: Path, zoo: Path) -> dict:
    return run_in_child(_measure_memory_child, kind, n, str(artifact), str(zoo), timeout=900)


def memory_scaling(artifact: Path, zoo: Path, plan: LoadPlan) -> list[dict]:
    """Merged and separate, each N in a fresh process; separate beyond
    ``separate_measured_up_to`` computed from the measured bytes per model."""
    rows = []
    per_model = None
    for n in plan.memory_tasks:
        merged = measure_memory("merged", n, artifact, zoo)
        if n <= plan.separate_measured_up_to or per_model is None:
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


def spread(values: list[float]) -> dict:
    """Median and range (min..max) of per-round values, and the values themselves."""
    values = [float(v) for v in values]
    if not values:
        return {"per_round": [], "median": None, "min": None, "max": None}
    return {
        "per_round": values,
        "median": float(np.median(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
    }


@torch.no_grad()
def costs(artifact: Path, texts: list[str], repeats: int = 30, rounds: int = MIN_ROUNDS) -> dict:
    """Against one plain forward at batch 1 and 32: the expert applied in place and restored
    (the path for sparse experts) and, where the artifact has them, the forward with row
    adapters (the path the server takes for low-rank experts: its cost is that forward minus
    the plain one). Also the router against a tagged request. Each quantity is timed once, all
    of a group interleaved, in ``rounds`` rounds of ``repeats`` alternations; shares are taken
    per round and reported as median and range.
    """
    in_place = MergedClassifier(open_artifact(artifact), row_adapters=False)
    served = MergedClassifier(open_artifact(artifact))
    task = in_place.tasks[0]
    out: dict = {"timing": {"repeats": repeats, "rounds": rounds}}
    for size in (1, 32):
        out[f"batch_{size}"] = forward_costs(in_place, served, task, texts, size, repeats, rounds)
    if in_place.router is not None:
        out["router"] = router_costs(in_place, task, texts[:1], repeats, rounds)
    return out


def forward_costs(
    in_place: MergedClassifier,
    served: MergedClassifier,
    task: str,
    texts: list[str],
    batch_size: int,
    repeats: int,
    rounds: int,
) -> dict:
    """Plain forward, in-place apply + restore, and forward with row adapters at one batch
    size: median ms over the rounds (of each round's median), and the shares per round."""
    batch = Tokenized(in_place.tokenizer, (texts * batch_size)[:batch_size], 128).padded(
        list(range(batch_size)), in_place.device
    )
    quantities: dict[str, Callable[[], object]] = {
        "forward": lambda: in_place.backbone(**batch),
        "expert_apply_restore": lambda: _enter_and_exit(in_place.expert_applied(task)),
    }
    if served.row_adapters is not None:
        quantities["row_adapter_forward"] = lambda: _adapted_forward(served, task, batch)
        quantities["served_forward"] = lambda: _served_forward(served, task, batch)
    per_round = _interleaved(quantities, repeats, rounds)
    figures: dict = {
        f"{name}_ms": 1000 * float(np.median([r[name] for r in per_round])) for name in quantities
    }
    figures["rounds_ms"] = [{k: 1000 * v for k, v in r.items()} for r in per_round]
    figures["apply_share_of_forward"] = spread(
        [r["expert_apply_restore"] / r["forward"] for r in per_round]
    )
    for name in ("row_adapter", "served"):
        if f"{name}_forward" in quantities:
            figures[f"{name}_share_of_forward"] = spread(
                [(r[f"{name}_forward"] - r["forward"]) / r["forward"] for r in per_round]
            )
    return figures


def router_costs(
    model: MergedClassifier, task: str, one: list[str], repeats: int, rounds: int
) -> dict:
    """One text tagged against one text routed, interleaved: median ms, and the router's
    overhead per round."""
    per_round = _interleaved(
        {"tagged": lambda: model.classify(one, task=task), "untagged": lambda: model.classify(one)},
        repeats,
        rounds,
    )
    return {
        "tagged_ms": 1000 * float(np.median([r["tagged"] for r in per_round])),
        "untagged_ms": 1000 * float(np.median([r["untagged"] for r in per_round])),
        "router_overhead_ms": spread([1000 * (r["untagged"] - r["tagged"]) for r in per_round]),
        "untagged_over_tagged": spread([r["untagged"] / r["tagged"] for r in per_round]),
    }


def _adapted_forward(model: MergedClassifier, task: str, batch: object) -> None:
    """As the server runs a pass: the task's expert from the store, the rows assigned."""
    experts = {task: model.store.get(task)}
    with rows_assigned(model.row_adapters, [task] * len(batch["input_ids"]), experts):
        model.backbone(**batch)


def _served_forward(model: MergedClassifier, task: str, batch: object) -> None:
    """One pass as the runtime runs it: row adapters, or the expert merged in for a large
    one-task pass (``merge_above_tokens``)."""
    model.logits_pass([task] * len(batch["input_ids"]), None, batch, StageTimings())


def _enter_and_exit(context: object) -> None:
    with context:
        pass


def _interleaved(
    functions: dict[str, Callable[[], object]], repeats: int, rounds: int
) -> list[dict[str, float]]:
    """Per round, the median seconds of each function over ``repeats`` alternations (one
    call of every function in turn), so that the machine's drift hits all alike; one warm-up
    call of each first."""
    for function in functions.values():
        function()
    per_round = []
    for _ in range(rounds):
        seconds: dict[str, list[float]] = {name: [] for name in functions}
        for _ in range(repeats):
            for name, function in functions.items():
                start = time.perf_counter()
                function()
                seconds[name].append(time.perf_counter() - start)
        per_round.append({name: float(np.median(s)) for name, s in seconds.items()})
    return per_round


# Merge methods for the cost table, each as a merge config (less the zoo) with its parameters
# as picked on validation (benchmarks/results/merge_quality.md); the FREE rows without a router.
FR_PARAMETERS = {"scaling": 0.5, "filter": {"mode": "reference", "ratio": 0.5}}
MERGE_METHODS = {
    "average": {"method": "average"},
    "task arithmetic": {"method": "task_arithmetic", "parameters": {"scaling": 0.3}},
    "TIES": {"method": "ties", "parameters": {"scaling": 1.0, "density": 0.2}},
    "FR (reference filter)": {"method": "fr", "parameters": FR_PARAMETERS},
    "FREE, sparse experts 1%": {
        "method": "free",
        "parameters": FR_PARAMETERS,
        "experts": {"kind": "sparse", "density": 0.01},
    },
    "FREE, low-rank experts rank 4": {
        "method": "free",
        "parameters": FR_PARAMETERS,
        "experts": {"kind": "lowrank", "rank": 4},
    },
}


def _merge_child(zoo: str, config: dict, out: str) -> dict:
    from freemerge.merging.config import parse_config
    from freemerge.merging.merge import run_merge
    from freemerge.serving.engine import process_resident_bytes

    imported = process_resident_bytes()  # the interpreter with torch and transformers
    summary = run_merge(parse_config({"zoo": zoo, **config}), Path(out), show_progress=False)
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
        config = MERGE_METHODS[name]
        out = scratch / name.replace(" ", "_").replace(",", "").replace("%", "")
        measured = run_in_child(_merge_child, str(zoo), config, str(out), timeout=1800)
        row = {
            "name": name,
            "method": config["method"],
            "parameters": config.get("parameters", {}),
            "experts": config.get("experts"),
            **measured,
        }
        rows.append(row)
        print(
            f"  merge {name}: {row['wall_seconds']:.1f} s, "
            f"peak {row['peak_rss_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
    return rows


def contender_texts(tasks: list[str], count: int = 50) -> dict[str, list[str]]:
    return {task: [t[:1000] for t in task_texts(task, "test")[0][:count]] for task in tasks}


def run_load_bench(artifact: Path, zoo: Path, plan: LoadPlan) -> dict:
    """Every contender in rounds, memory scaling and costs; the JSON-able result."""
    start = time.perf_counter()
    tasks = list(open_artifact(artifact, verify=False).tasks)
    texts = contender_texts(tasks)
    contenders = run_contenders(contenders_for(artifact, zoo, tasks, texts, plan), plan)
    print("== memory against the number of tasks", flush=True)
    scaling = memory_scaling(artifact, zoo, plan)
    print("== costs", flush=True)
    cost = costs(artifact, texts[tasks[0]], rounds=max(plan.rounds, MIN_ROUNDS))
    print("== merge costs", flush=True)
    with tempfile.TemporaryDirectory(prefix="freemerge-merge-costs-") as scratch:
        merges = merge_costs(zoo, plan.merge_methods, Path(scratch))
    return {
        "machine": describe_machine(),
        "settings": resolved_settings(),
        "plan": dataclasses.asdict(plan),
        "artifact": str(artifact),
        "contenders": contenders,
        "memory_scaling": scaling,
        "costs": cost,
        "merge_costs": merges,
        "wall_seconds": round(time.perf_counter() - start),
    }


def _run(contender: dict, **match: object) -> dict | None:
    """The contender's first run whose fields equal ``match``."""
    for run in contender["runs"]:
        if all(run.get(k) == v for k, v in match.items()):
            return run
    return None


def _paired(a: dict, b: dict, scenario: dict, rounds: int) -> list[tuple[dict, dict]]:
    """(a's run, b's run) of ``scenario`` per round, for the rounds where both have one."""
    pairs = []
    for round_number in range(1, rounds + 1):
        first = _run(a, round=round_number, **scenario)
        second = _run(b, round=round_number, **scenario)
        if first is not None and second is not None:
            pairs.append((first, second))
    return pairs


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, nan where the denominator is 0 (nothing measured)."""
    return numerator / denominator if denominator else float("nan")


def ratio_target(
    name: str,
    per_round_ratios: list[float],
    threshold: float,
    higher_is_better: bool,
    *,
    inclusive: bool = True,
    unit: str = "x",
    detail: str = "",
) -> dict:
    """One row of the targets table: the per-round ratios' median and range, and ``met``:
    whether the whole range clears ``threshold`` (its min ``>=`` the threshold where higher is
    better, its max ``<=`` where lower is; ``>`` and ``<`` with ``inclusive=False``). ``met``
    is None, not judged, from fewer than :data:`MIN_ROUNDS` rounds or when a round measured
    nothing (a ratio that is nan or infinite). ``unit``: "x" or "%" (how the report prints)."""
    row = {
        "target": name,
        "threshold": threshold,
        "higher_is_better": higher_is_better,
        "inclusive": inclusive,
        "unit": unit,
        "detail": detail,
        "rounds": len(per_round_ratios),
        **spread(per_round_ratios),
        "met": None,
    }
    if row["rounds"] < MIN_ROUNDS or not all(np.isfinite(row["per_round"])):
        return row
    if higher_is_better:
        met = row["min"] >= threshold if inclusive else row["min"] > threshold
    else:
        met = row["max"] <= threshold if inclusive else row["max"] < threshold
    row["met"] = bool(met)
    return row


def targets(result: dict) -> list[dict]:
    """The targets, each a :func:`ratio_target` row from the rounds of ``result``."""
    by_key = {contender["key"]: contender for contender in result["contenders"]}
    merged, rounds = by_key["merged"], result["plan"]["rounds"]
    uniform = _closed(result["plan"]["mix_concurrency"], "uniform")
    return [
        _memory_target(merged, by_key["floor"]),
        _throughput_target(
            "throughput >= the all-loaded separate models (uniform mix)",
            _paired(merged, by_key["separate"], uniform, rounds),
            1.0,
        ),
        _throughput_target(
            "throughput >= 3x the thrashing multiplexed setup (uniform mix)",
            _paired(merged, by_key["multiplexed"], uniform, rounds),
            3.0,
        ),
        _p50_target(_paired(merged, by_key["floor"], _closed(1, "identical"), rounds)),
        _apply_target(result["costs"]["batch_1"]),
    ]


def _weights(memory: dict) -> int:
    return memory["backbone_bytes"] + memory["resident_expert_bytes"]


def _memory_target(merged: dict, floor: dict) -> dict:
    pairs = list(zip(merged["memory_rounds"], floor["memory_rounds"], strict=False))
    resident = [_ratio(m["process_resident_bytes"], f["process_resident_bytes"]) for m, f in pairs]
    return ratio_target(
        "replica memory for all tasks <= 1.15x one model (weights)",
        [_ratio(_weights(m), f["backbone_bytes"]) for m, f in pairs],
        1.15,
        higher_is_better=False,
        detail=f"resident memory {_median(resident, '.2f')}x",
    )


def _throughput_target(name: str, pairs: list[tuple[dict, dict]], threshold: float) -> dict:
    detail = (
        f"{_median([a['throughput_rps'] for a, _ in pairs], '.1f')} vs "
        f"{_median([b['throughput_rps'] for _, b in pairs], '.1f')} req/s"
    )
    loads = sum(b["server"]["model_loads"] for _, b in pairs)
    if loads:
        detail += f"; {loads} model loads in {sum(b['requests'] for _, b in pairs)} requests"
    return ratio_target(
        name,
        [_ratio(a["throughput_rps"], b["throughput_rps"]) for a, b in pairs],
        threshold,
        higher_is_better=True,
        detail=detail,
    )


def _p50_target(pairs: list[tuple[dict, dict]]) -> dict:
    return ratio_target(
        "tagged p50 within 1.10x of one plain model (concurrency 1)",
        [_ratio(a["p50_ms"], b["p50_ms"]) for a, b in pairs],
        1.10,
        higher_is_better=False,
        detail=f"{_median([a['p50_ms'] for a, _ in pairs], '.1f')} vs "
        f"{_median([b['p50_ms'] for _, b in pairs], '.1f')} ms",
    )


def _apply_target(batch_1: dict) -> dict:
    """Row adapters where the server uses them (their extra over a plain forward), else the
    expert applied in place and restored; read from the costs, as the costs table is."""
    in_place = batch_1["apply_share_of_forward"]
    if "row_adapter_share_of_forward" in batch_1:
        shares = batch_1["row_adapter_share_of_forward"]["per_round"]
        detail = (
            "row adapters (the served path); in place + restore (sparse path): "
            f"{_formatted(in_place['median'], '%')}"
        )
    else:
        shares, detail = in_place["per_round"], "in place + restore"
    return ratio_target(
        "expert apply (+ restore) < 5% of a batch-1 forward",
        shares,
        0.05,
        higher_is_better=False,
        inclusive=False,
        unit="%",
        detail=detail,
    )


def _median(values: list[float], spec: str) -> str:
    return format(float(np.median(values)), spec) if values else "-"


def _formatted(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{100 * value:.1f}%"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.2f} {unit}"


def _range(row: dict, unit: str) -> str:
    if row["min"] is None:
        return "-"
    return f"{_formatted(row['min'], unit)}..{_formatted(row['max'], unit)}"


MIB = 2**20


def load_markdown(result: dict, command: str) -> str:
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
    lines = [
        "",
        "## Targets",
        "",
        f"Each ratio is taken per round and given as the median and the range (min..max) "
        f"over the rounds. Server targets: {result['plan']['rounds']} rounds, each starting "
        "every contender in turn on this machine, a ratio pairing runs of the same round; "
        "costs: interleaved timings in one process (see Costs). A target is met only when "
        f"its whole range clears it; from fewer than {MIN_ROUNDS} rounds it is not judged (-).",
        "",
        "| target | measured (medians) | rounds | per round | median | range | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in targets(result):
        unit = row["unit"]
        per_round = ", ".join(_formatted(v, unit) for v in row["per_round"]) or "-"
        met = {True: "yes", False: "no", None: "-"}[row["met"]]
        lines.append(
            f"| {row['target']} | {row['detail']} | {row['rounds']} | {per_round} "
            f"| {_formatted(row['median'], unit)} | {_range(row, unit)} | {met} |"
        )
    return lines


def _run_lines(result: dict) -> list[str]:
    lines = [
        "",
        "## Runs",
        "",
        "Client side, and what the server's Prometheus metrics saw (p50 as the histogram "
        "bucket's upper bound, texts per batch at the median, models loaded). Round 1 runs "
        "every scenario; later rounds only those the targets read.",
        "",
        "| contender | round | mode | concurrency / rate | mix | tagged | requests | errors "
        "| req/s | p50 ms | p90 ms | p99 ms | server p50 ms <= | batch p50 <= | loads |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for contender in result["contenders"]:
        for run in sorted(contender["runs"], key=lambda run: run["round"]):
            level = run.get("concurrency") if run["mode"] == "closed" else f"{run.get('rate')}/s"
            server = run["server"]
            lines.append(
                f"| {contender['name']} | {run['round']} | {run['mode']} | {level} "
                f"| {run['mix']} | {run.get('tagged', True)} | {run['requests']} "
                f"| {run['errors']} | {run['throughput_rps']:.1f} | {run['p50_ms']:.1f} "
                f"| {run['p90_ms']:.1f} | {run['p99_ms']:.1f} "
                f"| {_figure(server['p50_ms_bucket'], '.0f')} "
                f"| {_figure(server['batch_p50_texts_bucket'], '.0f')} | {server['model_loads']} |"
            )
    return lines


def _replica_memory_lines(result: dict) -> list[str]:
    lines = [
        "",
        "## Replica memory",
        "",
        "After round 1's runs.",
        "",
        "| contender | resident (RSS) MiB | PSS MiB | weights MiB |",
        "|---|---|---|---|",
    ]
    for contender in result["contenders"]:
        memory = contender["memory"]
        pss = "-" if memory.get("pss_bytes") is None else f"{memory['pss_bytes'] / MIB:.0f}"
        lines.append(
            f"| {contender['name']} | {memory['process_resident_bytes'] / MIB:.0f} | {pss} "
            f"| {_weights(memory) / MIB:.1f} |"
        )
    return lines


def _scaling_lines(result: dict) -> list[str]:
    lines = [
        "",
        "## Memory against the number of tasks",
        "",
        "Each N in a fresh process; resident memory read after one forward through every "
        "model (one classify for merged), so that the weights are paged in.",
        "",
        "| tasks | merged weights MiB | merged RSS MiB | separate weights MiB | separate RSS MiB |",
        "|---|---|---|---|---|",
    ]
    scaling = result["memory_scaling"]
    for merged, separate in zip(scaling[::2], scaling[1::2], strict=True):
        rss = "-" if separate["rss_bytes"] is None else f"{separate['rss_bytes'] / MIB:.0f}"
        mark = " (computed from per-model bytes)" if separate["computed"] else ""
        lines.append(
            f"| {merged['tasks']} | {merged['weights_bytes'] / MIB:.1f} "
            f"| {merged['rss_bytes'] / MIB:.0f} "
            f"| {separate['weights_bytes'] / MIB:.1f}{mark} | {rss} |"
        )
    return lines


COST_QUANTITIES = {
    "forward": "plain forward",
    "expert_apply_restore": "expert apply + restore in place (no forward)",
    "row_adapter_forward": "forward with row adapters",
    "served_forward": "forward as served (row adapters, or merged above 1,024 tokens)",
}
COST_SHARES = {
    "apply_share_of_forward": "expert apply + restore in place, share of a plain forward",
    "row_adapter_share_of_forward": "row adapters, extra over a plain forward",
    "served_share_of_forward": "as served, extra over a plain forward",
}


def _cost_lines(result: dict) -> list[str]:
    cost = result["costs"]
    timing = cost.get("timing", {})
    lines = [
        "",
        "## Costs",
        "",
        f"One process; each quantity timed once, those of a group interleaved (one call of "
        f"each in turn), {timing.get('rounds', '?')} rounds of {timing.get('repeats', '?')} "
        "alternations. ms: the median of the rounds' medians; shares: one per round. The "
        "targets table reads the same shares.",
        "",
        "| what | median | range over rounds |",
        "|---|---|---|",
    ]
    for batch in ("batch_1", "batch_32"):
        figures, size = cost[batch], batch.replace("_", " ")
        for name, label in COST_QUANTITIES.items():
            if f"{name}_ms" in figures:
                ms = spread([r[name] for r in figures["rounds_ms"]])
                lines.append(
                    f"| {label}, {size} | {_formatted(ms['median'], 'ms')} | {_range(ms, 'ms')} |"
                )
        for name, label in COST_SHARES.items():
            if name in figures:
                share = figures[name]
                lines.append(
                    f"| {label}, {size} | {_formatted(share['median'], '%')} "
                    f"| {_range(share, '%')} |"
                )
    if "router" in cost:
        router = cost["router"]
        overhead = router["router_overhead_ms"]
        lines += [
            f"| one text, tagged | {_formatted(router['tagged_ms'], 'ms')} | |",
            f"| one text, untagged (router + forward) "
            f"| {_formatted(router['untagged_ms'], 'ms')} | |",
            f"| router overhead | {_formatted(overhead['median'], 'ms')} "
            f"| {_range(overhead, 'ms')} |",
        ]
        if "untagged_over_tagged" in router:  # runs before the router issue lack it
            ratio = router["untagged_over_tagged"]
            lines.append(
                f"| untagged / tagged, one text (target <= 1.10x) | {ratio['median']:.2f}x "
                f"| {ratio['min']:.2f}x..{ratio['max']:.2f}x |"
            )
    return lines


def _merge_cost_lines(result: dict) -> list[str]:
    lines = [
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
            f"| {row['name']} | {row['wall_seconds']:.1f} | {row['peak_rss_bytes'] / MIB:.0f} "
            f"| {row['artifact_bytes'] / MIB:.1f} | {per_task:.0f} "
            f"| {row['rss_after_imports_bytes'] / MIB:.0f} |"
        )
    return lines


def _figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


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
        run = _run(contender, round=1, **_closed(level, "uniform")) or _run(
            contender, round=1, **_closed(level, "identical")
        )
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


def write_cost_results(artifact: Path, out: Path, command: str) -> str:
    """``bench load --costs-only``: the costs alone (expert apply, row adapters, router) of
    ``artifact``, written to ``out/costs.{json,md}``; the markdown."""
    from freemerge.merging.files import write_json_atomically, write_text_atomically

    start = time.perf_counter()
    tasks = list(open_artifact(artifact, verify=False).tasks)
    result = {
        "machine": describe_machine(),
        "artifact": str(artifact),
        "costs": costs(artifact, contender_texts(tasks)[tasks[0]]),
        "wall_seconds": round(time.perf_counter() - start),
    }
    target = _apply_target(result["costs"]["batch_1"])
    lines = [
        "# Costs of the expert path",
        "",
        f"Machine: {machine_line(result['machine'])}. Whole run: {result['wall_seconds']} s.",
        f"Artifact: `{artifact}`. Command: `{command}`",
        "",
        f"Target: {target['target']}: {_formatted(target['median'], '%')} "
        f"({_range(target, '%')}), {'met' if target['met'] else 'not met'}.",
        *_cost_lines(result),
    ]
    markdown = "\n".join(lines) + "\n"
    write_json_atomically(out / "costs.json", result)
    write_text_atomically(out / "costs.md", markdown)
    return markdown
