"""Training the task router on the merged backbone (offline, during the merge).

Examples: a seeded draw of ``examples_per_task`` texts from each task's JSONL file (a zoo
task's ``texts.jsonl``, or a file the config names). Features: the merged backbone's
mean-pooled hidden states (:func:`freemerge.merging.router.mean_pooled`), through the one
tokenize-and-run loop. The MLP is fitted with AdamW.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from freemerge.merging.batching import run_texts
from freemerge.merging.router import TaskRouter, mean_pooled, save_router
from freemerge.merging.zoo_folder import read_texts


@dataclass(frozen=True)
class RouterConfig:
    """How the router is trained; ``data`` maps each task to a JSONL file of its texts."""

    examples_per_task: int = 500
    hidden: int = 256
    epochs: int = 40
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    max_length: int = 128
    seed: int = 0
    data: dict[str, str] | None = None


def fit_router(
    features: torch.Tensor, labels: torch.Tensor, tasks: int, config: RouterConfig
) -> TaskRouter:
    """Fit the MLP on (features, task index) pairs; deterministic for a given seed."""
    torch.manual_seed(config.seed)
    router = TaskRouter(features.shape[1], config.hidden, tasks)
    optimizer = torch.optim.AdamW(
        router.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(labels) / config.batch_size)
    router.train()
    for _ in range(config.epochs * steps_per_epoch):
        rows = torch.randint(len(labels), (config.batch_size,), generator=generator)
        loss = torch.nn.functional.cross_entropy(router(features[rows]), labels[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return router.eval()


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


@torch.no_grad()
def build_router(
    config: RouterConfig, task_names: list[str], backbone_dir: Path, out: Path
) -> dict:
    """Train the router on the merged backbone in ``backbone_dir`` and save it into ``out``."""
    backbone = AutoModel.from_pretrained(backbone_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    texts, labels = router_examples(config, task_names)
    features = run_texts(
        tokenizer,
        texts,
        config.max_length,
        backbone.device,
        lambda batch: mean_pooled(backbone, batch),
    )
    with torch.enable_grad():
        router = fit_router(features, labels, len(task_names), config)
    train_accuracy = float((router(features).argmax(-1) == labels).float().mean())
    metrics = {"examples": len(labels), "train_accuracy": train_accuracy}
    record = {
        "tasks": task_names,
        "hidden": config.hidden,
        "max_length": config.max_length,
        "config": asdict(config),
        "metrics": metrics,
    }
    save_router(out, router, record)
    return metrics
