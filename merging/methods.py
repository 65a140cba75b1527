"""Merge methods: plain per-tensor functions registered by name (in the manner of mergekit).

Each method maps the base tensor theta_0 and the task vectors tau_t = theta_t - theta_0 of one
tensor to the merged tensor theta_m. Its parameters are read from its signature: the config's
``parameters`` block supplies them by name, and a default in the signature is the documented
default. A method may also take ``stats``, a dict in which it records per-tensor diagnostics
(not a parameter). Loading, streaming and writing tensors live in :mod:`merging.merge`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from merging.filters import HighPass

MergeFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    function: MergeFn
    parameters: dict[str, object]  # name -> default, from the signature

    def __call__(
        self, base: torch.Tensor, task_vectors: list[torch.Tensor], **params: object
    ) -> torch.Tensor:
        return self.function(base, task_vectors, **params)


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str) -> Callable[[MergeFn], MergeFn]:
    """Register ``function(base, task_vectors, *, param=default, ...)`` under ``name``."""

    def register(function: MergeFn) -> MergeFn:
        signature = inspect.signature(function)
        params = {
            p.name: p.default
            for p in signature.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "stats"
        }
        METHODS[name] = MergeMethod(name, function, params)
        return function

    return register


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name]


@merge_method("average")
def average(base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """theta_m = mean_t theta_t = theta_0 + mean_t tau_t."""
    return base + weighted_sum(task_vectors) / len(task_vectors)


@merge_method("task_arithmetic")
def task_arithmetic(
    base: torch.Tensor, task_vectors: list[torch.Tensor], *, scaling: float = 0.3
) -> torch.Tensor:
    """theta_m = theta_0 + lambda * sum_t tau_t (Ilharco et al., 2023)."""
    return base + scaling * weighted_sum(task_vectors)


def weighted_sum(tensors: list[torch.Tensor], weights: list[float] | None = None) -> torch.Tensor:
    """sum_t w_t x_t, accumulated in place: one extra tensor, never a stack of N."""
    total = torch.zeros_like(tensors[0])
    for i, tensor in enumerate(tensors):
        total.add_(tensor, alpha=1.0 if weights is None else weights[i])
    return total


def keep_top_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the round(density * numel) entries of largest magnitude (at least one)."""
    k = max(1, int(round(density * tensor.numel())))
    flat = tensor.reshape(-1)
    keep = torch.zeros_like(flat)
    top = torch.topk(flat.abs(), k, sorted=False).indices
    keep[top] = flat[top]
    return keep.reshape(tensor.shape)


@merge_method("ties")
def ties(
    base: torch.Tensor,
    task_vectors: list[torch.Tensor],
    *,
    scaling: float = 1.0,
    density: float = 0.2,
) -> torch.Tensor:
    """TIES-Merging (Yadav et al., 2023): trim to ``density``, elect sign, disjoint mean.

    sign = sign(sum_t trim(tau_t)); agree_t = trim(tau_t) != 0 and sign(trim(tau_t)) == sign;
    theta_m = theta_0 + lambda * sum_t(trim(tau_t) * agree_t) / max(1, sum_t agree_t).
    """
    trimmed = torch.stack([keep_top_magnitude(tau, density) for tau in task_vectors])
    elected = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    disjoint_sum = (trimmed * agree).sum(0)
    disjoint_mean = disjoint_sum / agree.sum(0).clamp(min=1)
    return base + scaling * disjoint_mean


@merge_method("fr")
def frequency_filtered(
    base: torch.Tensor,
    task_vectors: list[torch.Tensor],
    *,
    scaling: float = 0.3,
    high_pass: HighPass | None = None,
    task_weights: list[float] | None = None,
    magnitude_alignment: bool = False,
    stats: dict | None = None,
) -> torch.Tensor:
    """FR-Merging on one matrix: theta_m = theta_0 + lambda * sum_t w_t * G(tau_t).

    ``w_t`` is 1 unless ``task_weights`` are given; with ``magnitude_alignment`` the filtered
    sum is rescaled to the Frobenius norm of the unfiltered weighted sum. Matrices that are not
    2-D pass through unfiltered (task arithmetic). Records ``stats["removed_energy"]``, the
    fraction of each task vector's spectral energy that the filter removed.
    """
    weights = task_weights or [1.0] * len(task_vectors)
    if base.ndim != 2 or high_pass is None:
        return base + scaling * weighted_sum(task_vectors, weights)
    filtered_sum = torch.zeros_like(base)
    removed = []
    for weight, tau in zip(weights, task_vectors, strict=True):
        filtered, fraction = high_pass.apply(tau)
        filtered_sum += weight * filtered
        removed.append(fraction)
    if stats is not None:
        stats["removed_energy"] = removed
    if magnitude_alignment:
        plain = weighted_sum(task_vectors, weights)
        norm = filtered_sum.norm()
        if norm > 0:
            filtered_sum *= plain.norm() / norm
    return base + scaling * filtered_sum
