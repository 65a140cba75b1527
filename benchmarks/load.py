"""``freemerge bench load``: the merged server against N separate models, side by side.

Each contender is started in turn on a local Ray with the same settings and driven over HTTP
from a separate process: closed loop at several concurrencies, Punica's task mixes, tagged
and untagged traffic, and open loop at Poisson rates. A whole run also measures replica memory
against the number of tasks (:mod:`~freemerge.benchmarks.memory`) and the costs of expert
apply, routing, one forward and each merge (:mod:`~freemerge.benchmarks.costs`).
:mod:`~freemerge.benchmarks.load_targets` judges the targets, ``load_report`` and
``load_plots`` render a result, ``load_results`` writes it.

The targets are measured in rounds. One round starts every contender in turn (merged,
separate, multiplexed, floor), and the rounds follow each other (A B C D A B C D ...), so that
the machine's drift hits every contender alike. Round 1 runs every scenario; later rounds run
only the scenarios the targets read. A target's ratio is taken per round, contenders of the
same round paired, and reported as the median and the range over the rounds; a target is met
only when the whole range clears it, and is not judged from fewer than
:data:`~freemerge.benchmarks.judging.MIN_ROUNDS`.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from freemerge.benchmarks.costs import MERGE_METHODS, costs, merge_costs
from freemerge.benchmarks.evaluate import task_texts
from freemerge.benchmarks.judging import MIN_ROUNDS
from freemerge.benchmarks.loadgen import LoadSpec, run_load_in_process
from freemerge.benchmarks.machine import describe_machine
from freemerge.benchmarks.memory import memory_scaling, replica_memory
from freemerge.merging.artifact import open_artifact
from freemerge.serving.local import free_port, start_local, stop_local
from freemerge.serving.metrics import (
    bucket_counts,
    counter_total,
    quantile_of_buckets,
    scrape,
    scrape_until,
)
from freemerge.serving.settings import ServingOptions

METRICS_INTERVAL_MS = 1000  # Ray's metrics export interval during the bench

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
    """What a run measures: the sweep's scenarios, the numbers of tasks of the memory scaling,
    the merge methods costed, and the rounds of the target scenarios."""

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


def closed_loop(concurrency: int, mix: str, tagged: bool = True) -> dict:
    """A closed-loop scenario: ``concurrency`` clients, each sending again once answered."""
    return {"mode": "closed", "concurrency": concurrency, "mix": mix, "tagged": tagged}


WARM_UP = closed_loop(1, "identical")  # before the measured runs of every start; not kept


def target_scenarios(contender: Contender, plan: LoadPlan) -> list[dict]:
    """The scenarios the targets read, run in every round: the uniform mix at
    ``mix_concurrency`` (merged, separate, multiplexed) and one client with one task (merged
    and the floor)."""
    uniform, alone = closed_loop(plan.mix_concurrency, "uniform"), closed_loop(1, "identical")
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
        return [
            closed_loop(1, "uniform"),
            closed_loop(level, "uniform"),
            closed_loop(level, "skewed"),
        ]
    spread = "uniform" if len(contender.tasks) > 1 else "identical"
    scenarios = [closed_loop(concurrency, spread) for concurrency in plan.concurrencies]
    if len(contender.tasks) > 1:
        scenarios += [closed_loop(plan.mix_concurrency, mix) for mix in plan.mixes]
        if contender.routed:
            scenarios.append(closed_loop(plan.mix_concurrency, "uniform", tagged=False))
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


def contender_texts(tasks: list[str], count: int = 50) -> dict[str, list[str]]:
    """Each task's first ``count`` test texts, cut to 1,000 characters."""
    return {task: [t[:1000] for t in task_texts(task, "test")[0][:count]] for task in tasks}


def run_load_bench(artifact: Path, zoo: Path, plan: LoadPlan) -> dict:
    """Every contender in rounds, memory scaling and costs; the JSON-able result."""
    start = time.perf_counter()
    tasks = list(open_artifact(artifact, verify=False).tasks)
    texts = contender_texts(tasks)
    contenders = run_contenders(contenders_for(artifact, zoo, tasks, texts, plan), plan)
    print("== memory against the number of tasks", flush=True)
    scaling = memory_scaling(artifact, zoo, plan.memory_tasks, plan.separate_measured_up_to)
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
