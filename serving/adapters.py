"""Low-rank experts run beside the backbone's linear layers, LoRA-style, per row of a batch.

As in PEFT's LoRA layer, the adapter math wraps the base layer:
``result = base(x) + (x A_t^T) B_t^T`` for the rows whose task is t (PEFT's mixed-batch
forward), so one forward pass serves a batch that mixes tasks, and the base weights are never
written. Equal to applying theta_m + B_t A_t in place up to float rounding.

The caller puts each task's rows next to each other, so a task's rows are a slice of the batch:
the update is two small matmuls on a view and one in-place ``addmm_``, with no gather or
scatter of rows. The adapters are transposed *views* of the expert's factors on the device (on
the CPU, the host expert's own tensors), so they add no copy of their own there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from itertools import groupby

import torch

from freemerge.merging.experts import Expert, LowRankExpert


class RowTasks:
    """Which batch rows belong to which task during one forward pass (shared by all layers):
    ``segments`` holds ``(task, start, stop)`` for each run of consecutive rows of one task.
    """

    def __init__(self) -> None:
        self.segments: list[tuple[str, int, int]] = []


class LowRankLinear(torch.nn.Module):
    """A linear layer plus one adapter per task, applied to that task's rows only; the
    adapters are kept as ``(A^T, B^T)`` views (BLAS reads a transposed operand in place).
    """

    def __init__(self, base: torch.nn.Linear, rows: RowTasks) -> None:
        super().__init__()
        self.base = base
        self.rows = rows
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        flat_result = result.view(-1, result.shape[-1])
        flat_x = x.reshape(-1, x.shape[-1])
        per_row = flat_x.shape[0] // x.shape[0]  # tokens per batch row
        for task, start, stop in self.rows.segments:
            if task in self.adapters:
                a_t, b_t = self.adapters[task]
                rows = slice(start * per_row, stop * per_row)
                flat_result[rows].addmm_(flat_x[rows] @ a_t, b_t)
        return result


def supports_row_adapters(experts: dict[str, Expert | None], backbone: torch.nn.Module) -> bool:
    """True when every expert is low-rank and touches only ``nn.Linear`` weights."""
    modules = dict(backbone.named_modules())
    for expert in experts.values():
        if not isinstance(expert, LowRankExpert) or expert.full:
            return False
        for name in expert.factors:
            module = modules.get(name.removesuffix(".weight"))
            if not name.endswith(".weight") or not isinstance(module, torch.nn.Linear):
                return False
    return True


def install_row_adapters(
    backbone: torch.nn.Module, experts: dict[str, LowRankExpert], device: torch.device
) -> RowTasks:
    """Wrap each adapted linear layer of ``backbone`` in place; return the shared row map."""
    rows = RowTasks()
    wrapped: dict[str, LowRankLinear] = {}
    for task, expert in experts.items():
        for name, (b, a) in expert.factors.items():
            path = name.removesuffix(".weight")
            if path not in wrapped:
                parent_path, _, child = path.rpartition(".")
                parent = backbone.get_submodule(parent_path) if parent_path else backbone
                wrapped[path] = LowRankLinear(getattr(parent, child), rows)
                setattr(parent, child, wrapped[path])
            wrapped[path].adapters[task] = (a.to(device).T, b.to(device).T)
    return rows


def adapter_tensors(backbone: torch.nn.Module) -> list[torch.Tensor]:
    """Every adapter factor installed in ``backbone`` (for counting the bytes held)."""
    return [
        factor
        for module in backbone.modules()
        if isinstance(module, LowRankLinear)
        for pair in module.adapters.values()
        for factor in pair
    ]


@contextmanager
def rows_assigned(rows: RowTasks, tasks: list[str]) -> Iterator[None]:
    """During the block, row i of the batch runs with task ``tasks[i]``'s adapters.

    Any order works; rows of one task that sit together cost one update per layer.
    """
    start = 0
    rows.segments = []
    for task, run in groupby(tasks):
        stop = start + len(list(run))
        rows.segments.append((task, start, stop))
        start = stop
    try:
        yield
    finally:
        rows.segments = []
