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
    def expert_applied(self, task: str) -> Iterator[None]:
        """The backbone holds theta_m + e_task inside the block and exactly theta_m after it."""
        self.artifact.task(task)
        expert = self.experts[task]
        with expert.applied(self.parameters) if expert is not None else nullcontext():
            yield

    @torch.no_grad()
    def pooled(self, task: str, batch: BatchEncoding) -> torch.Tensor:
        with self.expert_applied(task):
            return self.backbone(**batch).pooler_output

    @torch.no_grad()
    def logits(self, task: str, texts: list[str], max_length: int | None = None) -> torch.Tensor:
        self.artifact.task(task)  # unknown tasks fail with the list of known ones
        encoded = self.encode(texts, max_length)
        return self.heads[task](self.pooled(task, encoded.batch))
