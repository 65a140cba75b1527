"""Accuracy of an artifact per task, through the same runtime the server uses."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from merging.datasets import SPLIT_FRACTIONS, load_task
from merging.finetune import length_sorted_batches
from merging.runtime import MergedClassifier, Prediction

SPLITS = ("test", "validation")  # what evaluation reports on; train is for fitting


def task_texts(
    task: str, split: str, cache_dir: Path | None = None
) -> tuple[list[str], np.ndarray]:
    """Texts and labels of one zoo task's fixed split."""
    if split not in SPLIT_FRACTIONS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLIT_FRACTIONS)}")
    data = load_task(task, cache_dir)
    return data.subset(data.split()[split])


def predict_task(
    model: MergedClassifier,
    task: str,
    texts: list[str],
    max_length: int = 128,
    batch_size: int = 64,
) -> np.ndarray:
    """Predicted label index per text with task ``task``'s expert and head."""
    predictions = np.zeros(len(texts), dtype=np.int64)
    for rows in length_sorted_batches(texts, batch_size):
        logits = model.logits(task, [texts[i] for i in rows], max_length=max_length)
        predictions[rows] = logits.argmax(-1).cpu().numpy()
    return predictions


def routed_predictions(
    model: MergedClassifier, texts: list[str], mixing: str = "argmax", batch_size: int = 64
) -> list[Prediction]:
    """Untagged answers (the router picks the task), in the order of ``texts``."""
    answers: list[Prediction | None] = [None] * len(texts)
    for rows in length_sorted_batches(texts, batch_size):
        for row, answer in zip(
            rows, model.classify([texts[i] for i in rows], mixing=mixing), strict=True
        ):
            answers[row] = answer
    return answers


@torch.no_grad()
def evaluate_artifact(
    model: MergedClassifier,
    split: str = "test",
    cache_dir: Path | None = None,
    max_length: int = 128,
    routed: bool = True,
    mixing: str = "argmax",
    show_progress: bool = True,
) -> dict:
    """Per task: accuracy with the true task, and (with a router) routed accuracy and routing
    accuracy; a routed answer counts as right only if both its task and its label are right.
    Also the mean over tasks and the router's time per text.
    """
    routed = routed and model.router is not None
    per_task: dict[str, dict[str, float]] = {}
    route_seconds = 0.0
    routed_texts = 0
    for task in tqdm(model.tasks, desc=f"evaluate ({split})", disable=not show_progress):
        texts, labels = task_texts(task, split, cache_dir)
        names = model.labels(task)
        scores = {
            "accuracy": float(np.mean(predict_task(model, task, texts, max_length) == labels))
        }
        if routed:
            start = time.perf_counter()
            answers = routed_predictions(model, texts, mixing)
            route_seconds += time.perf_counter() - start
            routed_texts += len(texts)
            scores["routing_accuracy"] = float(np.mean([a.task == task for a in answers]))
            scores["routed_accuracy"] = float(
                np.mean(
                    [
                        a.task == task and a.label == names[y]
                        for a, y in zip(answers, labels, strict=True)
                    ]
                )
            )
        per_task[task] = scores
    metrics = sorted({m for scores in per_task.values() for m in scores})
    mean = {m: float(np.mean([scores[m] for scores in per_task.values()])) for m in metrics}
    result = {"split": split, "tasks": per_task, "mean": mean, "artifact": model.artifact.version}
    if routed:
        result["routed_seconds_per_text"] = route_seconds / routed_texts
        result["mixing"] = mixing
    return result
