"""Low-rank experts run beside the backbone's linear layers, LoRA-style, per row of a batch.

As in PEFT's LoRA layer, the adapter math wraps the base layer:
``result = base(x) + (x A_t^T) B_t^T`` for the rows whose task is t (PEFT's mixed-batch
forward), so one forward pass serves a batch that mixes tasks, and the base weights are never
written. Equal to applying theta_m + B_t A_t in place up to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from merging.experts import Expert, LowRankExpert


class RowTasks:
    """Which batch rows belong to which task during one forward pass (shared by all layers)."""

    def __init__(self) -> None:
        self.groups: list[tuple[str, torch.Tensor]] = []


class LowRankLinear(torch.nn.Module):
    """A linear layer plus one (B, A) adapter per task, applied to that task's rows only."""

    def __init__(self, base: torch.nn.Linear, rows: RowTasks) -> None:
        super().__init__()
        self.base = base
        self.rows = rows
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        for task, rows in self.rows.groups:
            if task in self.adapters:
                b, a = self.adapters[task]
                result.index_add_(0, rows, (x.index_select(0, rows) @ a.T) @ b.T)
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
            wrapped[path].adapters[task] = (b.to(device), a.to(device))
    return rows


@contextmanager
def rows_assigned(rows: RowTasks, tasks: list[str], device: torch.device) -> Iterator[None]:
    """During the block, row i of the batch runs with task ``tasks[i]``'s adapters."""
    rows.groups = [
        (task, torch.tensor([i for i, t in enumerate(tasks) if t == task], device=device))
        for task in dict.fromkeys(tasks)
    ]
    try:
        yield
    finally:
        rows.groups = []
