"""The one tokenize-and-run loop: texts tokenized once, cut into forward passes by length.

Every forward over texts goes through here: the runtime and the router in serving, the
router's features when it is trained, the zoo's evaluation and the separate-models baseline.
(It lives in merging, the lowest layer, because training the router needs it offline.)

A pass pads every row to its longest, so one pass over short and long texts together spends
most of its work on padding. :func:`plan_passes` sorts the rows by token length and cuts the
sorted list where that pays, minimising (dynamic programming over the cut points)

    sum over passes k of  overhead + rows_k * longest_k

where ``overhead`` is the fixed cost of one pass in token-equivalents. On a CPU a pass costs
little beyond its tokens (small overhead, many passes); on a GPU the fixed cost dominates
(large overhead, few passes). A token budget bounds every pass's padded tokens (rows times
the longest row), so the largest legal batch cannot exhaust memory: a pass's activations grow
with its tokens, its attention scores with tokens times length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

PASS_OVERHEAD_TOKENS = {"cpu": 64, "cuda": 4096}
# Padded tokens one pass holds at most, by device type. The CPU's value was measured against
# others (benchmarks/results/faults.md: throughput flat, memory growing with the budget); the
# GPU's is not measured yet.
MAX_PASS_TOKENS = {"cpu": 8192, "cuda": 65536}


@dataclass(frozen=True)
class PassPlan:
    """How a batch is cut into forward passes: ``overhead``, the fixed cost of one pass in
    tokens, and ``max_tokens``, the padded tokens one pass holds at most (None: no bound)."""

    overhead: int
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.overhead < 0:
            raise ValueError(f"pass overhead must be >= 0 tokens, got {self.overhead}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"the token budget must be >= 1 token, got {self.max_tokens}")

    @classmethod
    def for_device(
        cls, device: torch.device, overhead: int | None = None, max_tokens: int | None = None
    ) -> PassPlan:
        """The given values, each defaulting to the device type's (:data:`PASS_OVERHEAD_TOKENS`,
        :data:`MAX_PASS_TOKENS`)."""
        kind = device.type if device.type in PASS_OVERHEAD_TOKENS else "cuda"
        return cls(
            PASS_OVERHEAD_TOKENS[kind] if overhead is None else overhead,
            MAX_PASS_TOKENS[kind] if max_tokens is None else max_tokens,
        )

    def passes(self, lengths: list[int], max_rows: int | None = None) -> list[list[int]]:
        """:func:`plan_passes` with this plan's overhead and budget."""
        return plan_passes(lengths, self.overhead, max_rows, self.max_tokens)


def plan_passes(
    lengths: list[int],
    overhead: int,
    max_rows: int | None = None,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """Row indices per pass, each pass in ascending length, minimising padded tokens plus
    ``overhead`` per pass (see the module docstring); at most ``max_rows`` rows and
    ``max_tokens`` padded tokens a pass (a row longer than the budget runs alone)."""
    if overhead < 0:
        raise ValueError(f"pass overhead must be >= 0 tokens, got {overhead}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = np.array([lengths[i] for i in order], dtype=np.int64)
    n = len(order)
    cost = np.zeros(n + 1, dtype=np.int64)
    cut = np.zeros(n + 1, dtype=np.int64)  # the pass ending at row j starts at cut[j]
    for j in range(1, n + 1):
        longest = int(sorted_lengths[j - 1])
        rows = j if max_rows is None else max_rows
        if max_tokens is not None:
            rows = min(rows, max(1, max_tokens // max(1, longest)))
        first = max(0, j - rows)
        starts = np.arange(first, j)
        # rows starts..j-1 in one pass, padded to the longest of them
        candidates = cost[first:j] + overhead + (j - starts) * longest
        best = int(np.argmin(candidates))
        cut[j] = first + best
        cost[j] = candidates[best]
    passes = []
    stop = n
    while stop > 0:
        passes.append(order[cut[stop] : stop])
        stop = int(cut[stop])
    return passes[::-1]


class Tokenized:
    """Texts tokenized once, unpadded; :meth:`padded` pads any subset of rows into tensors.

    A row is a text or a pair of texts (tokenized as a pair: ``[CLS] a [SEP] b [SEP]``).
    Rows longer than their ``max_length`` (one for all, or one per row) tokens are truncated
    and flagged in ``truncated`` (a fast tokenizer keeps what truncation cut off in each
    encoding's ``overflowing``); each distinct limit is one tokenizer call.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        texts: Sequence[str | tuple[str, str]],
        max_length: int | list[int],
    ) -> None:
        self.tokenizer = tokenizer
        limits = [max_length] * len(texts) if isinstance(max_length, int) else max_length
        if len(set(limits)) <= 1:  # one limit (the usual case): one call, nothing stitched
            limit = limits[0] if limits else None
            self.encoding = tokenizer(list(texts), truncation=True, max_length=limit)
            self._flag(self.encoding.encodings)
            return
        columns: dict[str, list] = {}
        encodings: list = [None] * len(texts)
        for limit in dict.fromkeys(limits):
            rows = [i for i, row_limit in enumerate(limits) if row_limit == limit]
            found = tokenizer([texts[i] for i in rows], truncation=True, max_length=limit)
            for key, values in found.items():
                column = columns.setdefault(key, [None] * len(texts))
                for row, value in zip(rows, values, strict=True):
                    column[row] = value
            for row, encoding in zip(rows, found.encodings, strict=True):
                encodings[row] = encoding
        self.encoding = BatchEncoding(columns, encoding=encodings)
        self._flag(encodings)

    def _flag(self, encodings: list) -> None:
        """Each row's truncation flag and token length, from its encoding."""
        self.truncated = [bool(encoding.overflowing) for encoding in encodings]
        self.lengths = [len(encoding.ids) for encoding in encodings]

    def padded(self, rows: list[int], device: torch.device) -> BatchEncoding:
        subset = {key: [values[i] for i in rows] for key, values in self.encoding.items()}
        return self.tokenizer.pad(subset, return_tensors="pt").to(device)


Forward = Callable[[list[int], BatchEncoding], torch.Tensor]
RowsForward = Callable[[list[int], BatchEncoding], Sequence[object]]


def outputs_in_passes(
    tokens: Tokenized, passes: list[list[int]], device: torch.device, forward: RowsForward
) -> list:
    """``forward(rows, batch)`` once per pass, giving one output per row of the pass; the
    outputs in text order. Every row must be in exactly one pass."""
    out: list = [None] * len(tokens.lengths)
    for rows in passes:
        for row, value in zip(rows, forward(rows, tokens.padded(rows, device)), strict=True):
            out[row] = value
    return out


def forward_in_passes(
    tokens: Tokenized, passes: list[list[int]], device: torch.device, forward: Forward
) -> torch.Tensor:
    """``forward(rows, batch)`` (a tensor, a row per text) once per pass; the rows' outputs
    gathered in text order (on the CPU)."""
    if not passes:
        raise ValueError("no texts to run")
    rows = outputs_in_passes(
        tokens, passes, device, lambda r, batch: forward(r, batch).float().cpu()
    )
    return torch.stack(rows)


def run_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    device: torch.device,
    forward: Callable[[BatchEncoding], torch.Tensor],
    max_rows: int = 64,
) -> torch.Tensor:
    """``forward(batch)`` over all ``texts`` in length-cut passes of at most ``max_rows``
    rows (the device's default pass overhead and token budget); outputs in text order, on
    the CPU."""
    tokens = Tokenized(tokenizer, texts, max_length)
    passes = PassPlan.for_device(device).passes(tokens.lengths, max_rows)
    return forward_in_passes(tokens, passes, device, lambda _rows, batch: forward(batch))
