"""What a front checks and what crosses between a front and a model replica, torch-free.

The HTTP fronts (:mod:`freemerge.serving.app`) check each request against the artifact's
manifest (:class:`ArtifactTasks`), send it on as a :class:`ClassifyRequest`, and get back an
:class:`Answered` of :class:`Prediction` rows or a :class:`RequestError`. None of it imports
torch or transformers: a front's process never loads them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from freemerge.merging.artifact import Artifact
from freemerge.merging.kind_rules import (
    AGGREGATIONS,
    CLASSIFY_ROUTE,
    DEFAULT_OPTIONS,
    ROUTE_OF_KIND,
    SCORINGS,
    SINGLE_LABEL,
)
from freemerge.serving.settings import ServingOptions


class RequestError(ValueError):
    """A request the server refuses: ``status`` is the HTTP code, the message says why."""

    def __init__(self, status: int, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.details = details or {}  # more fields of the error body, beside "error"

    def __reduce__(self) -> tuple:  # sent between Ray processes whole, details included
        return (type(self), (self.status, str(self), self.details))

    def body(self) -> dict:
        """The JSON error body: ``{"error": message, **details}``."""
        return {"error": str(self), **self.details}


@dataclass(frozen=True)
class Limits:
    max_items: int = ServingOptions.max_items
    max_chars: int = ServingOptions.max_chars
    min_router_confidence: float = ServingOptions.min_router_confidence

    @classmethod
    def of_options(cls, options: ServingOptions) -> Limits:
        """The limits the server's options set."""
        return cls(options.max_items, options.max_chars, options.min_router_confidence)


@dataclass
class ClassifyRequest:
    task: str | None
    inputs: list[str | tuple[str, str]]  # texts, or text pairs for a sequence task
    arrived: float  # time.perf_counter() when the replica received it
    candidates: list[str] | None = None  # untagged: the tasks the router may choose among
    min_confidence: float = 0.0  # untagged: below this top probability, refuse with 422
    options: dict = field(default_factory=lambda: dict(DEFAULT_OPTIONS))  # by kind


@dataclass(frozen=True)
class TaskKinds:
    """Each task's kind and whether it takes text pairs (manifest ``task_kind`` and
    ``text_pairs``): what the checks of a request need to know of its task."""

    kinds: dict[str, str]
    pairs: dict[str, str]

    @classmethod
    def of_artifact(cls, artifact: Artifact) -> TaskKinds:
        """From the manifest (an artifact written before kinds: single-label tasks, which take
        pairs as any sequence task does)."""
        tasks = artifact.tasks.items()
        return cls(
            {t: e.get("task_kind", SINGLE_LABEL) for t, e in tasks},
            {t: e.get("text_pairs", "accepted") for t, e in tasks},
        )

    def kind_of(self, task: str) -> str:
        """``task``'s kind; 404 naming the known tasks when there is no such task."""
        if task not in self.kinds:
            raise RequestError(
                404, f"unknown task {task!r}; known tasks: {named(list(self.kinds))}"
            )
        return self.kinds[task]

    def routable(self, route: str) -> list[str]:
        """The tasks the router may choose for an untagged request on ``route``."""
        return [
            task
            for task, kind in self.kinds.items()
            if ROUTE_OF_KIND[kind] == route and self.pairs[task] != "required"
        ]


@dataclass
class Prediction:
    """One input's answer: the task used, how it was chosen, whether the text was cut, and
    the fields of the task's kind (:meth:`freemerge.merging.kinds.TaskRunner.answer`):
    single-label ``label``, ``score``, ``scores``; multi-label ``labels``, ``scores``;
    regression ``score``; token classification ``entities``; embedding ``embedding``."""

    task: str
    routed: bool
    router_confidence: float | None
    truncated: bool
    label: str | None = None
    score: float | None = None
    scores: dict[str, float] | None = None
    labels: list[str] | None = None
    entities: list[dict] | None = None
    embedding: list[float] | None = None
    kind: str | None = None  # for the metrics, not the API: the task's kind
    tokens: int = 0  # and the tokens the text ran as

    def body(self) -> dict:
        """The answer as the API gives it: the common fields and those of its kind."""
        common = ("task", "routed", "router_confidence", "truncated")
        internal = ("kind", "tokens")
        return {
            k: v
            for k, v in vars(self).items()
            if k not in internal and (k in common or v is not None)
        }


@dataclass
class StageTimings:
    """Seconds spent per stage (route, expert_apply, forward), summed over a call; each
    stage's end is also reported to ``progress`` (the model thread's heartbeat)."""

    seconds: dict[str, float] = field(default_factory=dict)
    progress: Callable[[], None] | None = None

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        if self.progress is not None:
            self.progress()


@dataclass
class Answered:
    """A model replica's answers to one request, and the artifact version that gave them (in a
    rolling update, fronts and model replicas of either version may meet)."""

    version: str
    predictions: list[Any]


def check_inputs(inputs: object, limits: Limits) -> list[str | tuple[str, str]]:
    """``inputs`` must be a non-empty list of texts or text pairs (``[text, text_pair]``,
    returned as tuples) within the item and character limits (each text of a pair)."""
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(400, "`inputs` must be a non-empty list of texts")
    bad = [i for i, item in enumerate(inputs) if not _is_text_or_pair(item)]
    if bad:
        raise RequestError(
            400, f"`inputs` items are texts or [text, text_pair]; item {bad[0]} is neither"
        )
    if len(inputs) > limits.max_items:
        raise RequestError(413, f"{len(inputs)} inputs, more than the limit of {limits.max_items}")
    rows = [item if isinstance(item, str) else tuple(item) for item in inputs]
    texts = [(i, text) for i, row in enumerate(rows) for text in _texts(row)]
    long = [(i, text) for i, text in texts if len(text) > limits.max_chars]
    if long:
        raise RequestError(
            413,
            f"input {long[0][0]} has a text of {len(long[0][1])} characters, more than the "
            f"limit of {limits.max_chars}",
        )
    broken = [i for i, text in texts if not _is_unicode_text(text)]
    if broken:
        raise RequestError(
            400,
            f"input {broken[0]} is not valid Unicode text (it holds a lone surrogate such as "
            "\\ud800, which no tokenizer takes)",
        )
    return rows


def _is_text_or_pair(item: object) -> bool:
    if isinstance(item, str):
        return True
    return (
        isinstance(item, list | tuple) and len(item) == 2 and all(isinstance(t, str) for t in item)
    )


def _texts(row: str | tuple[str, str]) -> tuple[str, ...]:
    return (row,) if isinstance(row, str) else row


def check_kind(
    task: str | None,
    rows: list[str | tuple[str, str]],
    candidates: list[str] | None,
    kinds: TaskKinds,
    route: str,
) -> list[str] | None:
    """A tagged request's task must be served on ``route`` and take its inputs (pairs or
    single texts); an untagged request's texts are single, and its candidates (default: the
    route's routable tasks, when other tasks exist) are routable on ``route``."""
    if task is not None:
        kind = kinds.kinds[task]
        if ROUTE_OF_KIND[kind] != route:
            raise RequestError(
                400, f"task {task!r} is of kind {kind}: send it to {ROUTE_OF_KIND[kind]}"
            )
        singles = sum(isinstance(row, str) for row in rows)
        if kinds.pairs[task] == "required" and singles:
            raise RequestError(400, f"task {task!r} scores text pairs: give [text, text_pair]")
        if kinds.pairs[task] == "refused" and singles < len(rows):
            raise RequestError(400, f"task {task!r} ({kind}) takes single texts, not pairs")
        return None
    if any(not isinstance(row, str) for row in rows):
        raise RequestError(400, "text pairs need a `task`: the router chooses for single texts")
    routable = kinds.routable(route)
    wrong = [name for name in candidates or [] if name not in routable]
    if wrong:
        raise RequestError(
            400, f"candidate task {wrong[0]!r} is not routable on {route}; {_routable(routable)}"
        )
    if candidates is None and len(routable) < len(kinds.kinds):
        return routable or _no_routable(route)
    return candidates


def _routable(routable: list[str]) -> str:
    return f"routable tasks: {named(routable)}" if routable else "no task is routable there"


def _no_routable(route: str) -> list[str]:
    raise RequestError(400, f"no task of this artifact is routable on {route}: give `task`")


def check_options(options: dict | None) -> dict:
    """The request's kind options (``threshold``, ``aggregation``, ``normalize``), defaults
    filled in; 400 for a value out of range."""
    options = {**DEFAULT_OPTIONS, **{k: v for k, v in (options or {}).items() if v is not None}}
    if options["aggregation"] not in AGGREGATIONS:
        raise RequestError(
            400,
            f"unknown aggregation {options['aggregation']!r}; allowed: {', '.join(AGGREGATIONS)}",
        )
    if options["function_to_apply"] not in (None, *SCORINGS):
        raise RequestError(
            400,
            f"unknown function_to_apply {options['function_to_apply']!r}; allowed: "
            f"{', '.join(SCORINGS)}",
        )
    if not 0.0 <= options["threshold"] <= 1.0:
        raise RequestError(400, f"threshold must be within [0, 1], got {options['threshold']}")
    return options


def _is_unicode_text(text: str) -> bool:
    """False for strings holding lone surrogates (JSON allows ``"\\ud800"``; UTF-8 does not)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


NAMED_TASKS = 20  # task names an error message lists at most


def named(tasks: list[str]) -> str:
    """The task names for an error message: all of them, or the first few and a count."""
    if len(tasks) <= NAMED_TASKS:
        return ", ".join(tasks)
    shown = ", ".join(tasks[:NAMED_TASKS])
    return f"{shown} and {len(tasks) - NAMED_TASKS} more (GET /v1/tasks lists them all)"


def check_routing(
    task: str | None, candidates: list[str] | None, known: list[str], has_router: bool, what: str
) -> None:
    """A task must be known; an untagged request needs a router, and its candidates must be
    known tasks (a tagged request takes none)."""
    if task is not None and task not in known:
        raise RequestError(404, f"unknown task {task!r}; known tasks: {named(known)}")
    if task is not None and candidates is not None:
        raise RequestError(
            400, "`candidates` is for untagged requests: give `task` or `candidates`, not both"
        )
    if task is None and not has_router:
        raise RequestError(
            400, f"{what} has no router, so `task` is required; known tasks: {named(known)}"
        )
    unknown = [name for name in candidates or [] if name not in known]
    if unknown:
        raise RequestError(
            404, f"unknown candidate task {unknown[0]!r}; known tasks: {named(known)}"
        )


class ArtifactTasks:
    """An artifact's tasks, read from its manifest without loading a model: what a front end
    needs to check requests for the merged models."""

    def __init__(self, artifact: Artifact, limits: Limits | None = None) -> None:
        self.version = artifact.version
        self.limits = limits or Limits()
        self.task_names = list(artifact.tasks)
        self.labels = {task: entry["labels"] for task, entry in artifact.tasks.items()}
        self.embeddings = {
            t: e["embedding"] for t, e in artifact.tasks.items() if e.get("embedding")
        }
        self.created = int((artifact.source / "manifest.json").stat().st_mtime)  # for /v1/models
        self.has_router = bool(artifact.manifest.get("router"))
        self.task_kinds = TaskKinds.of_artifact(artifact)

    def check(
        self,
        task: str | None,
        inputs: object,
        candidates: list[str] | None = None,
        min_confidence: float | None = None,
        route: str = CLASSIFY_ROUTE,
        options: dict | None = None,
    ) -> ClassifyRequest:
        check_routing(task, candidates, self.task_names, self.has_router, "this artifact")
        rows = check_inputs(inputs, self.limits)
        candidates = list(dict.fromkeys(candidates)) if candidates is not None else None
        return ClassifyRequest(
            task,
            rows,
            time.perf_counter(),
            check_kind(task, rows, candidates, self.task_kinds, route),
            self.limits.min_router_confidence if min_confidence is None else min_confidence,
            check_options(options),
        )
