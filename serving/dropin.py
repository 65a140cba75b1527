"""What the drop-in APIs (TEI's, OpenAI's, vLLM's; :mod:`~freemerge.serving.tei_api`,
:mod:`~freemerge.serving.openai_api`) share: one task per model name, checked as the native
routes check it, and each family's error bodies for the OpenAPI page.

Their routes are methods of mixin classes that the HTTP front (``ClassifierServer``) inherits;
the front provides ``front`` (the tasks requests are checked against), ``_served(task, check,
route)`` (the answers of a checked request from a model replica, or a raised
:class:`RequestError`) and ``_task_info(task)`` (a task's ``/v1/tasks`` entry and the
server's limits). No Ray here.

Serve's ingress turns these methods into routes of the one app it wraps (``serving/app.py``):
a second ingress class inheriting the mixins would not get them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictStr

from freemerge.merging.kind_rules import ROUTE_OF_KIND
from freemerge.serving.dialects import OPENAI, TEI, VLLM
from freemerge.serving.requests import ClassifyRequest, Prediction, RequestError
from freemerge.serving.settings import MAX_ITEMS_CEILING

Texts = Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_ITEMS_CEILING)]


class TeiError(BaseModel):
    error: str
    error_type: Literal["Validation", "Overloaded", "Unhealthy", "Backend"]


class NestedErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class NestedError(BaseModel):
    error: NestedErrorInfo


ERROR_MODEL = {TEI: TeiError, OPENAI: NestedError, VLLM: NestedError}
ERROR_TEXTS = {
    400: "a bad request: invalid body, wrong kind of task, bad input",
    401: "missing or wrong API key",
    404: "no such task",
    413: "too many texts, a text too long, or a body too big",
    422: "a bad request: invalid body, wrong kind of task, bad input",
    429: "overloaded: retry after Retry-After",
    503: "overloaded or no model replica: retry after Retry-After",
}
STATUSES = {TEI: (401, 404, 413, 422, 429, 503), OPENAI: (400, 401, 404, 413, 503)}
STATUSES[VLLM] = STATUSES[OPENAI]


def error_responses(dialect: str) -> dict[int, dict]:
    """The error statuses a route of ``dialect`` answers, with their bodies, for OpenAPI."""
    model = ERROR_MODEL[dialect]
    return {s: {"model": model, "description": ERROR_TEXTS[s]} for s in STATUSES[dialect]}


def usage_tokens(predictions: list[Prediction]) -> int:
    """The tokens a request's texts ran as."""
    return sum(p.tokens for p in predictions)


def scored_labels(prediction: Prediction, labels: list[str]) -> dict[str, float]:
    """A sequence answer's score per label (a regression task: its one score, under its one
    label, or ``LABEL_0`` as transformers names it)."""
    if prediction.scores is not None:
        return prediction.scores
    return {labels[0] if labels else "LABEL_0": prediction.score}


class DropInRoutes:
    """The checks every drop-in route shares; see the module docstring for what the server
    class inheriting this provides."""

    front: Any
    _served: Callable[..., Any]

    def _kind(self, task: str, serves: tuple[str, ...], elsewhere: dict[str, str]) -> str:
        """``task``'s kind (404 when unknown), which must be one of ``serves``; else 400 naming
        the route of this family (``elsewhere``, by kind) that serves it."""
        kind = self.front.task_kinds.kind_of(task)
        if kind not in serves:
            where = elsewhere.get(kind, ROUTE_OF_KIND[kind]).replace("{task}", task)
            raise RequestError(400, f"task {task!r} is of kind {kind}: send it to {where}")
        return kind

    async def _predictions(
        self,
        task: str,
        route: str,
        serves: tuple[str, ...],
        elsewhere: dict[str, str],
        rows: list[str | tuple[str, str]],
        options: dict | None = None,
        fits: Callable[[str], None] | None = None,
    ) -> tuple[list[Prediction], list[str]]:
        """The predictions for ``rows`` of ``task`` on the drop-in ``route`` (the metrics'
        label), checked as the native route of its kind checks them, and by ``fits(kind)``
        (before the model runs); with the task's labels in the version checked against."""
        labels: list[str] = []

        def check() -> ClassifyRequest:
            kind = self._kind(task, serves, elsewhere)
            if fits is not None:
                fits(kind)
            labels.extend(self.front.labels[task])
            return self.front.check(task, rows, None, None, ROUTE_OF_KIND[kind], options)

        predictions = (await self._served(task, check, route)).predictions
        if any(p.kind not in serves for p in predictions):  # another version's task, same name
            raise RequestError(503, f"task {task!r} changed kind in a live update; retry")
        return predictions, labels

    def _dimensions_fit(self, task: str, dimensions: int | None) -> None:
        """400 unless ``dimensions`` is None or the embedding task's own length."""
        own = self.front.embeddings.get(task, {}).get("dimensions")
        if dimensions is not None and dimensions != own:
            raise RequestError(
                400,
                f"dimensions {dimensions} is not the length of task {task!r}'s embeddings, "
                f"{own}: omit it, or give that length",
                {"param": "dimensions"},
            )
