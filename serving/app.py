"""The Ray Serve app: a FastAPI ingress around an engine, with dynamic batching and metrics.

Importable for Ray's own tooling: ``serve run serving.app:build_app artifact=DIR`` (or
``zoo=DIR`` for the separate-models baseline); ``deploy/serve_config.yaml`` is an example.
"""

import asyncio
import os
import time
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictStr
from ray import serve
from ray.serve import Application

from merging.runtime import MIXING_MODES, StageTimings
from serving.engine import (
    ClassifyRequest,
    Engine,
    Limits,
    MergedEngine,
    RequestError,
    SeparateEngine,
)
from serving.metrics import ServerMetrics

api = FastAPI(
    title="freemerge",
    description="Many task classifiers served from one FREE-merged backbone.",
    version="1",
)


class ClassifyBody(BaseModel):
    task: str | None = Field(None, description="task name; omit or null to let the router pick")
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
    """Malformed bodies get 400 with a readable reason instead of FastAPI's 422."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()
    )
    return JSONResponse({"error": f"invalid request: {problems}"}, status_code=400)


def build_engine(options: dict[str, Any]) -> Engine:
    limits = Limits(int(options.get("max_items", 64)), int(options.get("max_chars", 10_000)))
    device = options.get("device", "auto")
    if options.get("artifact"):
        return MergedEngine(
            options["artifact"],
            device,
            limits,
            options.get("mixing", "argmax"),
            int(options.get("expert_cache_size", 8)),
        )
    if options.get("zoo"):
        tasks = options.get("tasks")
        return SeparateEngine(
            options["zoo"], device, limits, tasks.split(",") if isinstance(tasks, str) else tasks
        )
    raise ValueError("the app needs `artifact` (a merged artifact) or `zoo` (separate models)")


@serve.deployment(max_ongoing_requests=128, health_check_period_s=10)
@serve.ingress(api)
class ClassifierServer:
    """One replica: the engine loaded once, requests batched by ``@serve.batch``."""

    def __init__(self, options: dict[str, Any]) -> None:
        torch.set_num_threads(max(1, int(options.get("threads", 1))))
        self.engine = build_engine(options)
        self.metrics = ServerMetrics()
        self.metrics.refresh_memory_every(2.0, self.engine.memory)
        self.classify_batch.set_max_batch_size(int(options.get("max_batch_size", 16)))
        self.classify_batch.set_batch_wait_timeout_s(
            float(options.get("batch_wait_timeout_s", 0.005))
        )

    @api.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses={400: {"model": ErrorBody}, 404: {"model": ErrorBody}, 413: {"model": ErrorBody}},
    )
    async def classify(self, body: ClassifyBody) -> Any:
        try:
            request = self.engine.check(body.task, body.inputs)
        except RequestError as err:
            self.metrics.request(body.task, err.status)
            return JSONResponse({"error": str(err)}, status_code=err.status)
        answers = await self.classify_batch(request)
        self.metrics.request(body.task, 200, time.perf_counter() - request.arrived)
        return {"artifact_version": self.engine.version, "results": [vars(a) for a in answers]}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def classify_batch(self, requests: list[ClassifyRequest]) -> list[list[Any]]:
        started = time.perf_counter()
        timings = StageTimings()
        # The model runs off the event loop so new requests keep queueing for the next batch;
        # batches never overlap (one at a time), so in-place expert swaps cannot interleave.
        answers = await asyncio.to_thread(self.engine.classify_requests, requests, timings)
        self.metrics.batch([started - r.arrived for r in requests], timings, answers)
        cache = getattr(getattr(self.engine, "model", None), "expert_cache", None)
        if cache is not None:
            self.metrics.cache(cache.hits, cache.misses)
        return answers

    @api.get("/v1/tasks")
    async def tasks(self) -> dict:
        return {
            "artifact_version": self.engine.version,
            "tasks": self.engine.tasks_info(),
            "router": getattr(getattr(self.engine, "model", None), "router", None) is not None,
        }

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> dict:
        return {
            "ready": True,
            "artifact_version": self.engine.version,
            "pid": os.getpid(),
            "memory": self.engine.memory(),
        }


def build_app(args: dict[str, Any]) -> Application:
    """App builder for ``serve run serving.app:build_app artifact=DIR [key=value ...]``.

    Keys: ``artifact`` or ``zoo`` (+ ``tasks``), ``device`` (auto|cpu|cuda), ``replicas``,
    ``cpus_per_replica``, ``max_batch_size``, ``batch_wait_timeout_s``, ``max_items``,
    ``max_chars``, ``mixing`` (argmax|softmax), ``expert_cache_size``, ``autoscaling`` (Serve's
    ``autoscaling_config``; replaces ``replicas``).
    """
    options = dict(args)
    if options.get("mixing", "argmax") not in MIXING_MODES:
        raise ValueError(
            f"unknown mixing {options['mixing']!r}; allowed: {', '.join(MIXING_MODES)}"
        )
    cpus = float(options.get("cpus_per_replica", 1))
    gpus = (
        1
        if options.get("device", "auto") == "cuda"
        or (options.get("device", "auto") == "auto" and torch.cuda.is_available())
        else 0
    )
    options.setdefault("threads", max(1, int(cpus)))
    actor = {"num_cpus": cpus, "num_gpus": gpus}
    if options.get("autoscaling"):  # Serve's autoscaling_config: min/max replicas, delays, ...
        deployment = ClassifierServer.options(
            autoscaling_config=options["autoscaling"], ray_actor_options=actor
        )
    else:
        deployment = ClassifierServer.options(
            num_replicas=int(options.get("replicas", 1)), ray_actor_options=actor
        )
    return deployment.bind(options)
