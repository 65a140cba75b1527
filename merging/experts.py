"""Per-task experts: what a task keeps of its own weights on top of the merged backbone.

An expert kind implements one small interface: ``add`` (build from one tensor's residual
theta_t - theta_m, tensor by tensor as the merge streams), ``save`` / ``load`` (safetensors, no
pickle), ``applied`` (the model for task t is theta_m + e_t while inside the context; on exit
the backbone is restored bitwise) and ``nbytes``.

``sparse`` (FREE-Merging, Sec. 3.3): e_t keeps the top ``density`` fraction by magnitude of the
residual, per tensor or per matrix row, stored as int32 flat indices plus float32 values. Apply
writes theta_m[i] + e_t[i] at those indices after saving the original values, and writes the
saved values back on exit: never add-then-subtract, so nothing drifts.

``lowrank`` (the default kind): for each shared 2-D matrix, the truncated SVD of the residual
at ``rank`` (default 4), stored as B = U_r S_r (out x r) and A = V_r^T (r x in), so
theta_m + B A is the best rank-r approximation of theta_t. 1-D tensors (biases, LayerNorm) are
left out by default (``vectors: skip``; ``full`` stores them whole), and so are tensors whose
name matches ``skip`` (default: the embeddings), so by default an expert touches the linear
layers only and the server runs it beside them, LoRA-style (:mod:`freemerge.serving.adapters`).
Applied in place the same way as sparse experts (originals saved, written back) elsewhere.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

GRANULARITIES = ("tensor", "row")
VECTOR_MODES = ("full", "skip")


class Expert(Protocol):
    """The interface every expert kind implements."""

    kind: str

    @property
    def settings(self) -> dict[str, str]: ...

    def add(self, name: str, residual: torch.Tensor) -> None: ...

    def nbytes(self) -> int: ...

    def save(self, path: Path) -> None: ...

    def to(self, device: torch.device | str) -> Expert: ...

    @classmethod
    def mix(cls, experts: list[Expert], weights: list[float]) -> Expert: ...

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

    @classmethod
    def mix(cls, experts: list[SparseExpert], weights: list[float]) -> SparseExpert:
        """sum_t w_t e_t as one sparse expert over the union of the experts' indices."""
        mixed = cls(density=max(e.density for e in experts), granularity=experts[0].granularity)
        for name in {n for e in experts for n in e.entries}:
            parts = [
                (e.entries[name], w)
                for e, w in zip(experts, weights, strict=True)
                if name in e.entries
            ]
            indices = torch.cat([i.to(torch.int64) for (i, _), _ in parts])
            values = torch.cat([v * w for (_, v), w in parts])
            unique, inverse = torch.unique(indices, return_inverse=True)
            summed = torch.zeros(len(unique), dtype=values.dtype, device=values.device)
            mixed.entries[name] = (unique, summed.index_add_(0, inverse, values))
        return mixed

    def to(self, device: torch.device | str) -> SparseExpert:
        """A copy on ``device``, indices as int64 ready to index; this expert is unchanged."""
        moved = SparseExpert(self.density, self.granularity, self.rescale)
        moved.entries = {
            n: (i.to(device, torch.int64), v.to(device)) for n, (i, v) in self.entries.items()
        }
        return moved

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


class LowRankExpert:
    """Truncated SVD factors (B, A) per 2-D matrix; optionally 1-D tensors in full."""

    kind = "lowrank"

    def __init__(self, rank: int = 4, vectors: str = "skip", skip: str = r"embeddings\."):
        if rank < 1:
            raise ValueError(f"expert rank must be >= 1, got {rank}")
        if vectors not in VECTOR_MODES:
            raise ValueError(
                f"unknown vectors mode {vectors!r}; allowed: {', '.join(VECTOR_MODES)}"
            )
        self.rank = rank
        self.vectors = vectors
        self.skip = skip
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (B, A)
        self.full: dict[str, torch.Tensor] = {}

    @property
    def settings(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "rank": str(self.rank),
            "vectors": self.vectors,
            "skip": self.skip,
        }

    def add(self, name: str, residual: torch.Tensor) -> None:
        """B A = the best rank-r approximation of a 2-D residual (Eckart-Young); 1-D in full."""
        if self.skip and re.search(self.skip, name):
            return
        residual = residual.detach().to(torch.float32)
        if residual.ndim == 2:
            u, s, vh = torch.linalg.svd(residual.to(torch.float64), full_matrices=False)
            r = min(self.rank, len(s))
            b = (u[:, :r] * s[:r]).to(torch.float32).contiguous()
            self.factors[name] = (b, vh[:r].to(torch.float32).contiguous())
        elif self.vectors == "full":
            self.full[name] = residual.clone()

    def nbytes(self) -> int:
        tensors = [t for pair in self.factors.values() for t in pair] + list(self.full.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def save(self, path: Path) -> None:
        tensors = {}
        for name, (b, a) in self.factors.items():
            tensors[f"{name}.lora_B"] = b
            tensors[f"{name}.lora_A"] = a
        for name, full in self.full.items():
            tensors[f"{name}.full"] = full.contiguous()
        save_file(tensors, str(path), metadata=self.settings)

    @classmethod
    def load(cls, path: Path, metadata: dict[str, str]) -> LowRankExpert:
        expert = cls(int(metadata["rank"]), metadata["vectors"], metadata["skip"])
        for key, tensor in load_file(str(path)).items():
            name, _, part = key.rpartition(".")
            if part == "lora_B":
                expert.factors[name] = (tensor, expert.factors.get(name, (None, None))[1])
            elif part == "lora_A":
                expert.factors[name] = (expert.factors.get(name, (None, None))[0], tensor)
            else:
                expert.full[name] = tensor
        return expert

    @classmethod
    def mix(cls, experts: list[LowRankExpert], weights: list[float]) -> LowRankExpert:
        """sum_t w_t B_t A_t = [w_1 B_1 | w_2 B_2 | ...] [A_1; A_2; ...], vectors summed."""
        mixed = cls(sum(e.rank for e in experts), experts[0].vectors, experts[0].skip)
        for name in {n for e in experts for n in e.factors}:
            parts = [
                (e.factors[name], w)
                for e, w in zip(experts, weights, strict=True)
                if name in e.factors
            ]
            mixed.factors[name] = (
                torch.cat([b * w for (b, _), w in parts], dim=1),
                torch.cat([a for (_, a), _ in parts], dim=0),
            )
        for name in {n for e in experts for n in e.full}:
            mixed.full[name] = sum(
                e.full[name] * w for e, w in zip(experts, weights, strict=True) if name in e.full
            )
        return mixed

    def to(self, device: torch.device | str) -> LowRankExpert:
        """A copy on ``device``; this expert is unchanged."""
        moved = LowRankExpert(self.rank, self.vectors, self.skip)
        moved.factors = {n: (b.to(device), a.to(device)) for n, (b, a) in self.factors.items()}
        moved.full = {n: t.to(device) for n, t in self.full.items()}
        return moved

    def delta(self, name: str) -> torch.Tensor | None:
        """The dense update this expert makes to tensor ``name`` (B A, or the full vector)."""
        if name in self.factors:
            b, a = self.factors[name]
            return b @ a
        return self.full.get(name)

    @contextmanager
    def applied(self, parameters: dict[str, torch.Tensor]) -> Iterator[None]:
        """Inside the context ``parameters`` hold theta_m + B A (and vectors); theta_m after."""
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for name in [*self.factors, *self.full]:
                    target = parameters[name]
                    original = target.clone()
                    saved.append((target, original))
                    target.copy_(original + self.delta(name).to(target.device, target.dtype))
            yield
        finally:
            with torch.no_grad():
                for target, original in reversed(saved):
                    target.copy_(original)


EXPERT_KINDS: dict[str, type] = {SparseExpert.kind: SparseExpert, LowRankExpert.kind: LowRankExpert}


def expert_settings(kind: str) -> dict[str, object]:
    """The settings of an expert kind and their defaults, read from its constructor."""
    if kind not in EXPERT_KINDS:
        raise ValueError(f"unknown expert kind {kind!r}; allowed: {', '.join(EXPERT_KINDS)}")
    parameters = inspect.signature(EXPERT_KINDS[kind]).parameters.values()
    return {p.name: p.default for p in parameters}


DEFAULT_EXPERT_KIND = LowRankExpert.kind


def make_expert(kind: str = DEFAULT_EXPERT_KIND, **settings: object) -> Expert:
    """A new, empty expert of ``kind``; settings it does not have are refused by name."""
    allowed = expert_settings(kind)
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(
            f"{unknown[0]!r} is not a setting of {kind} experts; allowed: {', '.join(allowed)}"
        )
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
