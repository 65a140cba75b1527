"""Per-task experts: what a task keeps of its own weights on top of the merged backbone.

An expert kind implements one small interface: ``add`` (build from one tensor's residual
theta_t - theta_m, tensor by tensor as the merge streams), ``save`` / ``load`` (safetensors, no
pickle), ``applied`` (the model for task t is theta_m + e_t while inside the context; on exit
the backbone is restored bitwise) and ``nbytes``.

``sparse`` (FREE-Merging, Sec. 3.3): e_t keeps the top ``density`` fraction by magnitude of the
residual, per tensor or per matrix row, stored as int32 flat indices plus float32 values. Apply
writes theta_m[i] + e_t[i] at those indices after saving the original values, and writes the
saved values back on exit: never add-then-subtract, so nothing drifts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

GRANULARITIES = ("tensor", "row")


class Expert(Protocol):
    """The interface every expert kind implements."""

    kind: str

    @property
    def settings(self) -> dict[str, str]: ...

    def add(self, name: str, residual: torch.Tensor) -> None: ...

    def nbytes(self) -> int: ...

    def save(self, path: Path) -> None: ...

    def to(self, device: torch.device | str) -> Expert: ...

    def applied(self, parameters: dict[str, torch.Tensor]) -> AbstractContextManager[None]: ...


class SparseExpert:
    """Top-k entries of a task's residual, per tensor or per row, as (indices, values)."""

    kind = "sparse"

    def __init__(self, density: float = 0.01, granularity: str = "tensor", rescale: float = 1.0):
        if not 0 < density <= 1:
            raise ValueError(f"expert density must be in (0, 1], got {density}")
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown expert granularity {granularity!r}; allowed: {', '.join(GRANULARITIES)}"
            )
        self.density = density
        self.granularity = granularity
        self.rescale = rescale
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def settings(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "density": repr(self.density),
            "granularity": self.granularity,
            "rescale": repr(self.rescale),
        }

    def add(self, name: str, residual: torch.Tensor) -> None:
        """Keep the ``density`` largest-magnitude entries of ``residual`` (times ``rescale``)."""
        flat = residual.detach().reshape(-1).to(torch.float32)
        if self.granularity == "row" and residual.ndim == 2:
            rows, width = residual.shape
            k = max(1, round(self.density * width))
            within = torch.topk(residual.abs().reshape(rows, width), k, dim=1).indices
            indices = (within + torch.arange(rows).unsqueeze(1) * width).reshape(-1)
        else:
            k = max(1, round(self.density * flat.numel()))
            indices = torch.topk(flat.abs(), k).indices
        indices = torch.sort(indices).values
        self.entries[name] = (indices.to(torch.int32), flat[indices] * self.rescale)

    def nbytes(self) -> int:
        return sum(
            i.numel() * i.element_size() + v.numel() * v.element_size()
            for i, v in self.entries.values()
        )

    def save(self, path: Path) -> None:
        tensors = {}
        for name, (indices, values) in self.entries.items():
            tensors[f"{name}.indices"] = indices.contiguous()
            tensors[f"{name}.values"] = values.contiguous()
        save_file(tensors, str(path), metadata=self.settings)

    @classmethod
    def load(cls, path: Path, metadata: dict[str, str]) -> SparseExpert:
        expert = cls(
            float(metadata["density"]), metadata["granularity"], float(metadata["rescale"])
        )
        tensors = load_file(str(path))
        for key in tensors:
            if key.endswith(".indices"):
                name = key[: -len(".indices")]
                expert.entries[name] = (tensors[key], tensors[f"{name}.values"])
        return expert

    def to(self, device: torch.device | str) -> SparseExpert:
        """Move indices (as int64, ready to index) and values to ``device``."""
        for name, (indices, values) in self.entries.items():
            self.entries[name] = (indices.to(device, torch.int64), values.to(device))
        return self

    @contextmanager
    def applied(self, parameters: dict[str, torch.Tensor]) -> Iterator[None]:
        """Inside the context ``parameters`` hold theta_m + e_t; on exit exactly theta_m again."""
        saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for name, (indices, values) in self.entries.items():
                    flat = parameters[name].view(-1)
                    index = indices.to(flat.device, torch.int64)
                    original = flat[index].clone()
                    saved.append((flat, index, original))
                    flat[index] = original + values.to(flat.device, flat.dtype)
            yield
        finally:
            with torch.no_grad():
                for flat, index, original in reversed(saved):
                    flat[index] = original


EXPERT_KINDS: dict[str, type] = {SparseExpert.kind: SparseExpert}


def make_expert(kind: str = "sparse", **settings: object) -> Expert:
    """A new, empty expert of ``kind`` with the config's settings."""
    if kind not in EXPERT_KINDS:
        raise ValueError(f"unknown expert kind {kind!r}; allowed: {', '.join(EXPERT_KINDS)}")
    return EXPERT_KINDS[kind](**settings)


def load_expert(path: Path) -> Expert:
    """Load a saved expert; its kind and settings come from the file's metadata."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    kind = metadata.get("kind")
    if kind not in EXPERT_KINDS:
        raise ValueError(
            f"{path}: unknown expert kind {kind!r}; allowed: {', '.join(EXPERT_KINDS)}"
        )
    return EXPERT_KINDS[kind].load(path, metadata)
