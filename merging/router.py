"""The task router's model and file format (training: :mod:`router_training`; inference:
:mod:`freemerge.serving.router`).

Features are the attention-masked mean of the merged backbone's last hidden states (theta_m,
no expert applied); the router is a small MLP (d -> hidden -> N tasks). Saved as
``router.safetensors`` (weights) plus ``router.json`` (tasks, sizes, how it was trained).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import BatchEncoding, PreTrainedModel

ROUTER_WEIGHTS = "router.safetensors"
ROUTER_RECORD = "router.json"


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


def save_router(root: Path, router: TaskRouter, record: dict) -> None:
    """Weights and record (``record`` holds tasks, hidden, max_length and how it was fitted)."""
    weights = {k: v.contiguous() for k, v in router.state_dict().items()}
    save_file(weights, str(Path(root) / ROUTER_WEIGHTS))
    full = {"features": router.layers[0].in_features, "pooling": "mean", **record}
    (Path(root) / ROUTER_RECORD).write_text(json.dumps(full, indent=2))


def load_router(root: Path) -> tuple[TaskRouter, dict]:
    record = json.loads((Path(root) / ROUTER_RECORD).read_text())
    router = TaskRouter(record["features"], record["hidden"], len(record["tasks"]))
    router.load_state_dict(load_file(str(Path(root) / ROUTER_WEIGHTS)))
    return router.eval(), record
