"""Fitting the task router (offline: during the merge, or ``freemerge router fit``).

Examples: a seeded draw of ``examples_per_task`` texts from each task's JSONL file (a zoo
task's ``texts.jsonl``, or a file the config names). The kind's features
(:mod:`freemerge.merging.router`) are computed once; the dense ones through the one
tokenize-and-run loop on the bare merged backbone. Calibration: the router is first fitted on
all but a held-out share of each task's texts, and a temperature fitted on that share
(minimising its negative log-likelihood); then the router is fitted again on every text and
keeps that temperature.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from freemerge.merging.batching import PassPlan
from freemerge.merging.experts import load_expert
from freemerge.merging.families import layer_matrices, load_backbone, load_tokenizer
from freemerge.merging.router import (
    ExpertSubspaces,
    RouterInputs,
    TaskRouter,
    dense_inputs,
    expert_subspaces,
    ngram_ids,
    save_router,
)
from freemerge.merging.router_config import DENSE_PARTS, RouterConfig, parse_kind
from freemerge.merging.zoo_folder import read_texts


@dataclass
class RouterBackbone:
    """What the dense parts read: the bare merged backbone, its tokenizer, and the experts'
    subspaces (for the ``experts`` part)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    subspaces: ExpertSubspaces | None


def open_router_backbone(root: Path, tasks: dict[str, dict], subspaces: bool) -> RouterBackbone:
    """The artifact's backbone under ``root/backbone`` and, with ``subspaces``, the experts'
    (``tasks``: the manifest's entries; each task needs a low-rank expert)."""
    backbone = load_backbone(root / "backbone")
    tokenizer = load_tokenizer(root / "backbone", backbone)
    found = None
    if subspaces:
        experts = {t: e.get("expert") and load_expert(root / e["expert"]) for t, e in tasks.items()}
        found = expert_subspaces(experts, list(tasks), layer_matrices(backbone))
    return RouterBackbone(backbone, tokenizer, found)


def router_inputs(
    kind: str, texts: list[str], buckets: int, max_length: int, backbone: RouterBackbone | None
) -> RouterInputs:
    """The kind's features for ``texts``."""
    parts = parse_kind(kind)
    dense = None
    if any(part in DENSE_PARTS for part in parts):
        if backbone is None or ("experts" in parts and backbone.subspaces is None):
            raise ValueError(f"router kind {kind!r} needs the backbone (and experts)")
        model = backbone.model
        plan = PassPlan.for_device(model.device)
        dense = dense_inputs(
            parts, texts, model, backbone.tokenizer, max_length, plan, backbone.subspaces
        )
    return RouterInputs(ngram_ids(texts, buckets) if "ngrams" in parts else None, dense)


def fit_router(
    inputs: RouterInputs, labels: torch.Tensor, tasks: int, config: RouterConfig
) -> TaskRouter:
    """Fit the router on (inputs, task index) pairs; deterministic for a given seed."""
    torch.manual_seed(config.seed)
    ngram_dim = config.ngram_dim if inputs.ids is not None else 0
    dense = inputs.dense.shape[1] if inputs.dense is not None else 0
    router = TaskRouter(tasks, dense, config.buckets, ngram_dim, config.hidden)
    if dense:
        router.dense_mean.copy_(inputs.dense.mean(0))
        router.dense_scale.copy_(inputs.dense.std(0).clamp(min=1e-6))
    sparse = [router.bag.weight] if router.bag is not None else []
    rest = [p for p in router.parameters() if all(p is not s for s in sparse)]
    optimizers = [
        torch.optim.AdamW(rest, lr=config.learning_rate, weight_decay=config.weight_decay)
    ] + ([torch.optim.SparseAdam(sparse, lr=config.learning_rate)] if sparse else [])
    generator = torch.Generator().manual_seed(config.seed)
    router.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(labels), generator=generator).tolist()
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            loss = torch.nn.functional.cross_entropy(router.logits(inputs.rows(rows)), labels[rows])
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
    return router.eval()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T)."""
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def expected_calibration_error(
    probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 15
) -> float:
    """ECE: over equal-width bins of the top probability, the mean |accuracy - confidence|,
    weighted by the share of texts in each bin."""
    confidence, chosen = probabilities.max(-1)
    right = (chosen == labels).float()
    which = torch.clamp((confidence * bins).long(), max=bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            gap = (right[members].mean() - confidence[members].mean()).abs()
            error += float(members.float().mean() * gap)
    return error


def sample_rows(count: int, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` of ``count`` row indices, a seeded random draw, sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(count)[:limit])


def router_examples(config: RouterConfig, task_names: list[str]) -> tuple[list[str], torch.Tensor]:
    """Texts and task indices: a seeded draw of ``examples_per_task`` from each task's file."""
    texts: list[str] = []
    labels: list[int] = []
    for index, task in enumerate(task_names):
        pool = read_texts(Path((config.data or {})[task]))
        rows = sample_rows(len(pool), config.examples_per_task, config.seed)
        texts += [pool[i] for i in rows]
        labels += [index] * len(rows)
    return texts, torch.tensor(labels)


def held_out_rows(labels: torch.Tensor, share: float, seed: int) -> tuple[list[int], list[int]]:
    """Rows to fit on and rows held out: ``share`` of each task's rows, a seeded draw."""
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for task in labels.unique().tolist():
        members = rng.permutation(np.flatnonzero(labels.numpy() == task))
        held += members[: max(1, math.floor(share * len(members)))].tolist()
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held)


def fit_calibrated(
    inputs: RouterInputs, labels: torch.Tensor, tasks: int, config: RouterConfig
) -> tuple[TaskRouter, dict]:
    """Fit on all but the held-out share, fit the temperature on that share, then fit again
    on every text and keep the temperature; with the held-out figures."""
    fit_rows, held = held_out_rows(labels, config.calibration_share, config.seed)
    first = fit_router(inputs.rows(fit_rows), labels[fit_rows], tasks, config)
    with torch.no_grad():
        logits = first.logits(inputs.rows(held))
    temperature = fit_temperature(logits, labels[held])
    router = fit_router(inputs, labels, tasks, config)
    router.temperature.fill_(temperature)
    probabilities = torch.softmax(logits / temperature, -1)
    metrics = {
        "examples": len(labels),
        "held_out": len(held),
        "held_out_accuracy": float((logits.argmax(-1) == labels[held]).float().mean()),
        "held_out_ece_before": expected_calibration_error(torch.softmax(logits, -1), labels[held]),
        "held_out_ece": expected_calibration_error(probabilities, labels[held]),
    }
    return router, metrics


def build_router(config: RouterConfig, root: Path, tasks: dict[str, dict]) -> dict:
    """Fit the router of the artifact being written in ``root`` (``tasks``: its manifest's
    task entries, heads and experts already written) and save it there; its figures."""
    backbone = None
    if any(part in DENSE_PARTS for part in parse_kind(config.kind)):
        backbone = open_router_backbone(root, tasks, "experts" in parse_kind(config.kind))
    task_names = list(tasks)
    texts, labels = router_examples(config, task_names)
    inputs = router_inputs(config.kind, texts, config.buckets, config.max_length, backbone)
    router, metrics = fit_calibrated(inputs, labels, len(task_names), config)
    record = {
        "kind": "+".join(parse_kind(config.kind)),
        "tasks": task_names,
        "buckets": config.buckets,
        "ngram_dim": router.bag.embedding_dim if router.bag is not None else 0,
        "dense_features": len(router.dense_mean),
        "hidden": config.hidden,
        "max_length": config.max_length,
        "config": asdict(config),
        "metrics": metrics,
    }
    save_router(root, router, record)
    return metrics
