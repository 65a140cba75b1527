"""Accuracy of an artifact per task, through the same runtime the server uses."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from freemerge.benchmarks.datasets import SPLIT_FRACTIONS, load_task
from freemerge.benchmarks.tables import markdown_table
from freemerge.merging.kind_rules import CLASSIFY_ROUTE, SINGLE_LABEL
from freemerge.serving.requests import Prediction, TaskKinds
from freemerge.serving.runtime import MergedClassifier

SPLITS = ("test", "validation")  # what evaluation reports on; train is for fitting
CHUNK = 256  # texts per runtime call, to bound the memory of one call


def task_texts(
    task: str, split: str, cache_dir: Path | None = None
) -> tuple[list[str], np.ndarray]:
    """Texts and labels of one zoo task's fixed split."""
    if split not in SPLIT_FRACTIONS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLIT_FRACTIONS)}")
    data = load_task(task, cache_dir)
    return data.subset(data.split()[split])


def answers_for(
    model: MergedClassifier,
    texts: list[str],
    task: str | None,
    mixing: str = "argmax",
    max_length: int | None = None,
) -> list[Prediction]:
    """The runtime's answers for ``texts``, all with ``task`` (None: routed), in order."""
    routable = TaskKinds.of_artifact(model.artifact).routable(CLASSIFY_ROUTE)
    narrowed = task is None and len(routable) < len(model.tasks)  # as the server narrows it
    answers: list[Prediction] = []
    for start in range(0, len(texts), CHUNK):
        chunk = texts[start : start + CHUNK]
        routes = model.route(chunk, [routable] * len(chunk)) if narrowed else []
        answers += model.classify_rows(
            chunk, [task] * len(chunk), mixing, max_length, routes=dict(enumerate(routes))
        )
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
    Also the mean over tasks and the seconds per routed text (router and forward)."""
    routed = routed and model.router is not None
    per_task: dict[str, dict[str, float]] = {}
    route_seconds, routed_texts = 0.0, 0
    labelled = [task for task in model.tasks if model.heads[task].kind == SINGLE_LABEL]
    for task in tqdm(labelled, desc=f"evaluate ({split})", disable=not show_progress):
        texts, labels = task_texts(task, split, cache_dir)
        truth = [model.labels(task)[y] for y in labels]
        tagged = answers_for(model, texts, task, max_length=max_length)
        scores = {
            "accuracy": float(np.mean([a.label == y for a, y in zip(tagged, truth, strict=True)]))
        }
        if routed:
            start = time.perf_counter()
            answers = answers_for(model, texts, None, mixing, max_length)
            route_seconds += time.perf_counter() - start
            routed_texts += len(texts)
            scores["routing_accuracy"] = float(np.mean([a.task == task for a in answers]))
            scores["routed_accuracy"] = float(
                np.mean(
                    [a.task == task and a.label == y for a, y in zip(answers, truth, strict=True)]
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


def evaluation_table(result: dict) -> str:
    """Markdown: accuracy per task (and routed and routing accuracy, with a router)."""
    routed = "routed_accuracy" in result["mean"]
    metrics = ["accuracy", "routed_accuracy", "routing_accuracy"] if routed else ["accuracy"]
    header = ["task", "accuracy (true task)", "routed accuracy", "routing accuracy"]
    rows = [
        [task, *(f"{scores[metric]:.4f}" for metric in metrics)]
        for task, scores in [*result["tasks"].items(), ("mean", result["mean"])]
    ]
    lines = markdown_table(header[: len(metrics) + 1], rows)
    if routed:
        per_text = 1000 * result["routed_seconds_per_text"]
        lines.append(f"\nrouter + routed forward: {per_text:.2f} ms per text")
    return "\n".join(lines)
