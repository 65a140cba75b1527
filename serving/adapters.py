"""Low-rank experts run beside the backbone's linear layers, LoRA-style, per row of a batch.

As in PEFT's LoRA layer, the adapter math wraps the base layer:
``result = base(x) + (x A_t^T) B_t^T`` for the rows whose task is t (PEFT's mixed-batch
forward), so one forward pass serves a batch that mixes tasks, and the base weights are never
written. Equal to applying theta_m + B_t A_t in place up to float rounding.

The layers hold no adapters: the experts of a pass come from the expert store and are handed
to every wrapped layer through :class:`RowTasks` for that pass only, with the rows they apply
to. The caller puts each task's rows next to each other, so a task's rows are a slice of the
batch: the update is two small matmuls on a view and one in-place ``addmm_``, with no gather
or scatter of rows (BLAS reads the transposed factors in place).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import groupby

import torch

from freemerge.merging.experts import Expert, ExpertLayout


class RowTasks:
    """Which batch rows use which expert during one forward pass (shared by all layers):
    ``segments`` holds ``(expert or None, start, stop)`` for each run of rows of one task, and
    ``rows`` the pass's rows."""

    def __init__(self) -> None:
        self.segments: list[tuple[Expert | None, int, int]] = []
        self.rows = 0


class LowRankLinear(torch.nn.Module):
    """A linear layer plus, for each segment of rows, that segment's expert factors for this
    layer's weight (``weight``: the weight's name in the backbone)."""

    def __init__(self, base: torch.nn.Linear, weight: str, rows: RowTasks) -> None:
        super().__init__()
        self.base = base
        self.weight = weight
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        segments = self.rows.segments
        if not segments:
            return result
        flat_result = result.view(-1, result.shape[-1])
        flat_x = x.reshape(-1, x.shape[-1])
        if len(segments) == 1:  # one task: every row, and any input shared by the batch
            segments = [(segments[0][0], 0, flat_x.shape[0])]
            per_row = 1
        elif x.shape[0] != self.rows.rows:
            raise RuntimeError(
                f"{self.weight} ran on an input that is not one row per text of the pass "
                f"(shape {tuple(x.shape)}, {self.rows.rows} texts): this model's layers cannot "
                "mix tasks in one pass"
            )
        else:
            per_row = flat_x.shape[0] // x.shape[0]  # tokens per batch row
        for expert, start, stop in segments:
            pair = _factors(expert, self.weight)
            if pair is not None:
                b, a = pair
                rows = slice(start * per_row, stop * per_row)
                flat_result[rows].addmm_(flat_x[rows] @ a.T, b.T)
        return result


def _factors(expert: Expert | None, weight: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B, A) of ``expert`` for ``weight``, or None."""
    return expert.factors.get(weight) if expert is not None else None


def row_adapter_weights(
    layouts: Iterable[ExpertLayout], backbone: torch.nn.Module
) -> set[str] | None:
    """The weights to wrap when every expert is low-rank and touches ``nn.Linear`` weights
    only; None otherwise (the experts are applied in place)."""
    modules = dict(backbone.named_modules())
    weights: set[str] = set()
    for layout in layouts:
        if layout.kind != "lowrank" or layout.other:
            return None
        for name in layout.matrices:
            module = modules.get(name.removesuffix(".weight"))
            linear = isinstance(module, (torch.nn.Linear, LowRankLinear))  # wrapped already
            if not name.endswith(".weight") or not linear:
                return None
        weights |= layout.matrices
    return weights


def install_row_adapters(
    backbone: torch.nn.Module, weights: Iterable[str], rows: RowTasks | None = None
) -> RowTasks:
    """Wrap the linear layer of each weight in ``weights`` in place (those not wrapped yet);
    return the row map they share."""
    rows = rows if rows is not None else RowTasks()
    for name in sorted(weights):
        path = name.removesuffix(".weight")
        parent_path, _, child = path.rpartition(".")
        parent = backbone.get_submodule(parent_path) if parent_path else backbone
        layer = getattr(parent, child)
        if not isinstance(layer, LowRankLinear):
            setattr(parent, child, LowRankLinear(layer, name, rows))
    return rows


@contextmanager
def rows_assigned(
    rows: RowTasks, tasks: list[str], experts: dict[str, Expert | None]
) -> Iterator[None]:
    """During the block, row i of the batch runs with ``experts[tasks[i]]``.

    Any order works; rows of one task that sit together cost one update per layer.
    """
    start = 0
    rows.segments = []
    rows.rows = len(tasks)
    for task, run in groupby(tasks):
        stop = start + len(list(run))
        rows.segments.append((experts.get(task), start, stop))
        start = stop
    try:
        yield
    finally:
        rows.segments = []
        rows.rows = 0
