"""The task router: picks the task of an untagged input from the merged backbone's features.

Features are the attention-masked mean of the merged backbone's last hidden states (theta_m,
no expert applied); the router is a small MLP (d -> hidden -> N tasks) trained with AdamW on a
few hundred labelled examples per task. Saved as ``router.safetensors`` plus ``router.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoTokenizer,
    BatchEncoding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from merging.datasets import load_task
from merging.finetune import length_sorted_batches


@dataclass(frozen=True)
class RouterConfig:
    """How the router is trained; ``data`` maps task -> ``zoo`` or a JSONL file of texts."""

    examples_per_task: int = 500
    hidden: int = 256
    epochs: int = 40
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    max_length: int = 128
    seed: int = 0
    data: dict[str, str] | None = None


class TaskRouter(torch.nn.Module):
    """MLP from pooled backbone features to task logits."""

    def __init__(self, features: int, hidden: int, tasks: int) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(features, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, tasks)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def mean_pooled(backbone: PreTrainedModel, batch: BatchEncoding) -> torch.Tensor:
    """Attention-masked mean of the last hidden states: sum_i m_i h_i / sum_i m_i."""
    hidden = backbone(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def train_router(
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


def save_router(
    root: Path,
    router: TaskRouter,
    task_names: list[str],
    config: RouterConfig,
    metrics: dict[str, float],
) -> None:
    save_file(
        {k: v.contiguous() for k, v in router.state_dict().items()},
        str(root / "router.safetensors"),
    )
    record = {
        "tasks": task_names,
        "features": router.layers[0].in_features,
        "hidden": config.hidden,
        "pooling": "mean",
        "max_length": config.max_length,
        "config": asdict(config),
        "metrics": metrics,
    }
    (root / "router.json").write_text(json.dumps(record, indent=2))


def load_router(root: Path) -> tuple[TaskRouter, dict]:
    record = json.loads((root / "router.json").read_text())
    router = TaskRouter(record["features"], record["hidden"], len(record["tasks"]))
    router.load_state_dict(load_file(str(root / "router.safetensors")))
    return router.eval(), record


def sample_rows(count: int, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` of ``count`` row indices, a seeded random draw, sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(count)[:limit])


def router_examples(config: RouterConfig, task_names: list[str]) -> tuple[list[str], torch.Tensor]:
    """Texts and task indices: a seeded draw of ``examples_per_task`` from each task's source."""
    texts: list[str] = []
    labels: list[int] = []
    for index, task in enumerate(task_names):
        source = (config.data or {}).get(task, "zoo")
        if source == "zoo":
            data = load_task(task)
            pool = data.subset(data.split()["train"])[0]
        else:
            lines = Path(source).read_text().splitlines()
            pool = [json.loads(line)["text"] for line in lines if line.strip()]
        rows = sample_rows(len(pool), config.examples_per_task, config.seed)
        texts += [pool[i] for i in rows]
        labels += [index] * len(rows)
    return texts, torch.tensor(labels)


@torch.no_grad()
def pooled_features(
    backbone: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """Mean-pooled merged-backbone features of ``texts``, in their order."""
    out = torch.zeros(len(texts), backbone.config.hidden_size)
    for rows in length_sorted_batches(texts, batch_size):
        batch = tokenizer(
            [texts[i] for i in rows],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        ).to(backbone.device)
        out[torch.from_numpy(rows)] = mean_pooled(backbone, batch).float().cpu()
    return out


def build_router(
    config: RouterConfig, task_names: list[str], backbone_dir: Path, out: Path
) -> dict:
    """Train the router on the merged backbone in ``backbone_dir`` and save it into ``out``."""
    backbone = AutoModel.from_pretrained(backbone_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    texts, labels = router_examples(config, task_names)
    features = pooled_features(backbone, tokenizer, texts, config.max_length)
    router = train_router(features, labels, len(task_names), config)
    with torch.no_grad():
        train_accuracy = float((router(features).argmax(-1) == labels).float().mean())
    metrics = {"examples": len(labels), "train_accuracy": train_accuracy}
    save_router(out, router, task_names, config, metrics)
    return metrics
