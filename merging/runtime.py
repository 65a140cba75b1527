"""The merged model at inference: one backbone, per-task experts and heads.

This is the one piece that applies an expert: evaluation, ``freemerge export`` and the server all
go through :meth:`MergedClassifier.expert_applied`, so their outputs agree exactly.
For the model types merging supports, a task's logits are ``head_t(pooler_output)`` of the
backbone with the task's expert applied, which is what ``*ForSequenceClassification`` computes
in eval mode (its dropout is then the identity).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, BatchEncoding

from merging.adapters import RowTasks, install_row_adapters, rows_assigned, supports_row_adapters
from merging.artifact import Artifact
from merging.batching import Tokenized, pass_overhead, plan_passes
from merging.experts import Expert, load_expert
from merging.router import load_router, mean_pooled

MIXING_MODES = ("argmax", "softmax")


class RouterMissingError(LookupError):
    """An untagged input for an artifact that was built without a router."""


@dataclass
class Prediction:
    """One input's answer: the task used, how it was chosen, and the label scores."""

    task: str
    routed: bool
    router_confidence: float | None
    label: str
    score: float
    scores: dict[str, float]
    truncated: bool


def predictions(
    task: str,
    labels: list[str],
    logits: torch.Tensor,
    truncated: list[bool],
    confidence: list[float | None] | None = None,
) -> list[Prediction]:
    """One answer per row of ``logits``: softmax scores and the best label; a row with a
    router ``confidence`` was routed."""
    confidence = confidence or [None] * len(logits)
    answers = []
    for score, cut, routed in zip(
        torch.softmax(logits, dim=-1).cpu(), truncated, confidence, strict=True
    ):
        best = int(score.argmax())
        answers.append(
            Prediction(
                task=task,
                routed=routed is not None,
                router_confidence=routed,
                label=labels[best],
                score=float(score[best]),
                scores=dict(zip(labels, score.tolist(), strict=True)),
                truncated=cut,
            )
        )
    return answers


class ExpertCache:
    """Experts live in host memory; on an accelerator the ``capacity`` most recently used
    ones are also kept on the device, least recently used out first. On the CPU the host
    copy is the device copy, and every lookup is a hit.
    """

    def __init__(self, device: torch.device, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"expert cache capacity must be >= 1, got {capacity}")
        self.device = device
        self.capacity = capacity
        self.resident: OrderedDict[str, Expert] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, task: str, host: Expert | None) -> Expert | None:
        if host is None:
            return None
        if self.device.type == "cpu":
            self.hits += 1
            return host
        if task in self.resident:
            self.hits += 1
            self.resident.move_to_end(task)
            return self.resident[task]
        self.misses += 1
        if len(self.resident) >= self.capacity:
            self.resident.popitem(last=False)
        self.resident[task] = host.to(self.device)
        return self.resident[task]

    def count_resident(self, lookups: int) -> None:
        """Count ``lookups`` of experts that live on the device anyway (row adapters) as hits."""
        self.hits += lookups

    def nbytes(self) -> int:
        """Bytes of the device copies (zero on the CPU, where the host copies serve). Safe to
        call from another thread while the cache changes (it reads a snapshot)."""
        return sum(expert.nbytes() for expert in list(self.resident.values()))


@dataclass
class StageTimings:
    """Seconds spent per stage (route, expert_apply, forward), summed over a call."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


class MergedClassifier:
    """Backbone loaded once; ``logits(task, texts)`` runs task ``task``'s model on ``texts``."""

    def __init__(
        self,
        artifact: Artifact,
        device: str | torch.device = "cpu",
        expert_cache_size: int = 8,
        row_adapters: bool = True,
        pass_overhead_tokens: int | None = None,
    ) -> None:
        self.artifact = artifact
        self.device = torch.device(device)
        # the fixed cost of one forward pass in tokens, for cutting batches by length
        self.pass_overhead = pass_overhead(self.device, pass_overhead_tokens)
        self.tokenizer = AutoTokenizer.from_pretrained(artifact.backbone)
        self.backbone = AutoModel.from_pretrained(artifact.backbone).to(self.device).eval()
        self.parameters = dict(self.backbone.named_parameters())
        positions = self.backbone.config.max_position_embeddings
        self.max_length = min(self.tokenizer.model_max_length, positions)
        self.heads: dict[str, torch.nn.Linear] = {}
        self.experts: dict[str, Expert | None] = {}
        for task, entry in artifact.tasks.items():
            state = load_file(str(artifact.path(entry["head"])))
            head = torch.nn.Linear(
                state["classifier.weight"].shape[1], state["classifier.weight"].shape[0]
            )
            head.load_state_dict(
                {"weight": state["classifier.weight"], "bias": state["classifier.bias"]}
            )
            self.heads[task] = head.to(self.device).eval()
            expert = entry.get("expert")
            self.experts[task] = load_expert(artifact.path(expert)) if expert else None
        self.expert_cache = ExpertCache(self.device, expert_cache_size)
        # Low-rank experts on linear layers only: run them per row beside the base layers.
        self.row_adapters: RowTasks | None = None
        if row_adapters and self.experts and supports_row_adapters(self.experts, self.backbone):
            self.row_adapters = install_row_adapters(self.backbone, self.experts, self.device)
        self.router = None
        if artifact.manifest.get("router"):
            self.router, record = load_router(artifact.root)
            self.router.to(self.device)
            self.router_tasks: list[str] = record["tasks"]
            self.router_max_length: int = record["max_length"]

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def labels(self, task: str) -> list[str]:
        return self.artifact.task(task)["labels"]

    def _limit(self, max_length: int | None) -> int:
        return min(max_length or self.max_length, self.max_length)

    def encode(self, texts: list[str], max_length: int | None = None) -> BatchEncoding:
        """All texts in one padded batch on the device (truncated to the token limit)."""
        tokens = Tokenized(self.tokenizer, texts, self._limit(max_length))
        return tokens.padded(list(range(len(texts))), self.device)

    @contextmanager
    def expert_applied(self, task: str | None) -> Iterator[None]:
        """The backbone holds theta_m + e_task inside the block and exactly theta_m after it.

        ``task=None`` leaves the backbone as it is (for a mixture applied around the call).
        """
        expert = None
        if task is not None:
            self.artifact.task(task)  # an unknown task fails with the list of known ones
            expert = self.expert_cache.get(task, self.experts[task])
        with expert.applied(self.parameters) if expert is not None else nullcontext():
            yield

    @contextmanager
    def mixture_applied(self, weights: dict[str, float]) -> Iterator[None]:
        """The backbone holds theta_m + sum_t w_t e_t inside the block (softmax routing)."""
        experts = [
            (self.expert_cache.get(t, self.experts[t]), w)
            for t, w in weights.items()
            if self.experts[t] is not None
        ]
        if not experts:
            yield
            return
        kind = type(experts[0][0])
        mixed = kind.mix([e for e, _ in experts], [w for _, w in experts])
        with mixed.applied(self.parameters):
            yield

    @torch.no_grad()
    def route(self, texts: list[str]) -> torch.Tensor:
        """Task probabilities per text (rows), columns in ``self.router_tasks`` order."""
        if self.router is None:
            raise RouterMissingError(
                "this artifact has no router, so a task is required; "
                f"tasks: {', '.join(self.tasks)}"
            )
        batch = self.encode(texts, self.router_max_length)
        return torch.softmax(self.router(mean_pooled(self.backbone, batch)), dim=-1)

    @torch.no_grad()
    def classify(
        self,
        texts: list[str],
        task: str | None = None,
        mixing: str = "argmax",
        max_length: int | None = None,
        timings: StageTimings | None = None,
    ) -> list[Prediction]:
        """Answer every text with ``task``, or with the router's task per text when None."""
        return self.classify_rows(texts, [task] * len(texts), mixing, max_length, timings)

    @torch.no_grad()
    def classify_rows(
        self,
        texts: list[str],
        tasks: list[str | None],
        mixing: str = "argmax",
        max_length: int | None = None,
        timings: StageTimings | None = None,
    ) -> list[Prediction]:
        """Answer each text with its own task; rows whose task is None are routed.

        Untagged rows cost one router pass. The rows are then cut into forward passes by token
        length; with row adapters (low-rank experts on linear layers) rows of any tasks share
        a pass, otherwise each pass holds one task with its expert applied in place. With
        ``mixing="softmax"`` each routed row runs alone with the router-weighted mix of all
        experts and the most probable task's head.
        """
        if mixing not in MIXING_MODES:
            raise ValueError(f"unknown mixing {mixing!r}; allowed: {', '.join(MIXING_MODES)}")
        timings = timings if timings is not None else StageTimings()
        for task in set(tasks) - {None}:
            self.artifact.task(task)  # unknown tasks fail before any work
        routed = [i for i, task in enumerate(tasks) if task is None]
        chosen = list(tasks)
        confidence: dict[int, float] = {}
        probabilities = None
        if routed:
            start = time.perf_counter()
            probabilities = self.route([texts[i] for i in routed])
            timings.add("route", time.perf_counter() - start)
            for row, p in zip(routed, probabilities, strict=True):
                chosen[row] = self.router_tasks[int(p.argmax())]
                confidence[row] = float(p.max())
        tokens = Tokenized(self.tokenizer, texts, self._limit(max_length))
        answers: list[Prediction | None] = [None] * len(texts)
        for row_tasks, rows, weights in self._passes(
            chosen, routed, probabilities, mixing, tokens.lengths
        ):
            batch = tokens.padded(rows, self.device)
            pooled = self._pooled_timed(row_tasks, weights, batch, timings)
            for task in dict.fromkeys(row_tasks):
                positions = [i for i, t in enumerate(row_tasks) if t == task]
                picked = [rows[i] for i in positions]
                for row, answer in zip(
                    picked,
                    predictions(
                        task,
                        self.labels(task),
                        self.heads[task](pooled[positions]),
                        [tokens.truncated[row] for row in picked],
                        [confidence.get(row) for row in picked],
                    ),
                    strict=True,
                ):
                    answers[row] = answer
        return answers

    def _passes(
        self,
        chosen: list[str],
        routed: list[int],
        probabilities: torch.Tensor | None,
        mixing: str,
        lengths: list[int],
    ) -> list[tuple[list[str], list[int], dict[str, float] | None]]:
        """Forward passes as ``(task per row, rows, mixture weights or None)``.

        Rows are cut into passes by token length (:func:`plan_passes`). With row adapters any
        tasks share a pass, their rows put next to each other; otherwise each pass holds one
        task. With softmax mixing each routed row is a pass of its own.
        """
        mixed = set(routed) if mixing == "softmax" else set()
        order = {task: k for k, task in enumerate(dict.fromkeys(chosen))}
        plain = [i for i in range(len(chosen)) if i not in mixed]
        groups = (
            [plain]
            if self.row_adapters is not None
            else [[i for i in plain if chosen[i] == task] for task in order]
        )
        passes = []
        for group in groups:
            for cut in plan_passes([lengths[i] for i in group], self.pass_overhead):
                rows = sorted((group[k] for k in cut), key=lambda i: (order[chosen[i]], i))
                passes.append(([chosen[i] for i in rows], rows, None))
        for position, row in enumerate(routed):
            if row in mixed:
                weights = dict(
                    zip(self.router_tasks, probabilities[position].tolist(), strict=True)
                )
                passes.append(([chosen[row]], [row], weights))
        return passes

    def _pooled_timed(
        self,
        row_tasks: list[str],
        weights: dict[str, float] | None,
        batch: BatchEncoding,
        timings: StageTimings,
    ) -> torch.Tensor:
        """Pooled output of one pass, stages timed. The pass runs with a weighted mix of
        experts (``weights``), with per-row adapters (LoRA-style, any tasks), or with the one
        task's expert applied in place.
        """
        start = time.perf_counter()
        if weights:
            context = self.mixture_applied(weights)
        elif self.row_adapters is not None:
            context = rows_assigned(self.row_adapters, row_tasks)
            self.expert_cache.count_resident(len(set(row_tasks)))
        else:
            context = self.expert_applied(row_tasks[0])
        with context:
            applied = time.perf_counter()
            pooled = self.backbone(**batch).pooler_output
            if pooled.is_cuda:
                torch.cuda.synchronize()
            forwarded = time.perf_counter()
        timings.add("forward", forwarded - applied)
        timings.add("expert_apply", (applied - start) + (time.perf_counter() - forwarded))
        return pooled

    @torch.no_grad()
    def pooled(self, task: str | None, batch: BatchEncoding) -> torch.Tensor:
        with self.expert_applied(task):
            return self.backbone(**batch).pooler_output

    @torch.no_grad()
    def logits(self, task: str, texts: list[str], max_length: int | None = None) -> torch.Tensor:
        pooled = self.pooled(task, self.encode(texts, max_length))
        return self.heads[task](pooled)
