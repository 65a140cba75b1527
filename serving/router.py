"""Router inference: calibrated task probabilities for untagged texts.

The router's kinds, features and file format are :mod:`freemerge.merging.router`'s. The
``layers`` and ``experts`` parts run the bare merged backbone (no expert applied: no row
adapters assigned) through the one tokenize-and-run loop; ``embeddings`` reads the token
embedding table only, and ``ngrams`` the text alone. With candidates, a row's probabilities are
renormalised over them (the others' logits set to minus infinity).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from freemerge.merging.batching import PassPlan
from freemerge.merging.experts import Expert
from freemerge.merging.router import (
    RouterInputs,
    dense_inputs,
    expert_subspaces,
    load_router,
    ngram_ids,
)
from freemerge.merging.router_config import parse_kind


class RouterMissingError(LookupError):
    """An untagged input for an artifact that was built without a router."""


@dataclass(frozen=True)
class Route:
    """The router's choice for one text: the task, its probability, and the probability of
    every task it chose among (the candidates, or all tasks)."""

    task: str
    confidence: float
    probabilities: dict[str, float]

    def top(self, count: int = 3) -> list[dict[str, float | str]]:
        """The ``count`` most probable tasks, most probable first."""
        ranked = sorted(self.probabilities.items(), key=lambda item: -item[1])[:count]
        return [{"task": task, "probability": round(p, 4)} for task, p in ranked]


class Router:
    """The artifact's router on ``device``: :meth:`routes` per text."""

    def __init__(
        self,
        root: Path,
        device: torch.device,
        experts: Callable[[], dict[str, Expert | None]],
        per_token: list[str],
    ) -> None:
        """``experts()`` gives every task's expert; called only by the ``experts`` part, which
        reads the layers ``per_token`` names (the backbone's layer matrices)."""
        self.model, record = load_router(root)
        self.model.to(device)
        self.tasks: list[str] = record["tasks"]
        self.kind: str = record["kind"]
        self.parts = parse_kind(self.kind)
        self.buckets: int = record["buckets"]
        self.max_length: int = record["max_length"]
        self.device = device
        self.subspaces = (
            expert_subspaces(experts(), self.tasks, per_token) if "experts" in self.parts else None
        )

    @torch.no_grad()
    def probabilities(
        self,
        backbone: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        texts: list[str],
        plan: PassPlan,
        candidates: list[list[str] | None] | None = None,
    ) -> torch.Tensor:
        """Calibrated task probabilities per text (rows, columns in :attr:`tasks` order); a
        row with candidates has probability only among them (the others 0)."""
        ids = ngram_ids(texts, self.buckets) if "ngrams" in self.parts else None
        dense = dense_inputs(
            self.parts, texts, backbone, tokenizer, self.max_length, plan, self.subspaces
        )
        inputs = RouterInputs(ids, dense)
        logits = self.model(inputs).float().cpu()
        for row, allowed in enumerate(candidates or []):
            if allowed is not None:
                keep = torch.tensor([task in allowed for task in self.tasks])
                logits[row, ~keep] = float("-inf")
        return torch.softmax(logits, dim=-1)

    def routes(
        self,
        backbone: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        texts: list[str],
        plan: PassPlan,
        candidates: list[list[str] | None] | None = None,
    ) -> list[Route]:
        """The chosen task per text, with its probability and every candidate's."""
        probabilities = self.probabilities(backbone, tokenizer, texts, plan, candidates)
        routes = []
        for row, p in enumerate(probabilities):
            allowed = candidates[row] if candidates and candidates[row] is not None else None
            shares = {
                task: float(q)
                for task, q in zip(self.tasks, p.tolist(), strict=True)
                if allowed is None or task in allowed
            }
            best = max(shares, key=shares.__getitem__)
            routes.append(Route(best, shares[best], shares))
        return routes
