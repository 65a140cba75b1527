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
(large overhead, few passes).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

PASS_OVERHEAD_TOKENS = {"cpu": 64, "cuda": 4096}


def pass_overhead(device: torch.device, tokens: int | None = None) -> int:
    """The fixed cost of one forward pass in tokens: ``tokens`` when given, else the
    device type's default (:data:`PASS_OVERHEAD_TOKENS`)."""
    if tokens is None:
        return PASS_OVERHEAD_TOKENS.get(device.type, PASS_OVERHEAD_TOKENS["cuda"])
    if tokens < 0:
        raise ValueError(f"pass overhead must be >= 0 tokens, got {tokens}")
    return tokens


def plan_passes(lengths: list[int], overhead: int, max_rows: int | None = None) -> list[list[int]]:
    """Row indices per pass, each pass in ascending length, minimising padded tokens plus
    ``overhead`` per pass (see the module docstring); at most ``max_rows`` rows a pass."""
    if overhead < 0:
        raise ValueError(f"pass overhead must be >= 0 tokens, got {overhead}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = np.array([lengths[i] for i in order], dtype=np.int64)
    n = len(order)
    cost = np.zeros(n + 1, dtype=np.int64)
    cut = np.zeros(n + 1, dtype=np.int64)  # the pass ending at row j starts at cut[j]
    for j in range(1, n + 1):
        first = 0 if max_rows is None else max(0, j - max_rows)
        starts = np.arange(first, j)
        # rows starts..j-1 in one pass, padded to sorted_lengths[j - 1]
        candidates = cost[first:j] + overhead + (j - starts) * sorted_lengths[j - 1]
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

    Texts longer than ``max_length`` tokens are truncated and flagged in ``truncated`` (a fast
    tokenizer keeps what truncation cut off in each encoding's ``overflowing``).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
    ) -> None:
        self.tokenizer = tokenizer
        self.encoding = tokenizer(texts, truncation=True, max_length=max_length)
        self.truncated = [bool(encoding.overflowing) for encoding in self.encoding.encodings]
        self.lengths = [len(ids) for ids in self.encoding["input_ids"]]

    def padded(self, rows: list[int], device: torch.device) -> BatchEncoding:
        subset = {key: [values[i] for i in rows] for key, values in self.encoding.items()}
        return self.tokenizer.pad(subset, return_tensors="pt").to(device)


Forward = Callable[[list[int], BatchEncoding], torch.Tensor]


def forward_in_passes(
    tokens: Tokenized, passes: list[list[int]], device: torch.device, forward: Forward
) -> torch.Tensor:
    """``forward(rows, batch)`` once per pass; the rows' outputs gathered in text order
    (on the CPU). Every row must be in exactly one pass."""
    out: torch.Tensor | None = None
    for rows in passes:
        result = forward(rows, tokens.padded(rows, device)).float().cpu()
        if out is None:
            out = result.new_zeros((len(tokens.lengths), *result.shape[1:]))
        out[torch.tensor(rows, dtype=torch.long)] = result
    if out is None:
        raise ValueError("no texts to run")
    return out


def run_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    device: torch.device,
    forward: Callable[[BatchEncoding], torch.Tensor],
    max_rows: int = 64,
) -> torch.Tensor:
    """``forward(batch)`` over all ``texts`` in length-cut passes of at most ``max_rows``
    rows (the device's default pass overhead); outputs in text order, on the CPU."""
    tokens = Tokenized(tokenizer, texts, max_length)
    passes = plan_passes(tokens.lengths, pass_overhead(device), max_rows)
    return forward_in_passes(tokens, passes, device, lambda _rows, batch: forward(batch))
