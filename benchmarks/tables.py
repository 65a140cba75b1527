"""Markdown tables for the benches' reports, and the figures written in their cells."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# The alignment row's cell per column: None (the renderer's default), or a side.
ALIGNMENTS = {None: "---", "left": ":---", "center": ":---:", "right": "---:"}


def markdown_table(
    header: Sequence[object],
    rows: Iterable[Sequence[object]],
    align: Sequence[str | None] | None = None,
) -> list[str]:
    """The lines of a markdown table: the header, the alignment row (``align``: one of
    :data:`ALIGNMENTS`' keys per column), then a line per row. Cells are written with
    ``str``; a ``|`` in a cell is escaped; an empty cell is written ``| |``."""
    align = [None] * len(header) if align is None else list(align)
    if len(align) != len(header):
        raise ValueError(f"{len(align)} alignments for {len(header)} columns")
    lines = [_line(header), "|" + "|".join(ALIGNMENTS[side] for side in align) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row of {len(row)} cells in a table of {len(header)} columns")
        lines.append(_line(row))
    return lines


def _line(cells: Sequence[object]) -> str:
    texts = [str(cell).replace("|", "\\|") for cell in cells]
    return "|" + "|".join(f" {text} " if text else " " for text in texts) + "|"


def median_and_range(spread: dict, spec: str, unit: str = "") -> str:
    """A spread's median and range, e.g. ``1.05x (0.98..1.10)`` (``unit`` after the median)."""
    low, high = format(spread["min"], spec), format(spread["max"], spec)
    return f"{spread['median']:{spec}}{unit} ({low}..{high})"


def with_unit(value: float | None, unit: str) -> str:
    """``value`` as a report writes it: "%" a share in percent, "x" a ratio, else a figure
    followed by ``unit``; "-" for None."""
    if value is None:
        return "-"
    if unit == "%":
        return f"{100 * value:.1f}%"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.2f} {unit}"
