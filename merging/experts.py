"""Per-task experts: what a task keeps of its own weights on top of the merged backbone.

An expert kind implements one small interface: ``add`` (build from one tensor's residual
theta_t - theta_m, tensor by tensor as the merge streams), ``save`` / ``load`` (safetensors, no
pickle), ``applied`` (the model for task t is theta_m + e_t while inside the context; on exit
the backbone is restored bitwise) and ``nbytes``.

``sparse`` (FREE-Merging, Sec. 3.3): e_t keeps the top ``density`` fraction by magnitude of the
residual, per tensor or per matrix row, stored as int32 flat indices plus float32 values. Apply
writes theta_m[i] + e_t[i] at those indices after saving the original values, and writes the
saved values back on exit: never add-then-subtract, so nothing drifts.

``lowrank`` (the default kind): for each linear layer's weight, the truncated SVD of the residual
at ``rank`` (default 8), stored as B = U_r S_r (out x r) and A = V_r^T (r x in), so
theta_m + B A is the best rank-r approximation of theta_t. The factors are stored in 16-bit
floats by default (``dtype: float32`` keeps full precision) and computed with in the backbone's
dtype. Every other tensor (biases, LayerNorms, and matrices that are no linear layer's weight,
such as embeddings and relative-position tables) is left out by default (``vectors: skip``;
``full`` stores them whole), and so are tensors whose name matches ``skip`` (the embeddings),
so by default an expert touches the linear layers only and the server runs it beside them,
LoRA-style (:mod:`freemerge.serving.adapters`). Applied in place the same way as sparse
experts (originals saved, written back) elsewhere.
"""

from __future__ import annotations

import inspect
import json
import re
import struct
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load, save_file

GRANULARITIES = ("tensor", "row")
VECTOR_MODES = ("full", "skip")
FACTOR_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class Expert(Protocol):
    """The interface every expert kind implements."""

    kind: str

    @property
    def settings(self) -> dict[str, str]: ...

    def add(self, name: str, residual: torch.Tensor, linear: bool = True) -> None: ...

    def nbytes(self) -> int: ...

    def save(self, path: Path) -> None: ...

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Expert: ...

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

    def add(self, name: str, residual: torch.Tensor, linear: bool = True) -> None:
        """Keep the ``density`` largest-magnitude entries of ``residual`` (times ``rescale``),
        of any tensor (``linear``, whether it is a linear layer's weight, changes nothing)."""
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
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> SparseExpert:
        expert = cls(
            float(metadata["density"]), metadata["granularity"], float(metadata["rescale"])
        )
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

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SparseExpert:
        """A copy on ``device`` (values in ``dtype``), indices as int64 ready to index; this
        expert is unchanged."""
        moved = SparseExpert(self.density, self.granularity, self.rescale)
        moved.entries = {
            n: (i.to(device, torch.int64), v.to(device, dtype))
            for n, (i, v) in self.entries.items()
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


def _transposed_layout(matrix: torch.Tensor) -> torch.Tensor:
    """The same matrix, stored so that its transpose is contiguous."""
    return matrix.T.contiguous().T


class LowRankExpert:
    """Truncated SVD factors (B, A) per linear layer's weight; optionally the rest in full."""

    kind = "lowrank"

    def __init__(
        self,
        rank: int = 8,
        vectors: str = "skip",
        skip: str = r"embeddings\.",
        dtype: str = "float16",
    ):
        if rank < 1:
            raise ValueError(f"expert rank must be >= 1, got {rank}")
        if dtype not in FACTOR_DTYPES:
            raise ValueError(f"unknown expert dtype {dtype!r}; allowed: {', '.join(FACTOR_DTYPES)}")
        if vectors not in VECTOR_MODES:
            raise ValueError(
                f"unknown vectors mode {vectors!r}; allowed: {', '.join(VECTOR_MODES)}"
            )
        self.rank = rank
        self.vectors = vectors
        self.skip = skip
        self.dtype = dtype  # how the factors are stored
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (B, A)
        self.full: dict[str, torch.Tensor] = {}

    @property
    def settings(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "rank": str(self.rank),
            "vectors": self.vectors,
            "skip": self.skip,
            "dtype": self.dtype,
        }

    def add(self, name: str, residual: torch.Tensor, linear: bool = True) -> None:
        """B A = the best rank-r approximation of a linear layer's 2-D residual (Eckart-Young);
        any other tensor whole with ``vectors: full``, else left out."""
        if self.skip and re.search(self.skip, name):
            return
        stored = FACTOR_DTYPES[self.dtype]
        residual = residual.detach().to(torch.float32)
        if residual.ndim == 2 and linear:
            u, s, vh = torch.linalg.svd(residual.to(torch.float64), full_matrices=False)
            r = min(self.rank, len(s))
            b = (u[:, :r] * s[:r]).to(stored).contiguous()
            self.factors[name] = (b, vh[:r].to(stored).contiguous())
        elif self.vectors == "full":
            self.full[name] = residual.to(stored).clone()

    def nbytes(self) -> int:
        tensors = [t for pair in self.factors.values() for t in pair] + list(self.full.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def save(self, path: Path) -> None:
        tensors = {}
        for name, (b, a) in self.factors.items():
            tensors[f"{name}.lora_B"] = b.contiguous()  # one moved by to() is laid out transposed
            tensors[f"{name}.lora_A"] = a.contiguous()
        for name, full in self.full.items():
            tensors[f"{name}.full"] = full.contiguous()
        save_file(tensors, str(path), metadata=self.settings)

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> LowRankExpert:
        # files written before the dtype setting hold float32 factors
        dtype = metadata.get("dtype", "float32")
        expert = cls(int(metadata["rank"]), metadata["vectors"], metadata["skip"], dtype)
        for key, tensor in tensors.items():
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
        # computed in float32: a mixture is built per text and never stored
        experts = [e.to(e.device, torch.float32) for e in experts]
        first = experts[0]
        mixed = cls(sum(e.rank for e in experts), first.vectors, first.skip, "float32")
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

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LowRankExpert:
        """A copy on ``device`` (and in ``dtype``, the dtype it computes in), laid out as the
        row adapters read it: ``A`` (rank x in) contiguous, ``B`` with its transpose contiguous
        (the fused CPU kernel reads both so, and BLAS runs ``A x^T`` and the update from them
        as fast as from any layout, measured at 17 to 128 tokens). This expert is unchanged."""
        name = next((k for k, v in FACTOR_DTYPES.items() if v == dtype), self.dtype)
        moved = LowRankExpert(self.rank, self.vectors, self.skip, name)
        moved.factors = {
            n: (_transposed_layout(b.to(device, dtype)), a.to(device, dtype).contiguous())
            for n, (b, a) in self.factors.items()
        }
        moved.full = {n: t.to(device, dtype) for n, t in self.full.items()}
        return moved

    @property
    def device(self) -> torch.device:
        """Where the factors live (the CPU for an empty expert)."""
        pair = next(iter(self.factors.values()), None)
        return pair[0].device if pair else torch.device("cpu")

    def delta(self, name: str) -> torch.Tensor | None:
        """The dense update this expert makes to tensor ``name`` (B A, or the full vector),
        computed in float32 at least."""
        if name in self.factors:
            b, a = self.factors[name]
            wide = torch.promote_types(b.dtype, torch.float32)
            return b.to(wide) @ a.to(wide)
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


def _kind_of(metadata: dict[str, str], where: object) -> type:
    kind = metadata.get("kind")
    if kind not in EXPERT_KINDS:
        raise ValueError(
            f"{where}: unknown expert kind {kind!r}; allowed: {', '.join(EXPERT_KINDS)}"
        )
    return EXPERT_KINDS[kind]


def load_expert(path: Path) -> Expert:
    """Load a saved expert; its kind and settings come from the file's metadata."""
    return expert_from_bytes(Path(path).read_bytes(), path)


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes (the header: a little-endian u64
    length, then JSON)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}


def expert_from_bytes(data: bytes, where: object = "expert") -> Expert:
    """An expert parsed from the bytes of its file (so what is parsed is what was hashed),
    its tensors in name order (``safetensors.torch.load`` returns them in an order that
    varies between processes)."""
    metadata = safetensors_metadata(data)
    tensors = load(data)
    return _kind_of(metadata, where).from_tensors(
        {name: tensors[name] for name in sorted(tensors)}, metadata
    )


@dataclass(frozen=True)
class ExpertLayout:
    """What an expert file holds, read from its header alone: the kind, the weights it adapts
    with low-rank factors, and the other tensors it touches (sparse entries, whole vectors)."""

    kind: str
    matrices: frozenset[str]
    other: frozenset[str]

    @property
    def names(self) -> frozenset[str]:
        """Every backbone tensor the expert changes."""
        return self.matrices | self.other


def expert_layout(path: Path) -> ExpertLayout:
    """The :class:`ExpertLayout` of the expert file at ``path``, without loading a tensor."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        keys = list(handle.keys())
    kind = _kind_of(metadata, path).kind
    named = {k.rpartition(".")[0]: k.rpartition(".")[2] for k in keys}
    matrices = {name for name, part in named.items() if part in ("lora_A", "lora_B")}
    return ExpertLayout(kind, frozenset(matrices), frozenset(named) - matrices)
