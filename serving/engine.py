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
from pathlib import Path
from typing import Protocol

import torch

from freemerge.merging.artifact import EXPERTS_FOLDER, open_artifact
from freemerge.merging.batching import PassPlan, Tokenized, forward_in_passes
from freemerge.merging.families import load_classifier, load_tokenizer, token_limit
from freemerge.merging.kind_rules import (
    CLASSIFY_ROUTE,
    DEFAULT_OPTIONS,
    takes_pairs,
)
from freemerge.merging.kinds import kind_of_model, model_runner
from freemerge.merging.zoo_folder import open_zoo
from freemerge.serving.expert_store import TierCounts
from freemerge.serving.requests import (
    ArtifactTasks,
    ClassifyRequest,
    Limits,
    Prediction,
    RequestError,
    StageTimings,
    TaskKinds,
    check_inputs,
    check_kind,
    check_options,
    check_routing,
    named,
)
from freemerge.serving.router import Route
from freemerge.serving.runtime import MergedClassifier
from freemerge.serving.settings import ServingOptions


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
