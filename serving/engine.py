"""The serving engine: request checks, batched classification and memory figures, no Ray.

:class:`MergedEngine` serves an artifact (one backbone, an expert and a head per task);
:class:`SeparateEngine` serves N fine-tuned models side by side behind the same interface, as
the baseline the merged server is compared against. The Ray deployment is a thin shell around
either.
"""

from __future__ import annotations

import copy
import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from freemerge.merging.artifact import EXPERTS_FOLDER, Artifact, open_artifact
from freemerge.merging.batching import PassPlan, Tokenized, forward_in_passes
from freemerge.merging.families import load_classifier, load_tokenizer, token_limit
from freemerge.merging.kinds import (
    AGGREGATIONS,
    CLASSIFY_ROUTE,
    DEFAULT_OPTIONS,
    ROUTE_OF_KIND,
    SCORINGS,
    SINGLE_LABEL,
    kind_of_model,
    model_runner,
    takes_pairs,
)
from freemerge.merging.zoo_folder import open_zoo
from freemerge.serving.expert_store import TierCounts
from freemerge.serving.router import Route
from freemerge.serving.runtime import MergedClassifier, Prediction, StageTimings
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


def wants_gpu(device: str = "auto") -> bool:
    """Whether the ``device`` setting means a GPU here: ``cuda``, or ``auto`` with one visible."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when a GPU is visible, else the CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; allowed: auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but no CUDA GPU is visible")
    return torch.device("cuda" if wants_gpu(device) else "cpu")


def process_resident_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Engine(Protocol):
    """What the Ray deployment needs from an engine."""

    version: str
    has_router: bool
    damaged: str | None  # why the weights may be altered (a failed restore), else None

    def tasks_info(self) -> list[dict]: ...

    def expert_tiers(self) -> dict[str, TierCounts]:
        """Each expert tier's counts so far (empty without experts)."""
        ...

    def expert_fetches(self) -> list[tuple[str, float]]:
        """(tier fetched from, seconds) of each expert fetch since the last call."""
        ...

    def is_cold(self, request: ClassifyRequest) -> bool:
        """Whether the request's expert must be read from disk before it can run."""
        ...

    def prefetch(self, request: ClassifyRequest) -> None:
        """Bring the request's expert into memory (called off the model thread)."""
        ...

    def check(
        self,
        task: str | None,
        inputs: object,
        candidates: list[str] | None = None,
        min_confidence: float | None = None,
        route: str = CLASSIFY_ROUTE,
        options: dict | None = None,
    ) -> ClassifyRequest: ...

    def classify_requests(
        self, requests: list[ClassifyRequest], timings: StageTimings
    ) -> list[list[Prediction]]: ...

    def memory(self) -> dict[str, int]: ...


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


def split_by_request(
    answers: list[Prediction], requests: list[ClassifyRequest]
) -> list[list[Prediction] | RequestError]:
    """Cut the flat list of answers back into one list per request, in order; a request that
    asked not to be truncated (``truncate`` false) and had a text cut gets a 413 instead."""
    out, start = [], 0
    for request in requests:
        rows = answers[start : start + len(request.inputs)]
        out.append(_cut_against_wish(request, rows) or rows)
        start += len(request.inputs)
    return out


def _cut_against_wish(request: ClassifyRequest, rows: list[Prediction]) -> RequestError | None:
    if request.options.get("truncate", True):
        return None
    cut = [i for i, prediction in enumerate(rows) if prediction.truncated]
    if not cut:
        return None
    return RequestError(
        413,
        f"input {cut[0]} is longer than its task's limit of {rows[cut[0]].tokens} tokens; send "
        "`truncate: true` to have it cut, or a shorter text",
    )


def unsure(request: ClassifyRequest, routes: list[Route | None]) -> RequestError | None:
    """A 422 when a text of ``request`` was routed below its ``min_confidence``, naming each
    such text's top candidate tasks and their probabilities; else None."""
    low = [
        {"input": i, "candidates": route.top()}
        for i, route in enumerate(routes)
        if route is not None and route.confidence < request.min_confidence
    ]
    if not low:
        return None
    first = low[0]["candidates"][0]
    return RequestError(
        422,
        f"the router could not choose a task for {len(low)} of {len(routes)} inputs with "
        f"confidence {request.min_confidence:g} (input {low[0]['input']}: {first['task']} at "
        f"{first['probability']:g}); give `task`, or fewer `candidates`",
        {"unrouted": low},
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


class MergedEngine(ArtifactTasks):
    """One backbone for all tasks; experts applied per group of rows, heads per task."""

    def __init__(
        self,
        artifact_dir: Path,
        device: str = "auto",
        limits: Limits | None = None,
        mixing: str = ServingOptions.mixing,
        host_expert_bytes: int = ServingOptions.host_expert_bytes,
        device_expert_bytes: int = ServingOptions.device_expert_bytes,
        pass_overhead_tokens: int | None = None,
        max_batch_tokens: int | None = None,
        expect_version: str | None = None,
        merge_above_tokens: int | None = ServingOptions.merge_above_tokens,
    ) -> None:
        artifact = open_artifact(
            artifact_dir, expect_version=expect_version, deferred=(EXPERTS_FOLDER,)
        )
        super().__init__(artifact, limits)
        self.model = MergedClassifier(
            artifact,
            pick_device(device),
            host_expert_bytes,
            device_expert_bytes,
            pass_overhead_tokens=pass_overhead_tokens,
            max_batch_tokens=max_batch_tokens,
            merge_above_tokens=merge_above_tokens,
        )
        self.mixing = mixing
        # Fixed for the life of the engine; the memory gauges read it every few seconds.
        self.backbone_bytes = sum(
            p.numel() * p.element_size() for p in self.model.parameters.values()
        )

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> str:
        """The backbone's dtype, as ``float32``."""
        return str(self.model.backbone.dtype).removeprefix("torch.")

    @property
    def damaged(self) -> str | None:
        """Why the backbone may no longer hold the merged weights (a failed restore), or None."""
        return self.model.damaged

    def expert_tiers(self) -> dict[str, TierCounts]:
        return self.model.store.counts()

    def expert_fetches(self) -> list[tuple[str, float]]:
        return self.model.store.drain_fetches()

    def prefetch(self, request: ClassifyRequest) -> None:
        """Read a tagged request's expert into host memory if it is in no memory tier."""
        if request.task is not None and self.model.store.is_cold(request.task):
            self.model.store.prefetch(request.task)

    def is_cold(self, request: ClassifyRequest) -> bool:
        return request.task is not None and self.model.store.is_cold(request.task)

    def tasks_info(self) -> list[dict]:
        layouts = self.model.store.layouts
        return [
            {
                "task": task,
                "kind": self.task_kinds.kinds[task],
                "text_pairs": self.task_kinds.pairs[task],
                "labels": entry["labels"],
                "expert_bytes": entry["expert_bytes"],
                "expert_kind": layouts[task].kind if task in layouts else None,
                "max_input_length": self.model.heads[task].token_limit(self.model.max_length),
            }
            for task, entry in self.model.artifact.tasks.items()
        ]

    def classify_requests(
        self, requests: list[ClassifyRequest], timings: StageTimings
    ) -> list[list[Prediction] | RequestError]:
        """All rows of all requests in one call: untagged rows routed first (one router pass
        for all); a request with a text routed below its ``min_confidence`` gets a 422 naming
        the top candidate tasks instead of answers, and costs no forward; the other requests'
        rows then run together. A task this version does not serve (a request checked against
        another version during a live update) is refused with 404, alone."""
        routes = self._routes(requests, timings)
        refused = {
            k: refusal
            for k, r in enumerate(requests)
            if (refusal := self._unknown(r) or unsure(r, routes[k]))
        }
        kept = [r for k, r in enumerate(requests) if k not in refused]
        texts: list[str | tuple[str, str]] = []
        tasks: list[str | None] = []
        options: list[dict] = []
        by_row: dict[int, Route] = {}
        for k, request in enumerate(requests):
            for text, route in zip(request.inputs, routes[k], strict=True):
                if k in refused:
                    break
                if route is not None:
                    by_row[len(texts)] = route
                texts.append(text)
                tasks.append(request.task)
                options.append(request.options)
        answers = (
            self.model.classify_rows(
                texts, tasks, self.mixing, timings=timings, routes=by_row, options=options
            )
            if kept
            else []
        )
        split = iter(split_by_request(answers, kept))
        return [refused[k] if k in refused else next(split) for k in range(len(requests))]

    def _unknown(self, request: ClassifyRequest) -> RequestError | None:
        if request.task is None or request.task in self.task_names:
            return None
        return RequestError(
            404,
            f"unknown task {request.task!r}; artifact version {self.version[:12]} has: "
            f"{named(self.task_names)}",
        )

    def updated(self, artifact_dir: Path, expect_version: str | None = None) -> MergedEngine:
        """This engine moved to the artifact now in ``artifact_dir`` (verified), keeping what
        is unchanged (:meth:`MergedClassifier.updated`); this engine is left as it was."""
        artifact = open_artifact(
            artifact_dir, expect_version=expect_version, deferred=(EXPERTS_FOLDER,)
        )
        new = copy.copy(self)
        ArtifactTasks.__init__(new, artifact, self.limits)
        new.model = self.model.updated(artifact)
        new.backbone_bytes = sum(
            p.numel() * p.element_size() for p in new.model.parameters.values()
        )
        return new

    def _routes(
        self, requests: list[ClassifyRequest], timings: StageTimings
    ) -> list[list[Route | None]]:
        """Per request, per text: the router's route (None for a tagged request's texts)."""
        untagged = [r for r in requests if r.task is None]
        if not untagged:
            return [[None] * len(r.inputs) for r in requests]
        start = time.perf_counter()
        found = iter(
            self.model.route(
                [text for r in untagged for text in r.inputs],
                [r.candidates for r in untagged for _ in r.inputs],
            )
        )
        timings.add("route", time.perf_counter() - start)
        return [[next(found) if r.task is None else None for _ in r.inputs] for r in requests]

    def memory(self) -> dict[str, int]:
        return {
            "process_resident_bytes": process_resident_bytes(),
            "device_allocated_bytes": torch.cuda.memory_allocated()
            if self.device.type == "cuda"
            else 0,
            "backbone_bytes": self.backbone_bytes,
            "resident_expert_bytes": self.model.expert_bytes(),
        }


class ZooTasks:
    """The zoo's task list and labels, read without loading a model: what a front end needs to
    check requests and describe the tasks of N separately served models.
    """

    def __init__(
        self, zoo_dir: Path, limits: Limits | None = None, tasks: list[str] | None = None
    ) -> None:
        self.limits = limits or Limits()
        zoo = open_zoo(zoo_dir)
        unknown = [name for name in tasks or [] if name not in zoo.tasks]
        if unknown:
            raise ValueError(
                f"zoo {zoo_dir} has no task {unknown[0]!r}; it has: {', '.join(zoo.tasks)}"
            )
        self.paths = {name: zoo.tasks[name].path for name in tasks or zoo.tasks}
        self.labels = {name: zoo.tasks[name].label_names for name in self.paths}
        configs = {
            name: json.loads((path / "config.json").read_text())
            for name, path in self.paths.items()
        }
        kinds = {name: kind_of_model(self.paths[name], c) for name, c in configs.items()}
        self.task_kinds = TaskKinds(
            kinds, {name: takes_pairs(kinds[name], c) for name, c in configs.items()}
        )
        self.version = f"separate:{','.join(self.labels)}"
        self.created = int(Path(zoo_dir).stat().st_mtime)  # for /v1/models
        self.embeddings: dict[str, dict] = {}  # the baseline serves sequence tasks only

    has_router = False
    damaged = None  # separate models are never altered in place

    def expert_tiers(self) -> dict[str, TierCounts]:
        return {}

    def expert_fetches(self) -> list[tuple[str, float]]:
        return []

    def is_cold(self, request: ClassifyRequest) -> bool:
        return False

    def prefetch(self, request: ClassifyRequest) -> None:
        return None

    def tasks_info(self) -> list[dict]:
        return [
            {
                "task": name,
                "kind": self.task_kinds.kinds[name],
                "text_pairs": self.task_kinds.pairs[name],
                "labels": labels,
                "expert_bytes": 0,
                "expert_kind": None,
                "max_input_length": None,  # known once the model is loaded
            }
            for name, labels in self.labels.items()
        ]

    def check(
        self,
        task: str | None,
        inputs: object,
        candidates: list[str] | None = None,
        min_confidence: float | None = None,
        route: str = CLASSIFY_ROUTE,
        options: dict | None = None,
    ) -> ClassifyRequest:
        if task is None:
            raise RequestError(
                400, f"separate models need a `task`; known tasks: {', '.join(self.labels)}"
            )
        check_routing(task, candidates, list(self.labels), False, "the separate models")
        rows = check_inputs(inputs, self.limits)
        check_kind(task, rows, None, self.task_kinds, route)
        return ClassifyRequest(task, rows, time.perf_counter(), options=check_options(options))


class TaskModel:
    """One fine-tuned model and its tokenizer, as the separate-models baseline serves it."""

    def __init__(
        self,
        path: Path,
        task: str,
        device: torch.device,
        pass_overhead_tokens: int | None = None,
        max_batch_tokens: int | None = None,
    ) -> None:
        self.task = task
        self.device = device
        self.model = load_classifier(path, device)
        self.tokenizer = load_tokenizer(path, self.model)
        self.runner = model_runner(path, self.model.config)
        self.labels = self.runner.labels
        self.max_length = token_limit(self.tokenizer, self.model.config)
        self.plan = PassPlan.for_device(device, pass_overhead_tokens, max_batch_tokens)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.no_grad()
    def classify(
        self,
        texts: list[str | tuple[str, str]],
        timings: StageTimings,
        options: list[dict] | None = None,
    ) -> list[Prediction]:
        """Every text with this model, cut into passes by token length like the merged
        engine's (:class:`PassPlan`), so both sides pay the same padding; answered by the
        task's kind as the merged engine answers it.
        """
        tokens = Tokenized(self.tokenizer, texts, self.max_length)
        start = time.perf_counter()
        logits = forward_in_passes(  # gathered on the CPU, which waits for a GPU to finish
            tokens,
            self.plan.passes(tokens.lengths),
            self.device,
            lambda _rows, batch: self.model(**batch).logits,
        )
        timings.add("forward", time.perf_counter() - start)
        options = options or [DEFAULT_OPTIONS] * len(texts)
        return [
            Prediction(
                self.task,
                False,
                None,
                cut,
                kind=self.runner.kind,
                tokens=length,
                **self.runner.answer(row, text, None, option),
            )
            for row, text, cut, length, option in zip(
                logits, texts, tokens.truncated, tokens.lengths, options, strict=True
            )
        ]


def separate_memory(models: list[TaskModel], device: torch.device) -> dict[str, int]:
    """Memory figures of a replica holding ``models`` (their weights count as backbone)."""
    return {
        "process_resident_bytes": process_resident_bytes(),
        "device_allocated_bytes": torch.cuda.memory_allocated() if device.type == "cuda" else 0,
        "backbone_bytes": sum(model.nbytes() for model in models),
        "resident_expert_bytes": 0,
    }


def classify_by_task(
    requests: list[ClassifyRequest],
    model_for: Callable[[str], TaskModel],
    timings: StageTimings,
) -> list[list[Prediction] | RequestError]:
    """All rows of all requests, each task's rows through ``model_for(task)``."""
    texts = [text for request in requests for text in request.inputs]
    tasks = [request.task for request in requests for _ in request.inputs]
    options = [request.options for request in requests for _ in request.inputs]
    answers: list[Prediction | None] = [None] * len(texts)
    for task in dict.fromkeys(tasks):
        rows = [i for i, t in enumerate(tasks) if t == task]
        found = model_for(task).classify(
            [texts[i] for i in rows], timings, [options[i] for i in rows]
        )
        for row, answer in zip(rows, found, strict=True):
            answers[row] = answer
    return split_by_request(answers, requests)


class SeparateEngine(ZooTasks):
    """The baseline: N fine-tuned models, each whole and all loaded, behind the same
    interface; each task's rows run through its own model.
    """

    def __init__(
        self,
        zoo_dir: Path,
        device: str = "auto",
        limits: Limits | None = None,
        tasks: list[str] | None = None,
        pass_overhead_tokens: int | None = None,
        max_batch_tokens: int | None = None,
    ) -> None:
        super().__init__(zoo_dir, limits, tasks)
        self.device = pick_device(device)
        self.models = {
            task: TaskModel(path, task, self.device, pass_overhead_tokens, max_batch_tokens)
            for task, path in self.paths.items()
        }

    def classify_requests(
        self, requests: list[ClassifyRequest], timings: StageTimings
    ) -> list[list[Prediction]]:
        return classify_by_task(requests, self.models.__getitem__, timings)

    def memory(self) -> dict[str, int]:
        return separate_memory(list(self.models.values()), self.device)
