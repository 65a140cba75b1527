"""The Ray Serve app: a light FastAPI front and a deployment of model replicas behind it.

Importable for Ray's own tooling: ``serve run freemerge.serving.app:build_app artifact=DIR``
(or ``zoo=DIR`` for the separate-models baseline); ``deploy/serve_config.yaml`` is an example.
Every argument is a field of :class:`freemerge.serving.settings.ServingOptions`.

The front (:class:`ClassifierServer`) guards and checks each request, then hands it to a
:class:`ModelReplica`, which batches requests dynamically and runs the engine; when that
replica dies mid-request, the front sends the request to another. A front sends the requests
that queued while its calls ran in one call; a model replica runs what queued while its last
batch ran as its next batch (:mod:`freemerge.serving.batcher`). The baseline has a second
shape, ``zoo=DIR models_per_replica=K``: the models are a :class:`MultiplexedModels`
deployment using Ray Serve model multiplexing (the task is the model id), whose replicas hold
at most K models each, loading on demand and evicting the least recently used.
"""

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from freemerge.merging.artifact import open_artifact
from freemerge.merging.kind_rules import (
    AGGREGATIONS,
    CLASSIFY_ROUTE,
    DEFAULT_AGGREGATION,
    DEFAULT_THRESHOLD,
    EMBED_ROUTE,
)
from freemerge.serving.batcher import BatchCancelled, Batcher
from freemerge.serving.dialects import (
    NATIVE,
    dialect_of,
    error_body,
    error_status,
    needs_key,
    route_label,
)
from freemerge.serving.guard import RETRY_AFTER_S, Guard, GuardMiddleware, parse_api_keys
from freemerge.serving.metrics import ServerMetrics
from freemerge.serving.openai_api import OpenAIRoutes
from freemerge.serving.openai_api import router as openai_router
from freemerge.serving.requests import (
    Answered,
    ArtifactTasks,
    ClassifyRequest,
    Limits,
    RequestError,
)
from freemerge.serving.settings import (
    API_KEYS_ENV,
    MAX_ITEMS_CEILING,
    MAX_TASK_CHARS,
    ServingOptions,
    artifact_update,
)
from freemerge.serving.tei_api import TeiRoutes
from freemerge.serving.tei_api import router as tei_router

if TYPE_CHECKING:
    from freemerge.serving.engine import ZooTasks

logger = logging.getLogger(__name__)
MAX_PROBLEMS = 3  # validation problems a 400 lists
SERVER_VERSION = "freemerge 0.1.0"

api = FastAPI(
    title="freemerge",
    description="Many task models served from one FREE-merged backbone: the native API, and "
    "drop-in routes for TEI, huggingface_hub, OpenAI and vLLM clients.",
    version="1",
)
api.add_middleware(GuardMiddleware)
api.include_router(tei_router)
api.include_router(openai_router)


def openapi_with_keys() -> dict:
    """FastAPI's schema, plus the bearer-key scheme on every operation but the probes (the key
    is checked by :class:`GuardMiddleware`, before the body is read), its 401 in the error
    shape of the operation's API family."""
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, routes=api.routes)
        schema["info"]["description"] = api.description
        components = schema.setdefault("components", {})
        components["securitySchemes"] = {
            "apiKey": {
                "type": "http",
                "scheme": "bearer",
                "description": f"needed when the server has API keys (--api-key, ${API_KEYS_ENV})",
            }
        }
        for path, operations in schema["paths"].items():
            if needs_key(path):
                for operation in operations.values():
                    operation["security"] = [{"apiKey": []}]
                    if dialect_of(path) == NATIVE:
                        operation["responses"]["401"] = _error_response("missing or wrong API key")
        api.openapi_schema = schema
    return api.openapi_schema


def _error_response(description: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }


api.openapi = openapi_with_keys


TextPair = Annotated[list[StrictStr], Field(min_length=2, max_length=2)]


class ClassifyBody(BaseModel):
    """The request; a field it does not define (a typo such as ``Task``) is refused."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(
        None,
        description="task name; omit or null to let the router pick",
        max_length=MAX_TASK_CHARS,
    )
    inputs: list[StrictStr | TextPair] = Field(
        ...,
        description="texts to classify, or [text, text_pair] pairs for a sequence task (a "
        "cross-encoder's relevance, NLI labels)",
        min_length=1,
        max_length=MAX_ITEMS_CEILING,
    )
    candidates: list[Annotated[str, Field(max_length=MAX_TASK_CHARS)]] | None = Field(
        None,
        description="untagged requests: the tasks the router may choose among (default all)",
        min_length=1,
        max_length=MAX_ITEMS_CEILING,
    )
    min_confidence: float | None = Field(
        None,
        description="untagged requests: refuse with 422 (naming the top candidate tasks) when "
        "the router's top probability for a text is below this (default: the server's "
        "--min-router-confidence)",
        ge=0.0,
        le=1.0,
    )
    threshold: float | None = Field(
        None,
        description=f"multi-label tasks: the labels scoring at least this (default "
        f"{DEFAULT_THRESHOLD})",
        ge=0.0,
        le=1.0,
    )
    aggregation: Literal[AGGREGATIONS] | None = Field(  # type: ignore[valid-type]
        None,
        description="token classification: how tokens are grouped into entities, as "
        f"transformers' token-classification pipeline groups them (default "
        f"{DEFAULT_AGGREGATION})",
    )


class EmbedBody(BaseModel):
    """An embedding request; a field it does not define is refused."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(..., description="an embedding task's name", max_length=MAX_TASK_CHARS)
    inputs: list[StrictStr] = Field(
        ..., description="texts to embed", min_length=1, max_length=MAX_ITEMS_CEILING
    )
    normalize: StrictBool = Field(True, description="scale each embedding to unit length")


class Entity(BaseModel):
    label: str = Field(..., description="the entity's type (its tag without B-/I-)")
    score: float = Field(..., description="mean probability of its tokens' tags")
    start: int = Field(..., description="offset of its first character in the input text")
    end: int = Field(..., description="offset just past its last character")
    text: str = Field(..., description="the input text from start to end")


class Result(BaseModel):
    task: str = Field(..., description="the task whose expert and head answered")
    routed: bool = Field(..., description="whether the router chose the task")
    router_confidence: float | None = Field(None, description="the router's top probability")
    truncated: bool = Field(..., description="the text was cut to the model's token limit")
    label: str | None = Field(None, description="single-label: the most probable label")
    score: float | None = Field(
        None, description="single-label: the label's probability; regression: the score"
    )
    scores: dict[str, float] | None = Field(
        None, description="single- and multi-label: every label's probability"
    )
    labels: list[str] | None = Field(
        None, description="multi-label: the labels scoring at least `threshold`"
    )
    entities: list[Entity] | None = Field(None, description="token classification")


class ClassifyResponse(BaseModel):
    artifact_version: str = Field(..., description="sha256 of the artifact's manifest")
    results: list[Result]


class EmbedResponse(BaseModel):
    artifact_version: str = Field(..., description="sha256 of the artifact's manifest")
    task: str
    embeddings: list[list[float]]
    dimensions: int = Field(..., description="the length of each embedding")


class ErrorBody(BaseModel):
    error: str


class Candidate(BaseModel):
    task: str
    probability: float


class Unrouted(BaseModel):
    input: int = Field(..., description="the text's index in `inputs`")
    candidates: list[Candidate] = Field(..., description="the top tasks, most probable first")


class UnroutedBody(BaseModel):
    error: str
    unrouted: list[Unrouted]


def error_response(
    path: str,
    status: int,
    message: str,
    details: dict | None = None,
    overloaded: bool = False,
    param: str | None = None,
) -> JSONResponse:
    """An error in the shape of ``path``'s API family (:mod:`freemerge.serving.dialects`);
    overload and unavailability say when to retry."""
    dialect = dialect_of(path)
    status = error_status(dialect, status, overloaded)
    body = error_body(dialect, status, message, details, overloaded, param)
    retry = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=retry)


class Overloaded(RequestError):
    """No model replica took the request in time, or every one is full: 503 (TEI: 429)."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message)


@api.exception_handler(RequestError)
async def refused_request(request: Request, err: RequestError) -> JSONResponse:
    """A request the checks or a model replica refused, in its route's error shape."""
    overloaded = isinstance(err, Overloaded)
    return error_response(request.url.path, err.status, str(err), err.details, overloaded)


@api.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Malformed bodies get 400 (TEI's routes: 422) with a readable reason (the first few
    problems) instead of FastAPI's list; a list longer than the schema allows gets 413, as
    over ``max_items``."""
    errors = exc.errors()
    # a list of texts past the schema's ceiling (inputs, candidates), not a pair of three texts
    too_many = any(
        e["type"] == "too_long" and e.get("ctx", {}).get("max_length") == MAX_ITEMS_CEILING
        for e in errors
    )
    problems = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in errors[:MAX_PROBLEMS])
    more = f" (and {len(errors) - MAX_PROBLEMS} more)" if len(errors) > MAX_PROBLEMS else ""
    param = _where(errors[0]["loc"][:2]) if errors and len(errors[0]["loc"]) > 1 else None
    message = f"invalid request: {problems}{more}"
    return error_response(request.url.path, 413 if too_many else 400, message, param=param)


def _where(loc: tuple) -> str:
    """A validation problem's place (``inputs.0`` for ``("body", "inputs", 0)``), each part
    cut to 64 characters: an unknown field's name is the client's, of any length."""
    return ".".join(str(part)[:64] for part in loc[1:]) or "body"


@api.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes, wrong methods and unreadable bodies: the same error shapes."""
    return error_response(request.url.path, exc.status_code, str(exc.detail))


# Everything a deployment class uses is defined above it: Serve pickles the class when it
# is declared, with the module's names as they are then.
# A request whose model replica died is sent again: another replica takes it.
REPLICA_LOST = (RayActorError, ReplicaUnavailableError)
ATTEMPTS = 3
# no model replica answered: a 503 to retry (see ClassifierServer._unavailable)
UNAVAILABLE = (TimeoutError, BackPressureError, BatchCancelled, *REPLICA_LOST)


async def _again_if_lost(send: Callable[[], Any]) -> Any:
    """``await send()``, sent again (up to :data:`ATTEMPTS` in all) when the replica that took
    it died; a short pause lets Serve drop the dead replica from its choices."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await send()
        except REPLICA_LOST as err:
            if attempt == ATTEMPTS:
                raise
            logger.warning(
                "a model replica was lost (%s); sending the request again", type(err).__name__
            )
            await asyncio.sleep(0.1 * attempt)


def front_tasks(options: ServingOptions) -> "ArtifactTasks | ZooTasks":
    """The task list the front checks requests against, read without loading a model."""
    limits = Limits.of_options(options)
    if options.artifact:
        artifact = open_artifact(
            options.artifact, verify=False, expect_version=options.expect_version
        )
        return ArtifactTasks(artifact, limits)
    # The separate-models baseline reads each model's kind with transformers' own mappings, so
    # its fronts load transformers; the merged artifact's fronts never do.
    from freemerge.serving.engine import ZooTasks

    return ZooTasks(options.zoo, limits, options.tasks)


@serve.deployment(health_check_period_s=10)
@serve.ingress(api)
class ClassifierServer(TeiRoutes, OpenAIRoutes):
    """The HTTP front: the guard, request checks and metrics, and nothing heavy. It hands the
    checked requests to the model deployment (:class:`ModelReplica`: those that queued while
    its calls ran, in one call, at most ``calls_per_front`` calls out at once (two, or one per
    model replica it feeds where that is more);
    :class:`MultiplexedModels`, the multiplexed baseline, routed per task: one by one) and, as
    classifying is idempotent, sends a call again when the replica running it dies, up to
    three attempts within the request timeout. Beside the
    native routes it serves the drop-in ones (TEI's, OpenAI's, vLLM's) it inherits."""

    def __init__(self, options: ServingOptions, models: DeploymentHandle) -> None:
        """Like the model replicas, a merged artifact's tasks arrive through
        :meth:`reconfigure`."""
        self.metrics = ServerMetrics()
        self.models = models
        self.multiplexed = options.models_per_replica is not None
        self.options = options
        self.timeout_s = options.request_timeout_s
        self.limits = Limits.of_options(options)
        self.front: ArtifactTasks | ZooTasks | None = (
            front_tasks(options) if options.zoo or options.artifact else None
        )
        self.batcher = Batcher(
            self._send_batch,
            options.max_batch_size,
            options.batch_wait_timeout_s,
            concurrency=options.calls_per_front,
            # saturated (a full batch queued beyond the calls out): up to twice the calls out,
            # so a model replica finds its next batch queued when one ends
            full_concurrency=2 * options.calls_per_front,
            wait_share=options.batch_wait_run_share,
        )
        api.state.guard = Guard(
            parse_api_keys(os.environ.get(API_KEYS_ENV)),
            options.max_body_bytes,
            options.max_queued_requests,
            lambda status, path: self._count("unknown", status, route_label(path), status == 503),
        )

    @api.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        response_model_exclude_unset=True,  # each result holds its kind's fields only
        responses={
            400: {"model": ErrorBody},
            404: {"model": ErrorBody},
            413: {"model": ErrorBody, "description": "too many texts, too long, or body too big"},
            422: {
                "model": UnroutedBody,
                "description": "the router's top probability for an untagged text was below "
                "`min_confidence`",
            },
            503: {"model": ErrorBody, "description": "overloaded: retry after Retry-After"},
        },
    )
    async def classify(self, body: ClassifyBody) -> Any:
        options = {"threshold": body.threshold, "aggregation": body.aggregation}
        answered = await self._served(
            body.task,
            lambda: self.front.check(
                body.task,
                body.inputs,
                body.candidates,
                body.min_confidence,
                CLASSIFY_ROUTE,
                options,
            ),
            CLASSIFY_ROUTE,
        )
        return {
            "artifact_version": answered.version,
            "results": [a.body() for a in answered.predictions],
        }

    @api.post(
        "/v1/embed",
        response_model=EmbedResponse,
        responses={
            400: {"model": ErrorBody, "description": "not an embedding task, or a bad body"},
            404: {"model": ErrorBody},
            413: {"model": ErrorBody, "description": "too many texts, too long, or body too big"},
            503: {"model": ErrorBody, "description": "overloaded: retry after Retry-After"},
        },
    )
    async def embed(self, body: EmbedBody) -> Any:
        options = {"normalize": body.normalize}
        answered = await self._served(
            body.task,
            lambda: self.front.check(body.task, body.inputs, None, None, EMBED_ROUTE, options),
            EMBED_ROUTE,
        )
        embeddings = [a.embedding for a in answered.predictions]
        return {
            "artifact_version": answered.version,
            "task": body.task,
            "embeddings": embeddings,
            "dimensions": len(embeddings[0]),
        }

    async def _served(
        self, task: str | None, check: Callable[[], ClassifyRequest], route: str
    ) -> Answered:
        """The checked request's answers from a model replica; a refusal or failure raised as
        :class:`RequestError`, which :func:`refused_request` answers in the route's shape.
        Every outcome is counted in the metrics, by task and ``route`` (a route template)."""
        try:
            request = check()
        except RequestError as err:
            # one label for every task name a client invents, so the metrics stay bounded
            self._count("unknown" if err.status == 404 else task, err.status, route)
            raise
        try:
            answers = await asyncio.wait_for(self._answers(request), self.timeout_s)
        except UNAVAILABLE as err:
            refusal = self._unavailable(err)
            self._count(task, 503, route, isinstance(refusal, Overloaded))
            raise refusal from None
        if isinstance(answers, RequestError):  # unsure router (422); task not in its version
            self._count(task, answers.status, route)
            raise answers
        if isinstance(answers, Exception):  # this request failed alone: the server's fault
            self._count(task, 500, route)
            message = f"the model failed on this request ({type(answers).__name__})"
            raise RequestError(500, message)
        self.metrics.request(task, 200, time.perf_counter() - request.arrived, route)
        return answers

    def _count(self, task: str | None, status: int, route: str, overloaded: bool = False) -> None:
        """A refused or failed request in the metrics, with the status its client saw."""
        shown = error_status(dialect_of(route), status, overloaded)
        self.metrics.request(task, shown, route=route)

    def _unavailable(self, err: Exception) -> RequestError:
        """Why no model replica answered: overloaded, the call cancelled, or the replicas lost
        (503)."""
        if isinstance(err, TimeoutError):
            return Overloaded(f"no answer within {self.timeout_s:g} s: the server is overloaded")
        if isinstance(err, BackPressureError):
            return Overloaded("every model replica is full: the server is overloaded")
        if isinstance(err, BatchCancelled):
            return RequestError(503, "the call to a model replica was cancelled; retry shortly")
        return RequestError(
            503, f"the model replicas were lost {ATTEMPTS} times in a row; retry shortly"
        )

    async def _task_info(self, task: str) -> tuple[dict, dict]:
        """``task``'s entry of ``/v1/tasks`` (from a model replica) and the server's limits,
        for TEI's ``/info``."""
        try:
            described = await asyncio.wait_for(
                _again_if_lost(lambda: self.models.describe.remote()), self.timeout_s
            )
        except UNAVAILABLE as err:
            raise self._unavailable(err) from None
        entry = next((t for t in described["tasks"] if t["task"] == task), None)
        if entry is None:  # a task of another version, met in a rolling update
            raise RequestError(
                404, f"unknown task {task!r} in version {described['artifact_version'][:12]}"
            )
        options = self.options
        return entry, {
            "artifact_version": described["artifact_version"],
            "dtype": described.get("dtype", "float32"),
            "max_queued_requests": options.max_queued_requests,
            "max_batch_tokens": options.max_batch_tokens,
            "max_batch_size": options.max_batch_size,
            "max_items": options.max_items,
            "server_version": SERVER_VERSION,
        }

    def reconfigure(self, config: dict) -> None:
        """Ray Serve's lightweight update (``user_config``): check requests against the tasks
        of the artifact version it names (read from the manifest alone)."""
        update = artifact_update(config)
        if update is None:
            return
        path, expected = update
        artifact = open_artifact(Path(path), verify=False, expect_version=expected)
        if self.front is None or artifact.version != self.front.version:
            self.front = ArtifactTasks(artifact, self.limits)

    async def _answers(self, request: ClassifyRequest) -> Answered | Exception:
        if self.multiplexed:  # Serve routes by task: one request at a time
            handle = self.models.options(multiplexed_model_id=request.task)
            return (await _again_if_lost(lambda: handle.classify.remote([request])))[0]
        answer = (await self.batcher.submit([request]))[0]
        if isinstance(answer, UNAVAILABLE):  # the batch's call failed: as a multiplexed call's
            raise answer
        return answer

    async def _send_batch(self, requests: list[ClassifyRequest]) -> list[Answered | Exception]:
        """One call to a model replica for the requests queued while the last calls ran."""
        return await _again_if_lost(lambda: self.models.classify.remote(requests))

    @api.get("/v1/tasks")
    async def tasks(self) -> dict:
        return await _again_if_lost(lambda: self.models.describe.remote())

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Live: this front answers (each model replica has Ray's own health check)."""
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Ready when a model replica has warmed up (it answered once) and is healthy; with
        that replica's process and memory."""
        try:
            status = await asyncio.wait_for(
                _again_if_lost(lambda: self.models.status.remote()), self.timeout_s
            )
        except UNAVAILABLE as err:
            return JSONResponse({"ready": False, "error": str(self._unavailable(err))}, 503)
        if status["problem"] is not None:
            return JSONResponse({"ready": False, "error": status["problem"]}, 503)
        return JSONResponse(
            {
                "ready": True,
                "artifact_version": status["version"],
                "pid": status["pid"],
                "memory": status["memory"],
            }
        )


def build_app(args: dict[str, Any]) -> Application:
    """App builder for ``serve run freemerge.serving.app:build_app artifact=DIR [key=value ...]``.

    Keys: the fields of :class:`ServingOptions` (``freemerge serve --help`` explains each);
    unknown keys are refused. Two deployments: the models (:class:`ModelReplica`, or
    :class:`MultiplexedModels` with ``models_per_replica``), which the replicas, CPUs and
    autoscaling apply to, and the light :class:`ClassifierServer` fronts (no CPU reserved;
    ``front_replicas`` of them, by default as many as the model replicas; autoscaling applies to
    them too).
    """
    # Imported here, not at the top: a front's process imports this module to run
    # ClassifierServer, and never loads torch.
    from freemerge.serving.engine import wants_gpu
    from freemerge.serving.replicas import ModelReplica, MultiplexedModels

    options = ServingOptions.from_mapping(dict(args))
    gpus = 1 if wants_gpu(options.device) else 0
    models = MultiplexedModels if options.models_per_replica is not None else ModelReplica
    # A merged artifact goes to the replicas as user_config, not as a constructor argument: a
    # new `artifact` (or `expect_version`) is then a lightweight update that running replicas
    # take through reconfigure, without a restart; any other change restarts them.
    update, bound = {}, options
    if options.artifact:
        artifact = {"artifact": options.artifact, "expect_version": options.expect_version}
        update = {"user_config": artifact}
        bound = dataclasses.replace(options, artifact=None, expect_version=None)
    models = models.options(
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": gpus},
        **replica_count(options),
        **model_settings(options),
        **update,
    )
    front = ClassifierServer.options(
        ray_actor_options={"num_cpus": 0},
        **replica_count(options, options.fronts),
        **front_settings(options),
        **update,
    )
    return front.bind(dataclasses.replace(bound, threads=1), models.bind(bound))


# A rolling update starts new replicas (a quarter more, at least one) before old ones stop, so
# a one-replica deployment keeps answering through an update; it needs room for one more.
SURGE_PERCENT = 25


def replica_count(options: ServingOptions, count: int | None = None) -> dict[str, Any]:
    """Serve's autoscaling_config (min/max replicas, delays, ...) when set, else the count
    (``count``, or the model replicas')."""
    if options.autoscaling:
        return {"autoscaling_config": options.autoscaling}
    return {"num_replicas": count or options.replicas}


def front_settings(options: ServingOptions) -> dict[str, Any]:
    """Ray sends a front up to twice the requests its guard holds, so that the guard itself
    refuses the excess at once (our 503 with ``Retry-After``); a proxy queues at most four
    times that when every front is full (then Ray's own plain-text 503, with ``Retry-After``).
    """
    return {
        "max_ongoing_requests": 2 * options.max_queued_requests,
        "max_queued_requests": 4 * options.max_queued_requests,
        "backpressure_config": BackpressureConfig(retry_after_s=RETRY_AFTER_S),
        "max_surge_percent": SURGE_PERCENT,
    }


def model_settings(options: ServingOptions) -> dict[str, Any]:
    """A model replica takes up to twice what a front holds; a front queues at most four times
    that when every model replica is full (then our 503). The health check may wait twice the
    request timeout for the model thread."""
    return {
        "max_ongoing_requests": 2 * options.max_queued_requests,
        "max_queued_requests": 4 * options.max_queued_requests,
        "health_check_timeout_s": 2 * options.request_timeout_s + 10,
        "max_surge_percent": SURGE_PERCENT,
    }
