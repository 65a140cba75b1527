"""HTTP load generator for the benchmarks: closed loop (fixed concurrency) or open loop
(Poisson arrivals at a fixed rate), bounded in requests and time, run in its own process so the
client never competes with the server for the same interpreter.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field

import aiohttp
import numpy as np

from freemerge.benchmarks.spawn import run_in_child

MIXES = ("identical", "uniform", "skewed", "distinct")
ANSWER_TIMEOUT_S = 60.0  # a request without an answer by then counts as failed (status 0)
JSON = {"content-type": "application/json"}


@dataclass
class LoadSpec:
    url: str
    tasks: list[str]
    texts: dict[str, list[str]]
    mix: str = "uniform"
    tagged: bool = True
    mode: str = "closed"  # closed | open
    concurrency: int = 1  # closed loop
    rate: float = 10.0  # open loop, requests per second
    requests: int = 200
    max_seconds: float = 60.0
    seed: int = 0
    zipf_a: float = 1.2
    bodies: list[dict] | None = None  # explicit request bodies, cycled, instead of a mix


@dataclass
class LoadResult:
    spec: dict
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # the load generator's own CPU over the run (all its threads)
    # Per request: seconds since start when sent, latency, HTTP status (0: no answer), the
    # artifact version answered and the labels, in the order sent.
    records: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        lat = np.array(self.latencies) if self.latencies else np.array([np.nan])
        return {
            "requests": len(self.latencies) + self.errors,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "throughput_rps": len(self.latencies) / self.seconds if self.seconds else 0.0,
            "p50_ms": float(np.percentile(lat, 50) * 1000),
            "p90_ms": float(np.percentile(lat, 90) * 1000),
            "p99_ms": float(np.percentile(lat, 99) * 1000),
            "latencies_ms": [round(x * 1000, 3) for x in self.latencies],
        }


def task_sequence(
    tasks: list[str], mix: str, count: int, seed: int, zipf_a: float = 1.2
) -> list[str]:
    """Punica's popularity mixes: one task, uniform, Zipf-skewed, or a new task every request."""
    rng = np.random.default_rng(seed)
    if mix == "identical":
        return [tasks[0]] * count
    if mix == "uniform":
        return [tasks[i] for i in rng.integers(len(tasks), size=count)]
    if mix == "skewed":
        weights = 1.0 / np.arange(1, len(tasks) + 1) ** zipf_a
        return [tasks[i] for i in rng.choice(len(tasks), size=count, p=weights / weights.sum())]
    if mix == "distinct":
        return [tasks[i % len(tasks)] for i in range(count)]
    raise ValueError(f"unknown mix {mix!r}; allowed: {', '.join(MIXES)}")


def _bodies(spec: LoadSpec) -> Iterator[bytes]:
    if spec.bodies:
        for i in range(spec.requests):
            yield json.dumps(spec.bodies[i % len(spec.bodies)]).encode()
        return
    rng = np.random.default_rng(spec.seed + 1)
    for task in task_sequence(spec.tasks, spec.mix, spec.requests, spec.seed, spec.zipf_a):
        pool = spec.texts[task]
        body = {"inputs": [pool[int(rng.integers(len(pool)))]]}
        if spec.tagged:
            body["task"] = task
        yield json.dumps(body).encode()


def call(
    url: str,
    body: object = None,
    raw: bytes | None = None,
    timeout: float = 60,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict | None]:
    """(HTTP status, JSON answer) of a POST of ``body`` as JSON (or of ``raw`` bytes), or of a
    GET when both are None, with extra ``headers``. Status 0 when no answer came; answer None
    when it is not JSON."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    sent = {"content-type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=data, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read()
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return 0, None
    try:
        return status, json.loads(text)
    except ValueError:
        return status, None


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, bytes]:
    """(HTTP status, body) of one POST over the session's kept-alive connections; status 0
    when no answer came."""
    try:
        async with session.post(url, data=body, headers=JSON) as response:
            return response.status, await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return 0, b""


def run_load(spec: LoadSpec) -> LoadResult:
    """Drive the load in this process, from one event loop over kept-alive HTTP/1.1
    connections (aiohttp's pool, as clients' pools send them: a connection is reused once its
    answer is read, a new one opened only when all are busy); stops after ``requests`` or
    ``max_seconds``. One loop rather than a thread per client keeps the generator's own CPU per
    request low (it shares the cores with the server it measures)."""
    return asyncio.run(_run_load(spec))


async def _run_load(spec: LoadSpec) -> LoadResult:
    result = LoadResult(asdict(spec) | {"texts": None})
    bodies = _bodies(spec)  # encoded as they are sent: a spec may allow far more than get sent
    connector = aiohttp.TCPConnector(limit=0)  # no cap: the spec bounds the concurrency
    timeout = aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        cpu_start, start = time.process_time(), time.perf_counter()

        async def one(body: bytes, index: int) -> None:
            sent = time.perf_counter()
            status, text = await _post(session, spec.url, body)
            _record(result, index, sent - start, time.perf_counter() - sent, status, text)

        deadline = start + spec.max_seconds
        if spec.mode == "closed":
            await _closed_loop(spec, bodies, one, deadline)
        elif spec.mode == "open":
            await _open_loop(spec, bodies, one, start, deadline)
        else:
            raise ValueError(f"unknown load mode {spec.mode!r}; allowed: closed, open")
        result.seconds = time.perf_counter() - start
        result.cpu_seconds = time.process_time() - cpu_start
    return result


def _record(
    result: LoadResult, index: int, sent: float, latency: float, status: int, text: bytes
) -> None:
    """One request's outcome into ``result`` (an answer's version and labels from its JSON)."""
    answer = None
    if status == 200:
        result.latencies.append(latency)
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
    else:
        result.errors += 1
    result.records.append(
        {
            "index": index,
            "sent": sent,
            "latency": latency,
            "status": status,
            "version": answer and answer["artifact_version"],
            "labels": answer and [r["label"] for r in answer["results"]],
        }
    )


async def _closed_loop(
    spec: LoadSpec,
    bodies: Iterator[bytes],
    send: Callable[[bytes, int], Awaitable[None]],
    deadline: float,
) -> None:
    """``spec.concurrency`` clients, each sending its next request when its last one ends."""
    queue = enumerate(bodies)

    async def client() -> None:
        while time.perf_counter() < deadline:
            item = next(queue, None)
            if item is None:
                return
            await send(item[1], item[0])

    await asyncio.gather(*(client() for _ in range(spec.concurrency)))


async def _open_loop(
    spec: LoadSpec,
    bodies: Iterator[bytes],
    send: Callable[[bytes, int], Awaitable[None]],
    start: float,
    deadline: float,
) -> None:
    """Requests at Poisson arrivals of ``spec.rate`` per second, whatever the answers do."""
    gaps = np.random.default_rng(spec.seed + 2).exponential(1.0 / spec.rate, spec.requests)
    pending = set()
    due = start
    for index, (body, gap) in enumerate(zip(bodies, gaps, strict=True)):
        due += gap
        if due > deadline:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        task = asyncio.ensure_future(send(body, index))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)


def run_load_in_process(spec: LoadSpec) -> LoadResult:
    """:func:`run_load` in a separate process, so client and server do not share a GIL."""
    return run_in_child(run_load, spec, timeout=spec.max_seconds + 180)
