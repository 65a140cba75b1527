"""The merged model at inference: one backbone, per-task experts and heads.

This is the one piece that applies an expert: evaluation, ``freemerge export`` and the server all
go through :meth:`MergedClassifier.expert_applied`, so their outputs agree exactly.
For the model types merging supports, a task's logits are ``head_t(pooler_output)`` of the
backbone with the task's expert applied, which is what ``*ForSequenceClassification`` computes
in eval mode (its dropout is then the identity).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, BatchEncoding

from merging.artifact import Artifact
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


@dataclass
class Encoded:
    batch: BatchEncoding
    truncated: list[bool]


class MergedClassifier:
    """Backbone loaded once; ``logits(task, texts)`` runs task ``task``'s model on ``texts``."""

    def __init__(self, artifact: Artifact, device: str | torch.device = "cpu") -> None:
        self.artifact = artifact
        self.device = torch.device(device)
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
            self.experts[task] = (
                load_expert(artifact.path(expert)).to(self.device) if expert else None
            )
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

    def encode(self, texts: list[str], max_length: int | None = None) -> Encoded:
        """Tokenize with padding; texts longer than the limit are truncated and flagged."""
        limit = min(max_length or self.max_length, self.max_length)
        batch = self.tokenizer(
            texts, truncation=True, max_length=limit, padding=True, return_tensors="pt"
        )
        # A fast tokenizer keeps what truncation cut off in each encoding's ``overflowing``.
        truncated = [bool(encoding.overflowing) for encoding in batch.encodings]
        return Encoded(batch.to(self.device), truncated)

    @contextmanager
    def expert_applied(self, task: str | None) -> Iterator[None]:
        """The backbone holds theta_m + e_task inside the block and exactly theta_m after it.

        ``task=None`` leaves the backbone as it is (for a mixture applied around the call).
        """
        expert = None
        if task is not None:
            self.artifact.task(task)  # an unknown task fails with the list of known ones
            expert = self.experts[task]
        with expert.applied(self.parameters) if expert is not None else nullcontext():
            yield

    @contextmanager
    def mixture_applied(self, weights: dict[str, float]) -> Iterator[None]:
        """The backbone holds theta_m + sum_t w_t e_t inside the block (softmax routing)."""
        experts = [(self.experts[t], w) for t, w in weights.items() if self.experts[t] is not None]
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
        encoded = self.encode(texts, self.router_max_length)
        return torch.softmax(self.router(mean_pooled(self.backbone, encoded.batch)), dim=-1)

    @torch.no_grad()
    def classify(
        self,
        texts: list[str],
        task: str | None = None,
        mixing: str = "argmax",
        max_length: int | None = None,
    ) -> list[Prediction]:
        """Answer every text with ``task``, or with the router's task per text when None.

        Routed texts are grouped by task, so each group runs once with its expert applied;
        with ``mixing="softmax"`` each routed text runs with the router-weighted mix of all
        experts and the most probable task's head.
        """
        if mixing not in MIXING_MODES:
            raise ValueError(f"unknown mixing {mixing!r}; allowed: {', '.join(MIXING_MODES)}")
        if task is not None:
            self.artifact.task(task)
            return self._answer(texts, [task] * len(texts), None, max_length)
        probabilities = self.route(texts)
        tasks = [self.router_tasks[i] for i in probabilities.argmax(-1).tolist()]
        if mixing == "argmax":
            return self._answer(texts, tasks, probabilities, max_length)
        answers = []
        for i, text in enumerate(texts):
            weights = dict(zip(self.router_tasks, probabilities[i].tolist(), strict=True))
            with self.mixture_applied(weights):
                answers += self._answer(
                    [text], [tasks[i]], probabilities[i : i + 1], max_length, experts=False
                )
        return answers

    def _answer(
        self,
        texts: list[str],
        tasks: list[str],
        probabilities: torch.Tensor | None,
        max_length: int | None,
        experts: bool = True,
    ) -> list[Prediction]:
        answers: list[Prediction | None] = [None] * len(texts)
        for task in dict.fromkeys(tasks):
            rows = [i for i, t in enumerate(tasks) if t == task]
            encoded = self.encode([texts[i] for i in rows], max_length)
            pooled = self.pooled(task if experts else None, encoded.batch)
            scores = torch.softmax(self.heads[task](pooled), dim=-1).cpu()
            labels = self.labels(task)
            for row, score, truncated in zip(rows, scores, encoded.truncated, strict=True):
                best = int(score.argmax())
                answers[row] = Prediction(
                    task=task,
                    routed=probabilities is not None,
                    router_confidence=None
                    if probabilities is None
                    else float(probabilities[row].max()),
                    label=labels[best],
                    score=float(score[best]),
                    scores=dict(zip(labels, score.tolist(), strict=True)),
                    truncated=truncated,
                )
        return answers

    @torch.no_grad()
    def pooled(self, task: str | None, batch: BatchEncoding) -> torch.Tensor:
        with self.expert_applied(task):
            return self.backbone(**batch).pooler_output

    @torch.no_grad()
    def logits(self, task: str, texts: list[str], max_length: int | None = None) -> torch.Tensor:
        pooled = self.pooled(task, self.encode(texts, max_length).batch)
        return self.heads[task](pooled)
