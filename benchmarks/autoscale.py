"""``freemerge bench autoscale``: autoscaling and a rolling update, shown on one machine.

Deploys with Serve autoscaling on the local Ray (min 1, max 2 replicas of one CPU each, short
delays), drives closed-loop load from a separate process while sampling the replica count,
and waits for the scale back down. Then, under load again, rolls the deployment to a second
artifact version. Every answer is checked against what that version's engine answers locally.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
from ray import serve

from freemerge.benchmarks.evaluate import task_texts
from freemerge.benchmarks.loadgen import LoadSpec, run_load_in_process
from freemerge.benchmarks.machine import describe_machine
from freemerge.merging.artifact import open_artifact
from freemerge.serving.app import build_app
from freemerge.serving.engine import MergedEngine
from freemerge.serving.local import APP_NAME, free_port, start_local, stop_local
from freemerge.serving.requests import ClassifyRequest, StageTimings

AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 2,
    "downscale_delay_s": 8,
    "metrics_interval_s": 1,
    "look_back_period_s": 2,
}


def running_replicas(deployment: str = "ModelReplica") -> int:
    """RUNNING replicas of one deployment of the app (by default the model replicas)."""
    deployments = serve.status().applications[APP_NAME].deployments
    return (
        deployments[deployment].replica_states.get("RUNNING", 0) if deployment in deployments else 0
    )


class ReplicaSampler:
    """Samples the RUNNING replica count every ``period`` seconds on a thread."""

    def __init__(self, start: float, period: float = 0.5) -> None:
        self.start, self.period = start, period
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter() - self.start, running_replicas()))
            except (KeyError, ray.exceptions.RayError):
                pass
            time.sleep(self.period)

    def __enter__(self) -> ReplicaSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def request_bodies(artifact: Path, per_task: int = 3) -> list[dict]:
    bodies = []
    for task in open_artifact(artifact, verify=False).tasks:
        for text in task_texts(task, "test")[0][:per_task]:
            bodies.append({"task": task, "inputs": [text[:1000]]})
    return bodies


def expected_labels(artifact: Path, bodies: list[dict]) -> tuple[str, dict[int, list[str]]]:
    """The artifact's version and the labels its own engine gives each body."""
    engine = MergedEngine(artifact, "cpu")
    answers = engine.classify_requests(
        [ClassifyRequest(b["task"], b["inputs"], 0.0) for b in bodies], StageTimings()
    )
    return engine.version, {i: [a.label for a in answer] for i, answer in enumerate(answers)}


def check_answers(records: list[dict], bodies: list[dict], expected: dict[str, dict]) -> dict:
    """Failed requests, wrong answers (against the answering version), versions seen."""
    failed = sum(1 for r in records if r["status"] != 200)
    wrong = sum(
        1
        for r in records
        if r["status"] == 200 and r["labels"] != expected[r["version"]][r["index"] % len(bodies)]
    )
    return {
        "requests": len(records),
        "failed": failed,
        "wrong": wrong,
        "versions": sorted({r["version"] for r in records if r["version"]}),
    }


def per_second(records: list[dict]) -> list[dict]:
    """Answers and p50 latency per second, on the sampler's clock (``sent``)."""
    seconds: dict[int, list[float]] = {}
    for r in records:
        if r["status"] == 200:
            seconds.setdefault(int(r["sent"]), []).append(r["latency"])
    return [
        {"t": t, "throughput_rps": len(v), "p50_ms": float(np.median(v) * 1000)}
        for t, v in sorted(seconds.items())
    ]


def load_until(
    spec: LoadSpec,
    clock: float,
    done: Callable[[], bool],
    min_seconds: float,
    max_seconds: float,
    chunk: float = 8.0,
) -> list[dict]:
    """Closed-loop load in chunks (each in a fresh process) for at least ``min_seconds`` and
    until ``done()``, at most ``max_seconds``; records carry ``sent`` on the caller's clock."""
    records: list[dict] = []
    begin = time.perf_counter()
    while True:
        offset = time.perf_counter() - clock
        part = run_load_in_process(dataclasses.replace(spec, max_seconds=chunk))
        records += [{**r, "sent": r["sent"] + offset} for r in part.records]
        elapsed = time.perf_counter() - begin
        if elapsed >= max_seconds or (elapsed >= min_seconds and done()):
            return records


def run_autoscale_bench(
    artifact: Path,
    new_artifact: Path,
    load_seconds: float = 40.0,
    concurrency: int = 8,
    settle_seconds: float = 120.0,
) -> dict:
    """Scale up under load (until 2 replicas ran for a while), down when idle, then roll out
    ``new_artifact`` under load; every answer is checked against its version's engine."""
    bodies = request_bodies(artifact)
    versions = dict(expected_labels(a, bodies) for a in (artifact, new_artifact))
    port, metrics_port = free_port(), free_port()
    options = {
        "artifact": str(artifact),
        "device": "cpu",
        "cpus_per_replica": 1,
        "autoscaling": AUTOSCALING,
    }
    start_local(options, port=port, metrics_port=metrics_port, num_cpus=2)
    spec = LoadSpec(
        url=f"http://127.0.0.1:{port}/v1/classify",
        tasks=[],
        texts={},
        bodies=bodies,
        concurrency=concurrency,
        requests=100_000,
    )
    try:
        clock = time.perf_counter()
        with ReplicaSampler(clock) as sampler:
            scale = _scale_phase(spec, clock, sampler, load_seconds, settle_seconds)
            update = _rolling_update(
                spec, clock, {**options, "artifact": str(new_artifact)}, settle_seconds
            )
        samples = sampler.samples
    finally:
        stop_local()
    after_load = [n for t, n in samples if scale["load_end"] <= t < update["start"]]
    scale_records, update_records = scale.pop("records"), update.pop("records")
    return {
        "machine": describe_machine(),
        "autoscaling": AUTOSCALING,
        "concurrency": concurrency,
        "load_seconds": load_seconds,
        "replica_samples": samples,
        "scale": {
            **scale,
            "max_replicas_seen": max((n for _, n in samples), default=0),
            "back_to_one": bool(after_load) and after_load[-1] == 1,
            "answers": check_answers(scale_records, bodies, versions),
        },
        "rolling_update": {
            **update,
            "answers": check_answers(update_records, bodies, versions),
            "last_version": max(update_records, key=lambda r: r["sent"])["version"],
            "new_version": list(versions)[-1],
        },
    }


def _scale_phase(
    spec: LoadSpec,
    clock: float,
    sampler: ReplicaSampler,
    load_seconds: float,
    settle_seconds: float,
) -> dict:
    """Load until the deployment has held its maximum replicas for 10 s (at least
    ``load_seconds``), then wait (at most ``settle_seconds``) for it to scale back to one."""
    load_start = time.perf_counter() - clock
    max_replicas = AUTOSCALING["max_replicas"]

    def scaled_and_held() -> bool:  # at max replicas for the last 10 s of samples
        recent = [n for t, n in sampler.samples if t > time.perf_counter() - clock - 10]
        return bool(recent) and min(recent) == max_replicas

    records = load_until(spec, clock, scaled_and_held, load_seconds, 4 * load_seconds)
    load_end = time.perf_counter() - clock
    deadline = time.perf_counter() + settle_seconds
    while time.perf_counter() < deadline and running_replicas() > 1:
        time.sleep(1)
    time.sleep(2)
    return {
        "load_start": load_start,
        "load_end": load_end,
        "per_second": per_second(records),
        "records": records,
    }


def _rolling_update(spec: LoadSpec, clock: float, new_options: dict, settle_seconds: float) -> dict:
    """Under load, deploy ``new_options`` over the running app (5 s in); load until the
    rollout has finished, then 5 s more."""
    start = time.perf_counter() - clock
    rollout: dict = {}

    def roll() -> None:
        time.sleep(5)
        rollout["at"] = time.perf_counter() - clock
        serve.run(build_app(new_options), name=APP_NAME, route_prefix="/")
        rollout["done"] = time.perf_counter() - clock

    roller = threading.Thread(target=roll)
    roller.start()
    records = load_until(spec, clock, lambda: not roller.is_alive(), 15, settle_seconds + 60)
    roller.join()
    records += load_until(spec, clock, lambda: True, 5, 5)
    return {"start": start, **rollout, "per_second": per_second(records), "records": records}


def autoscale_plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, middle, bottom) = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    samples = result["replica_samples"]
    top.step([t for t, _ in samples], [n for _, n in samples], where="post")
    top.set(ylabel="replicas", title="Autoscaling (min 1, max 2) and a rolling update")
    for phase in ("scale", "rolling_update"):
        rows = result[phase]["per_second"]
        middle.plot([r["t"] for r in rows], [r["throughput_rps"] for r in rows], color="C0")
        bottom.plot([r["t"] for r in rows], [r["p50_ms"] for r in rows], color="C1")
    for axis in (top, middle, bottom):
        if "at" in result["rolling_update"]:
            axis.axvline(result["rolling_update"]["at"], color="grey", linestyle="--")
    middle.set(ylabel="answers / s")
    bottom.set(ylabel="p50 latency (ms)", xlabel="seconds")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_autoscale_results(
    artifact: Path, new_artifact: Path, load_seconds: float, out: Path, command: str
) -> dict:
    """Run the bench; write ``autoscale.json`` and the timeline plot under ``out``."""
    from freemerge.merging.files import write_json_atomically

    result = run_autoscale_bench(artifact, new_artifact, load_seconds=load_seconds)
    result["command"] = command
    write_json_atomically(out / "autoscale.json", result)
    autoscale_plot(result, out / "autoscale_timeline.png")
    scale, update = result["scale"], result["rolling_update"]
    print(
        f"max replicas under load: {scale['max_replicas_seen']}; back to one after: "
        f"{scale['back_to_one']}; answers: {scale['answers']}"
    )
    print(
        f"rolling update: answers {update['answers']}; last answer from the new version: "
        f"{update['last_version'] == update['new_version']}"
    )
    return result
