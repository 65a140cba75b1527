"""The task router: its kinds, features, model and file format (fitting:
:mod:`router_training`; inference: :mod:`freemerge.serving.router`).

A router kind is a ``+``-joined set of feature parts (``ngrams``, ``layers+ngrams``, ...):

- ``ngrams``: hashed character n-grams (2 to 5 bytes of the lower-cased text) and word
  unigrams and bigrams, their embeddings averaged (fastText-style). Needs no backbone forward.
- ``embeddings``: the attention-masked mean of the backbone's input (word-piece) embeddings of
  the text's tokens. A table lookup: no transformer layer runs.
- ``layers``: the attention-masked mean of the hidden states of every layer of the merged
  backbone (the embeddings and each transformer layer), no expert applied. One bare forward.
- ``experts``: built from the experts themselves (as in MASS, arXiv 2504.05342): for every
  linear layer that has low-rank experts and every task t, the share of the layer input's
  energy that lies in task t's expert input subspace, ``||A_t x||^2 / ||x||^2`` (the rows of
  A_t are orthonormal right singular vectors), averaged over tokens. One bare forward.

The parts' features are concatenated (the dense ones standardised) into a head, linear or an
MLP with ``hidden`` units, whose logits are divided by a temperature fitted on held-out texts,
so the probabilities are calibrated. Saved as ``router.safetensors`` (weights) plus
``router.json`` (kind, tasks, feature settings, temperature, how it was fitted); the n-gram
embeddings are stored in 16-bit floats.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from freemerge.merging.batching import PassPlan, Tokenized, forward_in_passes
from freemerge.merging.families import token_limit
from freemerge.merging.router_config import FORWARD_PARTS, parse_kind

ROUTER_WEIGHTS = "router.safetensors"
ROUTER_RECORD = "router.json"
ROUTER_FORMAT = 2
CHAR_ORDERS = (2, 3, 4, 5)
_WORD = re.compile(r"\w+")
_PRIME = np.uint64(0x100000001B3)  # FNV-1a's


class RouterFormatError(ValueError):
    """A router file this code cannot read (another format, or a kind it does not know)."""


def _mixed(hashes: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (splitmix64's), so bucket indices use every bit of the hash."""
    with np.errstate(over="ignore"):
        hashes = (hashes ^ (hashes >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        hashes = (hashes ^ (hashes >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return hashes ^ (hashes >> np.uint64(31))


def text_hashes(text: str) -> np.ndarray:
    """64-bit hashes of the text's character n-grams (bytes of the lower-cased UTF-8 text,
    spaces added at both ends) and word unigrams and bigrams; stable across processes."""
    data = np.frombuffer(f" {text.lower()} ".encode("utf-8", "replace"), dtype=np.uint8)
    data = data.astype(np.uint64)
    parts = []
    with np.errstate(over="ignore"):
        for n in CHAR_ORDERS:
            if len(data) >= n:
                hashes = np.full(len(data) - n + 1, np.uint64(0xCBF29CE484222325 + n))
                for k in range(n):
                    hashes = (hashes ^ data[k : len(data) - n + 1 + k]) * _PRIME
                parts.append(hashes)
        words = _WORD.findall(text.lower())
        words = [zlib.crc32(word.encode("utf-8", "replace")) for word in words]
        unigrams = np.array(words, dtype=np.uint64) + np.uint64(1 << 40)
        parts += [unigrams, unigrams[:-1] * np.uint64(0x9E3779B97F4A7C15) + unigrams[1:]]
    return _mixed(np.concatenate(parts)) if parts else np.zeros(1, dtype=np.uint64)


def ngram_ids(texts: list[str], buckets: int) -> list[torch.Tensor]:
    """Each text's n-gram bucket indices (:func:`text_hashes` modulo ``buckets``)."""
    return [
        torch.from_numpy((text_hashes(text) % np.uint64(buckets)).astype(np.int64))
        for text in texts
    ]


@dataclass
class RouterInputs:
    """What a router reads for a list of texts: n-gram ids per text and dense features (rows)."""

    ids: list[torch.Tensor] | None = None
    dense: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids) if self.ids is not None else len(self.dense)

    def rows(self, rows: list[int]) -> RouterInputs:
        return RouterInputs(
            [self.ids[i] for i in rows] if self.ids is not None else None,
            self.dense[rows] if self.dense is not None else None,
        )


class TaskRouter(torch.nn.Module):
    """Features to task logits: averaged n-gram embeddings and standardised dense features,
    concatenated into a linear or MLP head; :meth:`forward` divides by the temperature."""

    def __init__(self, tasks: int, dense: int, buckets: int, ngram_dim: int, hidden: int):
        super().__init__()
        self.bag = (
            torch.nn.EmbeddingBag(buckets, ngram_dim, mode="mean", sparse=True)
            if ngram_dim
            else None
        )
        if self.bag is not None:
            torch.nn.init.normal_(self.bag.weight, std=0.01)
        self.register_buffer("dense_mean", torch.zeros(dense))
        self.register_buffer("dense_scale", torch.ones(dense))
        width = ngram_dim + dense
        self.head = (
            torch.nn.Sequential(
                torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, tasks)
            )
            if hidden
            else torch.nn.Linear(width, tasks)
        )
        self.register_buffer("temperature", torch.ones(()))

    def logits(self, inputs: RouterInputs) -> torch.Tensor:
        """Uncalibrated logits (before the temperature)."""
        features = []
        if self.bag is not None:
            ids = [i if len(i) else torch.zeros(1, dtype=torch.long) for i in inputs.ids]
            offsets = torch.tensor([0, *np.cumsum([len(i) for i in ids])[:-1].tolist()])
            device = self.bag.weight.device
            features.append(self.bag(torch.cat(ids).to(device), offsets.to(device)))
        if inputs.dense is not None and len(self.dense_mean):
            dense = inputs.dense.to(self.dense_mean.device)
            features.append((dense - self.dense_mean) / self.dense_scale)
        return self.head(torch.cat(features, dim=1))

    def forward(self, inputs: RouterInputs) -> torch.Tensor:
        return self.logits(inputs) / self.temperature


@dataclass
class ExpertSubspaces:
    """The experts' input subspaces: per linear layer (module path), every task's A factor
    stacked in task order, (tasks x rank, in)."""

    tasks: int
    factors: dict[str, torch.Tensor]


def expert_subspaces(experts: dict, tasks: list[str], per_token: Iterable[str]) -> ExpertSubspaces:
    """The subspaces of the linear layers that every task's low-rank expert adapts and that
    run per token (``per_token``: the layer matrices; a pooler runs once per text); ValueError
    unless every task has a low-rank expert."""
    missing = [t for t in tasks if not hasattr(experts.get(t), "factors")]
    if missing:
        raise ValueError(
            f"the `experts` router part needs a low-rank expert for every task; {missing[0]!r} "
            "has none"
        )
    factors = [experts[task].factors for task in tasks]
    # in name order: the features' columns must line up between fitting and serving
    layers = set(per_token)
    shared = sorted(n for n in factors[0] if all(n in f for f in factors) and n in layers)
    stacked = {
        name.removesuffix(".weight"): torch.cat([f[name][1] for f in factors]).float()
        for name in shared
    }
    return ExpertSubspaces(len(tasks), stacked)


@contextmanager
def captured_inputs(backbone: torch.nn.Module, paths: list[str]) -> Iterator[dict]:
    """Inside the block, a forward of ``backbone`` stores each module's input under its path
    (its first call's: a layer may run again on other inputs, such as position embeddings)."""
    captured: dict[str, torch.Tensor] = {}

    def hook(path: str):
        def keep_first(_module: torch.nn.Module, args: tuple, _output: object) -> None:
            captured.setdefault(path, args[0])  # returns None: the output stays the module's

        return keep_first

    handles = [backbone.get_submodule(p).register_forward_hook(hook(p)) for p in paths]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1)


def forward_features(
    backbone: PreTrainedModel,
    batch: BatchEncoding,
    parts: tuple[str, ...],
    subspaces: ExpertSubspaces | None = None,
) -> torch.Tensor:
    """The ``layers`` and ``experts`` parts' features of one pass of the bare backbone, one row
    per text."""
    mask = batch["attention_mask"].unsqueeze(-1).float()
    paths = list(subspaces.factors) if subspaces is not None and "experts" in parts else []
    with captured_inputs(backbone, paths) as captured:
        out = backbone(**batch, output_hidden_states="layers" in parts)
    features = []
    if "layers" in parts:
        features += [_masked_mean(h.float(), mask) for h in out.hidden_states]
    for path in paths:
        x = captured[path].float()
        a = subspaces.factors[path].to(x.device)
        energy = (x @ a.T).pow(2).unflatten(-1, (subspaces.tasks, -1)).sum(-1)
        share = energy / x.pow(2).sum(-1, keepdim=True).clamp(min=1e-12)
        features.append(_masked_mean(share, mask))
    return torch.cat(features, dim=1)


def embedding_means(backbone: PreTrainedModel, tokens: Tokenized) -> torch.Tensor:
    """The ``embeddings`` part: per text, the mean of the input embeddings of its tokens
    (special tokens included), one ``embedding_bag`` over the unpadded ids."""
    ids = tokens.encoding["input_ids"]
    weight = backbone.get_input_embeddings().weight
    flat = torch.tensor([i for row in ids for i in row], device=weight.device)
    offsets = torch.tensor([0, *np.cumsum([len(row) for row in ids])[:-1].tolist()])
    means = torch.nn.functional.embedding_bag(flat, weight, offsets.to(weight.device), mode="mean")
    return means.float().cpu()


@torch.no_grad()
def dense_inputs(
    parts: tuple[str, ...],
    texts: list[str],
    backbone: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    plan: PassPlan,
    subspaces: ExpertSubspaces | None = None,
) -> torch.Tensor | None:
    """The dense parts' features of ``texts`` (``embeddings``, then ``layers`` and
    ``experts`` from one bare forward in the passes ``plan`` cuts), on the CPU; None for a kind
    without dense parts. The texts are tokenized once for both, to at most ``max_length``
    tokens and the backbone's own limit."""
    forward = any(part in FORWARD_PARTS for part in parts)
    if "embeddings" not in parts and not forward:
        return None
    limit = min(max_length, token_limit(tokenizer, backbone.config))
    tokens = Tokenized(tokenizer, texts, limit)
    features = [embedding_means(backbone, tokens)] if "embeddings" in parts else []
    if forward:
        device = backbone.device
        features.append(
            forward_in_passes(
                tokens,
                plan.passes(tokens.lengths),
                device,
                lambda _rows, batch: forward_features(backbone, batch, parts, subspaces),
            )
        )
    return torch.cat(features, dim=1)


def save_router(root: Path, router: TaskRouter, record: dict) -> None:
    """Weights and record (``record`` holds kind, tasks, sizes and how it was fitted)."""
    weights = {k: v.contiguous() for k, v in router.state_dict().items()}
    if "bag.weight" in weights:  # half the bytes; loaded back into float32
        weights["bag.weight"] = weights["bag.weight"].to(torch.float16)
    save_file(weights, str(Path(root) / ROUTER_WEIGHTS))
    full = {"format": ROUTER_FORMAT, **record, "temperature": float(router.temperature)}
    (Path(root) / ROUTER_RECORD).write_text(json.dumps(full, indent=2))


def load_router(root: Path) -> tuple[TaskRouter, dict]:
    """The router saved in ``root`` and its record; RouterFormatError for another format."""
    record = json.loads((Path(root) / ROUTER_RECORD).read_text())
    if record.get("format") != ROUTER_FORMAT:
        raise RouterFormatError(
            f"{Path(root) / ROUTER_RECORD}: router format {record.get('format', 1)}, this "
            f"freemerge reads format {ROUTER_FORMAT}; refit it with `freemerge router fit "
            f"{Path(root)}`"
        )
    parse_kind(record["kind"])
    router = TaskRouter(
        len(record["tasks"]),
        record["dense_features"],
        record["buckets"],
        record["ngram_dim"],
        record["hidden"],
    )
    router.load_state_dict(load_file(str(Path(root) / ROUTER_WEIGHTS)))
    return router.eval(), record
