"""The model deployments: where torch runs. One engine per replica, loaded once and warmed
up, its batches formed continuously and run on one model thread.

:class:`ModelReplica` serves the merged artifact (or the separate models whole);
:class:`MultiplexedModels` serves separate models through Serve's model multiplexing. The HTTP
fronts (:mod:`freemerge.serving.app`) call them and never import this module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch
from ray import serve

from freemerge.merging.artifact import read_manifest
from freemerge.merging.kind_rules import ROUTE_OF_KIND
from freemerge.serving.batcher import Batcher
from freemerge.serving.engine import (
    Engine,
    MergedEngine,
    SeparateEngine,
    TaskModel,
    ZooTasks,
    classify_by_task,
    pick_device,
    separate_memory,
)
from freemerge.serving.metrics import ServerMetrics
from freemerge.serving.requests import Answered, ClassifyRequest, Limits, StageTimings
from freemerge.serving.settings import ServingOptions, artifact_update

T = TypeVar("T")
logger = logging.getLogger(__name__)


def build_engine(options: ServingOptions) -> Engine:
    device, limits = options.device, Limits.of_options(options)
    if options.artifact:
        return MergedEngine(
            options.artifact,
            device,
            limits,
            mixing=options.mixing,
            host_expert_bytes=options.host_expert_bytes,
            device_expert_bytes=options.device_expert_bytes,
            pass_overhead_tokens=options.pass_overhead_tokens,
            max_batch_tokens=options.max_batch_tokens,
            expect_version=options.expect_version,
            merge_above_tokens=options.merge_above_tokens
            if options.merge_above_tokens and options.merge_above_tokens > 0
            else None,
        )
    return SeparateEngine(
        options.zoo,
        device,
        limits,
        options.tasks,
        options.pass_overhead_tokens,
        options.max_batch_tokens,
    )


def warm_up(engine: Engine) -> None:
    """One short text through the first task, so the replica has answered once before it
    takes traffic."""
    first = engine.tasks_info()[0]
    text = ["warm-up", "warm-up"] if first["text_pairs"] == "required" else "warm-up"
    request = engine.check(first["task"], [text], route=ROUTE_OF_KIND[first["kind"]])
    engine.classify_requests([request], StageTimings())


class ModelThread:
    """The one thread that does a replica's torch work, loading and batches alike.

    The model runs off the event loop so new requests keep queueing for the next batch, and
    always on this same thread: PyTorch's OpenMP pool belongs to the calling thread, and a
    second pool beside it on a few cores slowed the forwards. Batches never overlap, so
    in-place expert swaps cannot interleave. It counts as stuck when a call makes no progress
    (a call's start, or a :meth:`beat` from each forward pass) for a deadline.
    """

    def __init__(self, threads: int) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="freemerge-model")
        self.last_progress: float | None = None  # while a call runs; None when idle
        self.call(torch.set_num_threads, max(1, threads))

    def beat(self) -> None:
        """The running call made progress (a forward pass ended)."""
        self.last_progress = time.monotonic()

    def _timed(self, function: Callable[..., T], *args: Any) -> T:
        self.beat()
        try:
            return function(*args)
        finally:
            self.last_progress = None

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the model thread, waiting for it (for ``__init__``)."""
        return self.executor.submit(self._timed, function, *args).result()

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the model thread without blocking the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._timed, function, *args)

    def stuck(self, deadline_s: float) -> bool:
        """Whether a running call has made no progress for ``deadline_s``."""
        since = self.last_progress
        return since is not None and time.monotonic() - since > deadline_s

    async def responds(self, deadline_s: float) -> bool:
        """Whether a no-op runs on the model thread within ``deadline_s``, or the call ahead
        of it keeps making progress (a long batch is not a stuck one)."""
        noop = asyncio.ensure_future(self.run(lambda: None))
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            done, _ = await asyncio.wait({noop}, timeout=min(1.0, end - time.monotonic()))
            if done:
                return True
            if self.last_progress is not None and not self.stuck(deadline_s):
                return True
        return noop.done()


async def answer_batch(
    model_thread: ModelThread,
    classify: Callable[[list[ClassifyRequest], StageTimings], list[list[Any]]],
    requests: list[ClassifyRequest],
    metrics: ServerMetrics,
) -> list[list[Any] | Exception]:
    """Run ``classify(requests, timings)`` on one batch on the model thread; record metrics.

    One request's failure never fails another: if the batch fails, each request runs alone,
    and only a request that fails alone gets its exception in place of its answers."""
    try:
        return await _run_batch(model_thread, classify, requests, metrics)
    except Exception as err:
        if len(requests) == 1:
            return [err]
        logger.warning("a batch of %d failed (%r); running its requests alone", len(requests), err)
    answers: list[list[Any] | Exception] = []
    for request in requests:
        try:
            answers += await _run_batch(model_thread, classify, [request], metrics)
        except Exception as err:
            answers.append(err)
    return answers


async def _run_batch(
    model_thread: ModelThread,
    classify: Callable[[list[ClassifyRequest], StageTimings], list[list[Any]]],
    requests: list[ClassifyRequest],
    metrics: ServerMetrics,
) -> list[list[Any]]:
    started = time.perf_counter()
    timings = StageTimings(progress=model_thread.beat)
    answers = await model_thread.run(classify, requests, timings)
    metrics.batch([started - r.arrived for r in requests], timings, answers)
    return answers


@serve.deployment(health_check_period_s=10)
class ModelReplica:
    """One replica of the models: the engine (merged, or the separate models) loaded once and
    warmed up, requests batched continuously (:class:`Batcher`: the next batch forms while
    one runs) on the model thread. Behind the :class:`ClassifierServer` fronts, which send
    their queued requests in one call and retry it on another replica if this one dies."""

    def __init__(self, options: ServingOptions) -> None:
        """A merged artifact arrives through :meth:`reconfigure` (``user_config``), which Serve
        calls before the replica takes traffic; separate models through ``options``."""
        self.options = options
        self.metrics = ServerMetrics()
        self.deadline_s = 2 * options.request_timeout_s
        self.model_thread = ModelThread(options.torch_threads)
        # reads cold experts from disk, so a request waiting for one holds up no batch
        self.fetcher = ThreadPoolExecutor(1, thread_name_prefix="freemerge-fetch")
        # no wait: the fronts send formed batches (they waited); a call smaller than the last
        # would wait for requests that no front holds. Calls that queue while a batch runs
        # still join the next one.
        self.batcher = Batcher(self._run_batch, options.max_batch_size, 0.0)
        self.engine: Engine | None = None
        if options.zoo or options.artifact:
            self._start(options)

    def _start(self, options: ServingOptions) -> None:
        self.engine = self.model_thread.call(build_engine, options)
        self.model_thread.call(warm_up, self.engine)
        self.metrics.refresh_memory_every(2.0, lambda: self.engine.memory())

    async def classify(self, requests: list[ClassifyRequest]) -> list[Answered | Exception]:
        """Answers to checked requests (a front's batch), each an :class:`Answered` or the
        exception that request alone failed with; they join the replica's next batch."""
        arrived, loop = time.perf_counter(), asyncio.get_running_loop()  # this process's clock
        for request in requests:
            request.arrived = arrived
            if self.engine.is_cold(request):
                await loop.run_in_executor(self.fetcher, self.engine.prefetch, request)
        return await self.batcher.submit(requests)

    async def _run_batch(self, requests: list[ClassifyRequest]) -> list[Answered | Exception]:
        engine = self.engine  # the whole batch runs on one version, even if an update lands
        answers = await answer_batch(
            self.model_thread, engine.classify_requests, requests, self.metrics
        )
        self.metrics.experts(engine.expert_tiers(), engine.expert_fetches())
        return [a if isinstance(a, Exception) else Answered(engine.version, a) for a in answers]

    async def reconfigure(self, config: dict) -> None:
        """Ray Serve's lightweight update (``user_config``, which ``serve deploy`` and a
        RayService drive): move to the artifact version it names without a restart. The new
        version is loaded on the model thread between batches, keeping what is unchanged
        (the backbone when its files hash the same); batches already running finish on the
        old version, later ones run on the new; every answer names its version."""
        update = artifact_update(config)
        if update is None:
            return
        path, expected = update
        if self.engine is None:  # the replica's first artifact
            options = dataclasses.replace(self.options, artifact=path, expect_version=expected)
            await asyncio.get_running_loop().run_in_executor(None, self._start, options)
            return
        if not isinstance(self.engine, MergedEngine):
            raise ValueError("user_config names an artifact, but this replica serves a zoo")
        if read_manifest(Path(path))[1] == self.engine.version:
            return
        self.engine = await self.model_thread.run(self.engine.updated, Path(path), expected)
        logger.info("now serving artifact version %s", self.engine.version)

    def describe(self) -> dict:
        """The ``/v1/tasks`` answer."""
        return {
            "artifact_version": self.engine.version,
            "tasks": self.engine.tasks_info(),
            "router": self.engine.has_router,
            "dtype": getattr(self.engine, "dtype", "float32"),
        }

    def problem(self) -> str | None:
        """Why this replica cannot answer, or None: a backbone restore that failed, or a model
        thread without progress (no forward pass ended) for twice the request timeout."""
        if self.engine is None:
            return "no artifact yet: the deployment's user_config names none"
        if self.engine.damaged is not None:
            return f"the backbone may be altered: {self.engine.damaged}"
        if self.model_thread.stuck(self.deadline_s):
            return f"the model thread has made no progress for over {self.deadline_s:g} s"
        return None

    async def check_health(self) -> None:
        """Ray's health check: raising marks the replica unhealthy, and Ray replaces it. Beyond
        :meth:`problem`, a no-op must run on the model thread within twice the timeout."""
        problem = self.problem()
        if problem is None and not await self.model_thread.responds(self.deadline_s):
            problem = f"the model thread ran no no-op within {self.deadline_s:g} s"
        if problem is not None:
            raise RuntimeError(problem)

    async def status(self) -> dict:
        """For ``/readyz``: the problem (None when ready), the version, this process, its memory."""
        return {
            "problem": self.problem(),
            "version": self.engine.version,
            "pid": os.getpid(),
            "memory": self.engine.memory(),
        }


@serve.deployment(health_check_period_s=10)
class MultiplexedModels:
    """Separate fine-tuned models through Ray Serve model multiplexing: the task is the model
    id, a replica holds at most ``models_per_replica`` of them, loading on demand and evicting
    the least recently used; Serve routes a task's requests to a replica that holds its model.
    """

    def __init__(self, options: ServingOptions) -> None:
        self.model_thread = ModelThread(options.torch_threads)
        self.device = pick_device(options.device)
        self.zoo = ZooTasks(options.zoo, Limits.of_options(options), options.tasks)
        self.metrics = ServerMetrics()
        self.loaded: weakref.WeakValueDictionary[str, TaskModel] = weakref.WeakValueDictionary()

        async def load_model(task: str) -> TaskModel:
            start = time.perf_counter()
            model = await self.model_thread.run(
                TaskModel,
                self.zoo.paths[task],
                task,
                self.device,
                options.pass_overhead_tokens,
                options.max_batch_tokens,
            )
            self.metrics.model_loaded(task, time.perf_counter() - start)
            self.loaded[task] = model
            return model

        per_replica = options.models_per_replica
        self.load_model = serve.multiplexed(max_num_models_per_replica=per_replica)(load_model)
        self.metrics.refresh_memory_every(2.0, self.memory_figures)
        self.batcher = Batcher(
            self._run_batch,
            options.max_batch_size,
            options.batch_wait_timeout_s,
            wait_share=options.batch_wait_run_share,
        )

    async def classify(self, requests: list[ClassifyRequest]) -> list[Answered | Exception]:
        """As :meth:`ModelReplica.classify`; a front sends each request in a call of its own
        (routed by its task), and this replica's batcher gathers them."""
        arrived = time.perf_counter()  # this process's clock, for the queue stage
        for request in requests:
            request.arrived = arrived
        answers = await self.batcher.submit(requests)
        return [a if isinstance(a, Exception) else Answered(self.zoo.version, a) for a in answers]

    async def _run_batch(self, requests: list[ClassifyRequest]) -> list[list[Any] | Exception]:
        """Each task's model (loaded if this replica does not hold it) on that task's rows."""
        models = {task: await self.load_model(task) for task in {r.task for r in requests}}
        return await answer_batch(
            self.model_thread,
            lambda batch, timings: classify_by_task(batch, models.__getitem__, timings),
            requests,
            self.metrics,
        )

    def memory_figures(self) -> dict[str, int]:
        return separate_memory(list(self.loaded.values()), self.device)

    def describe(self) -> dict:
        """The ``/v1/tasks`` answer."""
        return {
            "artifact_version": self.zoo.version,
            "tasks": self.zoo.tasks_info(),
            "router": False,
        }

    async def status(self) -> dict:
        """For ``/readyz``: no problem ever (models load on demand), version, process, memory."""
        return {
            "problem": None,
            "version": self.zoo.version,
            "pid": os.getpid(),
            "memory": self.memory_figures(),
        }
