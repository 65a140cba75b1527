"""Router inference: task probabilities for untagged texts, on the bare merged backbone.

The router's model and file format are :mod:`freemerge.merging.router`'s; it runs through the
one tokenize-and-run loop, with no expert applied (no row adapters assigned).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from freemerge.merging.batching import PassPlan, Tokenized, forward_in_passes
from freemerge.merging.router import load_router, mean_pooled


class RouterMissingError(LookupError):
    """An untagged input for an artifact that was built without a router."""


class Router:
    """The artifact's router on ``device``: :meth:`probabilities` per text."""

    def __init__(self, root: Path, device: torch.device) -> None:
        self.model, record = load_router(root)
        self.model.to(device)
        self.tasks: list[str] = record["tasks"]
        self.max_length: int = record["max_length"]
        self.device = device

    @torch.no_grad()
    def probabilities(
        self,
        backbone: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        texts: list[str],
        plan: PassPlan,
    ) -> torch.Tensor:
        """Task probabilities per text (rows), columns in :attr:`tasks` order."""
        tokens = Tokenized(tokenizer, texts, self.max_length)
        features = forward_in_passes(
            tokens,
            plan.passes(tokens.lengths),
            self.device,
            lambda _rows, batch: mean_pooled(backbone, batch),
        )
        return torch.softmax(self.model(features.to(self.device)), dim=-1).cpu()
