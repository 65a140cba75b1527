"""Low-rank experts run beside the backbone's layers, LoRA-style, per row of a batch.

As in PEFT's LoRA layer, the adapter math wraps the base layer:
``result = base(x) + (x A_t^T) B_t^T`` for the rows whose task is t (PEFT's mixed-batch
forward), so one forward pass serves a batch that mixes tasks, and the base weights are never
written. An expert that also keeps vectors whole (``vectors: full``: biases and LayerNorms)
adds them the same way: a linear layer's bias delta to its rows' outputs, and a LayerNorm's
``normalized * dw + db`` (its normalized input times the weight delta, plus the bias delta).
Equal to applying the expert in place up to float rounding.

The layers hold no adapters: the experts of a pass come from the expert store and are handed
to every wrapped layer through :class:`RowTasks` for that pass only, with the rows they apply
to. The caller puts each task's rows next to each other, so a task's rows are a slice of the
batch: the update runs in place on a view, with no gather or scatter of rows, in the fused
CPU kernel where it runs, else as two narrow GEMMs (:mod:`freemerge.serving.lowrank_kernel`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import groupby

import torch

from freemerge.merging.experts import Expert, ExpertLayout
from freemerge.serving.lowrank_kernel import add_lowrank_, cpu_kernel, linear_lowrank


class RowTasks:
    """Which batch rows use which expert during one forward pass (shared by all layers):
    ``segments`` holds ``(expert or None, start, stop)`` for each run of rows of one task, and
    ``rows`` the pass's rows."""

    def __init__(self) -> None:
        self.segments: list[tuple[Expert | None, int, int]] = []
        self.rows = 0

    def slices(self, x: torch.Tensor, name: str) -> list[tuple[Expert | None, slice | None]]:
        """Each segment's expert and its rows of ``x`` flattened to (rows * tokens, width);
        ``None`` for all of them (one task: every row, and any input shared by the batch)."""
        segments = self.segments
        if len(segments) == 1:
            return [(segments[0][0], None)]
        if x.shape[0] != self.rows:
            raise RuntimeError(
                f"{name} ran on an input that is not one row per text of the pass "
                f"(shape {tuple(x.shape)}, {self.rows} texts): this model's layers cannot "
                "mix tasks in one pass"
            )
        per_row = x.reshape(-1, x.shape[-1]).shape[0] // x.shape[0]  # tokens per batch row
        return [(e, slice(start * per_row, stop * per_row)) for e, start, stop in segments]

    def experts(self, x: torch.Tensor, name: str) -> list[tuple[Expert, slice | None]]:
        """:meth:`slices` of the segments that have an expert (none outside a pass)."""
        if not self.segments:
            return []
        return [(expert, rows) for expert, rows in self.slices(x, name) if expert is not None]


def _rows(flat: torch.Tensor, rows: slice | None) -> torch.Tensor:
    """``flat``'s rows of one segment; all of it for ``None`` (a one-task pass: indexing a view
    cost a third of a short text's low-rank update, measured)."""
    return flat if rows is None else flat[rows]


class LowRankLinear(torch.nn.Module):
    """A linear layer plus, for each segment of rows, that segment's expert factors for this
    layer's weight (``weight_name``: the weight's name in the backbone) and its bias delta."""

    def __init__(self, base: torch.nn.Linear, weight_name: str, rows: RowTasks) -> None:
        super().__init__()
        self.base = base
        self.weight_name = weight_name
        self.bias_name = weight_name.removesuffix(".weight") + ".bias"
        self.rows = rows
        # the one-task path computes the layer itself: only for a plain Linear, without hooks.
        # It reads the base's parameters from this tuple (not registered: the same objects,
        # which the runtime writes in place), where a submodule's attribute costs ~2 us each
        self.plain = type(base) is torch.nn.Linear and not (
            base._forward_hooks or base._forward_pre_hooks
        )
        self.weight_and_bias = (base.weight, base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segments = self.rows.segments
        if len(segments) == 1 and segments[0][0] is not None and self.plain:
            return self._one_task(x, segments[0][0])
        result = self.base(x)
        flat_result = result.view(-1, result.shape[-1])
        flat_x = x.reshape(-1, x.shape[-1])
        for expert, rows in self.rows.experts(x, self.weight_name):
            pair = expert.factors.get(self.weight_name)
            if pair is not None:
                add_lowrank_(_rows(flat_result, rows), _rows(flat_x, rows), *pair)
            bias = expert.full.get(self.bias_name)
            if bias is not None:
                _rows(flat_result, rows).add_(bias)
        return result

    def _one_task(self, x: torch.Tensor, expert: Expert) -> torch.Tensor:
        """A pass of one task: the layer and its update computed here
        (:func:`linear_lowrank`: one call of the fused kernel on the CPU), not through the
        wrapped module: the same math in fewer Python steps (measured side by side on a
        batch-1 forward on one thread, BLAS: 0.8 to 2.1 points of the forward less than the
        general path at 17 and 98 tokens)."""
        weight, bias = self.weight_and_bias
        result = linear_lowrank(x, weight, bias, expert.factors.get(self.weight_name))
        delta = expert.full.get(self.bias_name)
        return result if delta is None else result.add_(delta)


class RowLayerNorm(torch.nn.Module):
    """A LayerNorm plus, for each segment of rows, that segment's expert deltas of its weight
    and bias: ``normalized(x) * (w + dw) + b + db`` is the base output plus
    ``normalized(x) * dw + db``."""

    def __init__(self, base: torch.nn.LayerNorm, name: str, rows: RowTasks) -> None:
        super().__init__()
        self.base = base
        self.name = name  # the module's name in the backbone
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        flat_result = result.view(-1, result.shape[-1])
        normalized = None
        for expert, rows in self.rows.experts(x, self.name):
            weight = expert.full.get(f"{self.name}.weight")
            bias = expert.full.get(f"{self.name}.bias")
            if weight is not None:
                if normalized is None:
                    shape, eps = self.base.normalized_shape, self.base.eps
                    flat_x = x.reshape(-1, x.shape[-1])
                    normalized = torch.nn.functional.layer_norm(flat_x, shape, None, None, eps)
                _rows(flat_result, rows).addcmul_(_rows(normalized, rows), weight)
            if bias is not None:
                _rows(flat_result, rows).add_(bias)
        return result


def row_adapter_weights(
    layouts: Iterable[ExpertLayout], backbone: torch.nn.Module
) -> set[str] | None:
    """The tensors to adapt per row when every expert is low-rank and touches only
    ``nn.Linear`` weights (factors) and biases and ``nn.LayerNorm`` weights and biases (whole
    vectors); None otherwise (the experts are applied in place)."""
    modules = dict(backbone.named_modules())
    names: set[str] = set()
    for layout in layouts:
        if layout.kind != "lowrank":
            return None
        if not all(_adaptable(name, modules, name in layout.matrices) for name in layout.names):
            return None
        names |= layout.names
    return names


def _adaptable(name: str, modules: dict[str, torch.nn.Module], factored: bool) -> bool:
    """Whether row adapters can apply an expert's tensor ``name``: a linear layer's weight as
    factors; a linear layer's bias or a LayerNorm's weight or bias whole."""
    owner, _, part = name.rpartition(".")
    module = modules.get(owner)
    module = getattr(module, "base", module)  # wrapped already
    if factored:
        return isinstance(module, torch.nn.Linear) and part == "weight"
    if isinstance(module, torch.nn.Linear):
        return part == "bias"
    return isinstance(module, torch.nn.LayerNorm) and part in ("weight", "bias")


def install_row_adapters(
    backbone: torch.nn.Module, names: Iterable[str], rows: RowTasks | None = None
) -> RowTasks:
    """Wrap the module owning each tensor in ``names`` in place (those not wrapped yet: a
    linear layer in :class:`LowRankLinear`, a LayerNorm in :class:`RowLayerNorm`); return the
    row map they share. On the CPU the fused kernel is built (or loaded) here, before any
    request."""
    rows = rows if rows is not None else RowTasks()
    if any(p.device.type == "cpu" for p in backbone.parameters()):
        cpu_kernel()
    for path in sorted({name.rpartition(".")[0] for name in names}):
        parent_path, _, child = path.rpartition(".")
        parent = backbone.get_submodule(parent_path) if parent_path else backbone
        layer = getattr(parent, child)
        if isinstance(layer, torch.nn.Linear):
            setattr(parent, child, LowRankLinear(layer, f"{path}.weight", rows))
        elif isinstance(layer, torch.nn.LayerNorm):
            setattr(parent, child, RowLayerNorm(layer, path, rows))
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
