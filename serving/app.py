"""The Ray Serve app: a FastAPI ingress around an engine, with dynamic batching and metrics.

Importable for Ray's own tooling: ``serve run freemerge.serving.app:build_app artifact=DIR``
(or ``zoo=DIR`` for the separate-models baseline); ``deploy/serve_config.yaml`` is an example.
Every argument is a field of :class:`freemerge.serving.settings.ServingOptions`.

The baseline has a second shape, ``zoo=DIR models_per_replica=K``: the ingress only checks
requests and hands each to a :class:`MultiplexedModels` deployment through Ray Serve model
multiplexing (the task is the model id), whose replicas hold at most K models each, loading
on demand and evicting the least recently used.
"""

import asyncio
import dataclasses
import logging
import os
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from freemerge.serving.engine import (
    ClassifyRequest,
    Engine,
    Limits,
    MergedEngine,
    RequestError,
    SeparateEngine,
    TaskModel,
    ZooTasks,
    classify_by_task,
    pick_device,
    separate_memory,
    wants_gpu,
)
from freemerge.serving.metrics import ServerMetrics
from freemerge.serving.runtime import StageTimings
from freemerge.serving.settings import ServingOptions

T = TypeVar("T")
logger = logging.getLogger(__name__)
MAX_TASK_CHARS = 200  # longer task names are refused before lookup (and never echoed whole)
MAX_PROBLEMS = 3  # validation problems a 400 lists

api = FastAPI(
    title="freemerge",
    description="Many task classifiers served from one FREE-merged backbone.",
    version="1",
)


class ClassifyBody(BaseModel):
    """The request; a field it does not define (a typo such as ``Task``) is refused."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(
        None,
        description="task name; omit or null to let the router pick",
        max_length=MAX_TASK_CHARS,
    )
    inputs: list[StrictStr] = Field(..., description="texts to classify", min_length=1)


class Result(BaseModel):
    task: str = Field(..., description="the task whose expert and head answered")
    routed: bool = Field(..., description="whether the router chose the task")
    router_confidence: float | None = Field(None, description="the router's top probability")
    label: str
    score: float = Field(..., description="probability of the label")
    scores: dict[str, float] = Field(..., description="probability of every label")
    truncated: bool = Field(..., description="the text was cut to the model's token limit")


class ClassifyResponse(BaseModel):
    artifact_version: str = Field(..., description="sha256 of the artifact's manifest")
    results: list[Result]


class ErrorBody(BaseModel):
    error: str


@api.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Malformed bodies get 400 with a readable reason (the first few problems) instead of
    FastAPI's 422."""
    errors = exc.errors()
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}"
        for e in errors[:MAX_PROBLEMS]
    )
    more = f" (and {len(errors) - MAX_PROBLEMS} more)" if len(errors) > MAX_PROBLEMS else ""
    return JSONResponse({"error": f"invalid request: {problems}{more}"}, status_code=400)


@api.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes, wrong methods and unreadable bodies: the same ``{"error": ...}``."""
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


def build_limits(options: ServingOptions) -> Limits:
    return Limits(options.max_items, options.max_chars)


def build_engine(options: ServingOptions) -> Engine:
    device, limits = options.device, build_limits(options)
    if options.artifact:
        return MergedEngine(
            options.artifact,
            device,
            limits,
            options.mixing,
            options.expert_cache_size,
            options.pass_overhead_tokens,
        )
    return SeparateEngine(options.zoo, device, limits, options.tasks, options.pass_overhead_tokens)


class ModelThread:
    """The one thread that does a replica's torch work, loading and batches alike.

    The model runs off the event loop so new requests keep queueing for the next batch, and
    always on this same thread: PyTorch's OpenMP pool belongs to the calling thread, and a
    second pool beside it on a few cores slowed the forwards. Batches never overlap, so
    in-place expert swaps cannot interleave.
    """

    def __init__(self, threads: int) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="freemerge-model")
        self.call(torch.set_num_threads, max(1, threads))

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the model thread, waiting for it (for ``__init__``)."""
        return self.executor.submit(function, *args).result()

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the model thread without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)


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
    timings = StageTimings()
    answers = await model_thread.run(classify, requests, timings)
    metrics.batch([started - r.arrived for r in requests], timings, answers)
    return answers


def set_batching(method: Any, options: ServingOptions) -> None:
    method.set_max_batch_size(options.max_batch_size)
    method.set_batch_wait_timeout_s(options.batch_wait_timeout_s)


@serve.deployment(max_ongoing_requests=128, health_check_period_s=10)
@serve.ingress(api)
class ClassifierServer:
    """One replica: the engine loaded once, requests batched by ``@serve.batch``. Given a
    handle to :class:`MultiplexedModels`, it only checks requests and forwards them.
    """

    def __init__(self, options: ServingOptions, models: DeploymentHandle | None = None) -> None:
        self.metrics = ServerMetrics()
        self.models = models
        if models is None:
            self.model_thread = ModelThread(options.torch_threads)
            self.engine: Engine | ZooTasks = self.model_thread.call(build_engine, options)
            self.metrics.refresh_memory_every(2.0, self.engine.memory)
            set_batching(self.classify_batch, options)
        else:
            self.engine = ZooTasks(options.zoo, build_limits(options), options.tasks)

    @api.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses={400: {"model": ErrorBody}, 404: {"model": ErrorBody}, 413: {"model": ErrorBody}},
    )
    async def classify(self, body: ClassifyBody) -> Any:
        try:
            request = self.engine.check(body.task, body.inputs)
        except RequestError as err:
            # one label for every task name a client invents, so the metrics stay bounded
            self.metrics.request("unknown" if err.status == 404 else body.task, err.status)
            return JSONResponse({"error": str(err)}, status_code=err.status)
        if self.models is None:
            answers = await self.classify_batch(request)
        else:
            answers = await self.models.options(multiplexed_model_id=request.task).classify.remote(
                request
            )
        if isinstance(answers, Exception):  # this request failed alone: the server's fault
            self.metrics.request(body.task, 500)
            message = f"the model failed on this request ({type(answers).__name__})"
            return JSONResponse({"error": message}, status_code=500)
        self.metrics.request(body.task, 200, time.perf_counter() - request.arrived)
        return {"artifact_version": self.engine.version, "results": [vars(a) for a in answers]}

    @serve.batch(
        max_batch_size=ServingOptions.max_batch_size,
        batch_wait_timeout_s=ServingOptions.batch_wait_timeout_s,
    )
    async def classify_batch(self, requests: list[ClassifyRequest]) -> list[list[Any] | Exception]:
        answers = await answer_batch(
            self.model_thread, self.engine.classify_requests, requests, self.metrics
        )
        counts = self.engine.cache_counts()
        if counts is not None:
            self.metrics.cache(*counts)
        return answers

    @api.get("/v1/tasks")
    async def tasks(self) -> dict:
        return {
            "artifact_version": self.engine.version,
            "tasks": self.engine.tasks_info(),
            "router": self.engine.has_router,
        }

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> dict:
        """Ready, with the memory of the replica that runs the models (for multiplexed
        models, one of their replicas)."""
        if self.models is None:
            pid, memory = os.getpid(), self.engine.memory()
        else:
            pid, memory = await self.models.memory.remote()
        return {
            "ready": True,
            "artifact_version": self.engine.version,
            "pid": pid,
            "memory": memory,
        }


@serve.deployment(max_ongoing_requests=128, health_check_period_s=10)
class MultiplexedModels:
    """Separate fine-tuned models through Ray Serve model multiplexing: the task is the model
    id, a replica holds at most ``models_per_replica`` of them, loading on demand and evicting
    the least recently used; Serve routes a task's requests to a replica that holds its model.
    """

    def __init__(self, options: ServingOptions) -> None:
        self.model_thread = ModelThread(options.torch_threads)
        self.device = pick_device(options.device)
        self.zoo = ZooTasks(options.zoo, build_limits(options), options.tasks)
        self.metrics = ServerMetrics()
        self.loaded: weakref.WeakValueDictionary[str, TaskModel] = weakref.WeakValueDictionary()

        async def load_model(task: str) -> TaskModel:
            start = time.perf_counter()
            model = await self.model_thread.run(
                TaskModel, self.zoo.paths[task], task, self.device, options.pass_overhead_tokens
            )
            self.metrics.model_loaded(task, time.perf_counter() - start)
            self.loaded[task] = model
            return model

        per_replica = options.models_per_replica
        self.load_model = serve.multiplexed(max_num_models_per_replica=per_replica)(load_model)
        self.metrics.refresh_memory_every(2.0, self.memory_figures)
        set_batching(self.classify_batch, options)

    async def classify(self, request: ClassifyRequest) -> list[Any]:
        request.arrived = time.perf_counter()  # this process's clock, for the queue stage
        return await self.classify_batch(request)

    @serve.batch(
        max_batch_size=ServingOptions.max_batch_size,
        batch_wait_timeout_s=ServingOptions.batch_wait_timeout_s,
    )
    async def classify_batch(self, requests: list[ClassifyRequest]) -> list[list[Any] | Exception]:
        """Serve splits batches by model id, so every request here is for one task."""
        model = await self.load_model(serve.get_multiplexed_model_id())
        return await answer_batch(
            self.model_thread,
            lambda batch, timings: classify_by_task(batch, lambda _: model, timings),
            requests,
            self.metrics,
        )

    def memory_figures(self) -> dict[str, int]:
        return separate_memory(list(self.loaded.values()), self.device)

    async def memory(self) -> tuple[int, dict[str, int]]:
        return os.getpid(), self.memory_figures()


def build_app(args: dict[str, Any]) -> Application:
    """App builder for ``serve run freemerge.serving.app:build_app artifact=DIR [key=value ...]``.

    Keys: the fields of :class:`ServingOptions` (``freemerge serve --help`` explains each);
    unknown keys are refused. With ``models_per_replica`` the replicas, CPUs and autoscaling
    apply to the multiplexed model deployment, and one light ingress replica fronts it.
    """
    options = ServingOptions.from_mapping(dict(args))
    multiplexed = options.models_per_replica is not None
    gpus = 1 if wants_gpu(options.device) else 0
    actor = {"num_cpus": options.cpus_per_replica, "num_gpus": gpus}
    worker = MultiplexedModels if multiplexed else ClassifierServer
    if options.autoscaling:  # Serve's autoscaling_config: min/max replicas, delays, ...
        worker = worker.options(autoscaling_config=options.autoscaling, ray_actor_options=actor)
    else:
        worker = worker.options(num_replicas=options.replicas, ray_actor_options=actor)
    if not multiplexed:
        return worker.bind(options)
    ingress = ClassifierServer.options(num_replicas=1, ray_actor_options={"num_cpus": 0})
    return ingress.bind(dataclasses.replace(options, threads=1), worker.bind(options))
