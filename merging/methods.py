"""Merge methods: plain per-tensor functions registered by name (in the manner of mergekit's
``easy_define``).

Each method maps the base tensor theta_0 and the task vectors tau_t = theta_t - theta_0 of one
tensor to the merged tensor theta_m. Its configurable parameters and their defaults are read
from its signature (keyword-only arguments): the merge config's ``parameters`` block sets them
by name, and nothing else holds a default. Three keyword arguments are not parameters but
context the merge supplies per tensor when a method declares them: ``name`` (the tensor's
canonical name), ``stats`` (a dict for per-tensor diagnostics) and ``matrices`` (the names of
the model's layer matrices, found by module type). A method registered with
``experts=True`` also builds one expert per task (FREE-Merging). Streaming and writing live in
:mod:`freemerge.merging.merge`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args, get_origin, get_type_hints

import torch

from freemerge.merging.filters import HighPass

MergeFn = Callable[..., torch.Tensor]
CONTEXT = ("name", "stats", "matrices")


@dataclass(frozen=True)
class MergeMethod:
    name: str
    function: MergeFn
    parameters: dict[str, object]  # name -> default, from the signature
    choices: dict[str, tuple]  # name -> allowed values, from Literal annotations
    experts: bool  # the method builds one expert per task
    context: tuple[str, ...]  # the context arguments the function declares

    def __call__(
        self, base: torch.Tensor, task_vectors: list[torch.Tensor], **kwargs: object
    ) -> torch.Tensor:
        passed = {k: v for k, v in kwargs.items() if k not in CONTEXT or k in self.context}
        return self.function(base, task_vectors, **passed)


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, experts: bool = False) -> Callable[[MergeFn], MergeFn]:
    """Register ``function(base, task_vectors, *, param=default, ...)`` under ``name``."""

    def register(function: MergeFn) -> MergeFn:
        hints = get_type_hints(function)
        keyword = [
            p
            for p in inspect.signature(function).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        params = {p.name: p.default for p in keyword if p.name not in CONTEXT}
        choices = {
            n: _literal_values(hints.get(n)) for n in params if _literal_values(hints.get(n))
        }
        context = tuple(p.name for p in keyword if p.name in CONTEXT)
        METHODS[name] = MergeMethod(name, function, params, choices, experts, context)
        return function

    return register


def _literal_values(hint: object) -> tuple:
    """The values of a ``Literal[...]`` annotation, also inside a union; () otherwise."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    return next((get_args(h) for h in get_args(hint) if get_origin(h) is Literal), ())


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name]


def resolve_parameters(method: MergeMethod, given: dict) -> dict:
    """The method's parameters: its signature's defaults, overridden by ``given`` (checked
    by name, type and allowed values; a dataclass parameter is built from a mapping)."""
    unknown = sorted(set(given) - set(method.parameters))
    if unknown:
        allowed = ", ".join(method.parameters) or "none"
        raise ValueError(
            f"{unknown[0]!r} is not a parameter of method {method.name}; allowed: {allowed}"
        )
    resolved = dict(method.parameters)
    for key, value in given.items():
        resolved[key] = _checked(method, key, value)
    return resolved


def _checked(method: MergeMethod, key: str, value: object) -> object:
    default = method.parameters[key]
    if key in method.choices and value not in method.choices[key]:
        allowed = ", ".join(map(str, method.choices[key]))
        raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
    if dataclasses.is_dataclass(default):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {type(value).__name__}")
        fields = {f.name for f in dataclasses.fields(default)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} in {key}; allowed: {', '.join(fields)}")
        return dataclasses.replace(default, **value)
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, float) or (default is None and value is not None):
        if not numeric:
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    return value


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
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    trimmed = torch.stack([keep_top_magnitude(tau, density) for tau in task_vectors])
    elected = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    disjoint_sum = (trimmed * agree).sum(0)
    disjoint_mean = disjoint_sum / agree.sum(0).clamp(min=1)
    return base + scaling * disjoint_mean


def frequency_filtered(
    base: torch.Tensor,
    task_vectors: list[torch.Tensor],
    *,
    name: str = "",
    stats: dict | None = None,
    matrices: frozenset[str] = frozenset(),
    scaling: float = 0.3,
    other_scaling: float | None = None,
    filter: HighPass = HighPass(),  # noqa: B008 (frozen, so one shared default is safe)
    task_weights: Literal["uniform", "energy"] | list[float] = "uniform",
    magnitude_alignment: bool = False,
) -> torch.Tensor:
    """FR-Merging on one tensor: theta_m = theta_0 + lambda * sum_t w_t * G(tau_t).

    Only 2-D matrices ``filter`` targets are filtered (by default ``matrices``, the layer
    matrices); every other shared tensor is merged by task arithmetic with ``other_scaling``
    (default: ``scaling``). ``w_t``
    is 1 for ``uniform``; for ``energy`` the merge passes w_t = E(tau_t) / sum_s E(tau_s)
    (E = squared norm over all shared tensors). With ``magnitude_alignment`` the filtered sum is
    rescaled to the Frobenius norm of the unfiltered weighted sum. Records
    ``stats["removed_energy"]``, the fraction of each task vector's spectral energy removed.
    """
    weights = task_weights if isinstance(task_weights, list) else [1.0] * len(task_vectors)
    if base.ndim != 2 or not filter.targets_tensor(name, matrices):
        lam = scaling if other_scaling is None else other_scaling
        return base + lam * weighted_sum(task_vectors, weights)
    filtered_sum = torch.zeros_like(base)
    removed = []
    for weight, tau in zip(weights, task_vectors, strict=True):
        filtered, fraction = filter.apply(tau)
        filtered_sum += weight * filtered
        removed.append(fraction)
    if stats is not None:
        stats["removed_energy"] = removed
    if magnitude_alignment:
        norm = filtered_sum.norm()
        if norm > 0:
            filtered_sum *= weighted_sum(task_vectors, weights).norm() / norm
    return base + scaling * filtered_sum


# FR-Merging alone, and FREE-Merging: the same backbone plus one expert per task.
merge_method("fr")(frequency_filtered)
merge_method("free", experts=True)(frequency_filtered)
