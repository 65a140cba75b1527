"""The router benchmark: every router kind fitted on one artifact, compared on the zoo.

``freemerge bench router`` -> ``benchmarks/results/router.{md,json}``. Each kind is fitted
exactly as a merge fits it (the same draw of train texts, held-out calibration), on features
computed once: the n-gram ids, and one forward of the bare merged backbone that yields every
dense part. Scored on validation (where the default is picked) and test:

- routing accuracy: the router's task is the text's task;
- routed accuracy: the task and the label are right (the label with the true task's expert
  and head, as the runtime answers a tagged text), per task over the individual fine-tuned
  model's accuracy on the same texts, averaged over tasks (*normalised*);
- calibration: expected calibration error of the top probability (15 bins);
- coverage: with a threshold on the top probability, the share of texts routed and the
  routed accuracy on those (normalised on the same texts);
- cost: the router's own milliseconds per text, one text at a time through the serving
  router (features and model), in interleaved rounds, beside one tagged text's forward.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from freemerge.benchmarks.evaluate import answers_for, task_texts
from freemerge.benchmarks.judging import clears, spread
from freemerge.benchmarks.machine import describe_machine, machine_line
from freemerge.benchmarks.tables import markdown_table, median_and_range
from freemerge.merging.artifact import open_artifact
from freemerge.merging.batching import PassPlan
from freemerge.merging.router import (
    RouterInputs,
    TaskRouter,
    dense_inputs,
    load_router,
    ngram_ids,
    save_router,
)
from freemerge.merging.router_config import DENSE_PARTS, ROUTER_KINDS, RouterConfig, parse_kind
from freemerge.merging.router_training import (
    RouterBackbone,
    expected_calibration_error,
    fit_calibrated,
    open_router_backbone,
    router_examples,
)
from freemerge.merging.zoo_folder import Zoo
from freemerge.serving.engine import TaskModel
from freemerge.serving.requests import StageTimings
from freemerge.serving.router import Router
from freemerge.serving.runtime import MergedClassifier

COST_BUDGET_MS = 1.0  # the router's own cost per text the default must stay within
THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


@dataclasses.dataclass
class Split:
    """One split's texts over all tasks: task index and whether the true task's answer (the
    merged model's, and the individual model's) is right, per text."""

    texts: list[str]
    task: np.ndarray
    merged_right: np.ndarray
    individual_right: np.ndarray


def load_split(model: MergedClassifier, zoo: Zoo, tasks: list[str], split: str) -> Split:
    """The split's texts, with the merged model tagged and each individual model answering."""
    texts: list[str] = []
    task_index: list[int] = []
    merged: list[bool] = []
    individual: list[bool] = []
    for index, task in enumerate(tasks):
        chunk, labels = task_texts(task, split)
        truth = [model.labels(task)[y] for y in labels]
        tagged = answers_for(model, chunk, task, max_length=zoo.recipe["max_length"])
        alone = TaskModel(zoo.tasks[task].path, task, torch.device("cpu"))
        alone.max_length = zoo.recipe["max_length"]  # as it was fine-tuned and scored
        own = alone.classify(chunk, StageTimings())
        texts += chunk
        task_index += [index] * len(chunk)
        merged += [a.label == y for a, y in zip(tagged, truth, strict=True)]
        individual += [a.label == y for a, y in zip(own, truth, strict=True)]
    return Split(texts, np.array(task_index), np.array(merged), np.array(individual))


def all_features(texts: list[str], backbone: RouterBackbone, buckets: int) -> dict:
    """The n-gram ids and every dense part's features of ``texts`` (one backbone forward)."""
    model = backbone.model
    plan = PassPlan.for_device(model.device)
    dense = dense_inputs(
        DENSE_PARTS,
        texts,
        model,
        backbone.tokenizer,
        RouterConfig.max_length,
        plan,
        backbone.subspaces,
    )
    hidden = model.config.hidden_size
    layers = hidden * (model.config.num_hidden_layers + 1)
    return {
        "ngrams": ngram_ids(texts, buckets),
        "embeddings": dense[:, :hidden],
        "layers": dense[:, hidden : hidden + layers],
        "experts": dense[:, hidden + layers :],
    }


def kind_inputs(kind: str, features: dict) -> RouterInputs:
    """A kind's inputs from :func:`all_features` (dense parts in the order the router reads)."""
    parts = parse_kind(kind)
    dense = [features[part] for part in parts if part in DENSE_PARTS]
    return RouterInputs(
        features["ngrams"] if "ngrams" in parts else None,
        torch.cat(dense, dim=1) if dense else None,
    )


def routed_scores(probabilities: torch.Tensor, split: Split, tasks: list[str]) -> dict:
    """Routing accuracy, routed accuracy (mean over tasks), normalised, and the ECE."""
    chosen = probabilities.argmax(-1).numpy()
    right_task = chosen == split.task
    routed = right_task & split.merged_right
    per_task = {}
    for index, task in enumerate(tasks):
        members = split.task == index
        per_task[task] = {
            "routing_accuracy": float(right_task[members].mean()),
            "routed_accuracy": float(routed[members].mean()),
            "normalised": float(routed[members].mean() / split.individual_right[members].mean()),
        }
    mean = {key: float(np.mean([s[key] for s in per_task.values()])) for key in per_task[tasks[0]]}
    mean["routing_accuracy_all"] = float(right_task.mean())
    mean["ece"] = expected_calibration_error(probabilities, torch.from_numpy(split.task))
    return {"mean": mean, "tasks": per_task}


def normalised(right: np.ndarray, split: Split, keep: np.ndarray) -> float | None:
    """Mean over tasks of the share of kept texts ``right`` over the individual model's share
    on the same texts (None when no task has a kept text the individual model answers)."""
    shares = []
    for index in np.unique(split.task):
        members = (split.task == index) & keep
        if members.any() and split.individual_right[members].any():
            shares.append(right[members].mean() / split.individual_right[members].mean())
    return float(np.mean(shares)) if shares else None


def true_task_scores(split: Split) -> dict:
    """The merged model given the true task (a perfect router): accuracy (mean over tasks) and
    normalised accuracy."""
    every = np.ones(len(split.task), dtype=bool)
    accuracy = [split.merged_right[split.task == i].mean() for i in np.unique(split.task)]
    return {
        "accuracy": float(np.mean(accuracy)),
        "normalised": normalised(split.merged_right, split, every),
    }


def coverage_curve(probabilities: torch.Tensor, split: Split) -> list[dict]:
    """Per threshold (and at 90% coverage): the share of texts routed, the routing accuracy
    and the normalised routed accuracy on them, and the same texts' normalised accuracy with
    the true task (what a perfect router would give: the ceiling)."""
    confidence = probabilities.max(-1).values.numpy()
    right_task = probabilities.argmax(-1).numpy() == split.task
    at_90 = float(np.quantile(confidence, 0.10))
    rows = []
    for threshold in [*THRESHOLDS, at_90]:
        keep = confidence >= threshold
        rows.append(
            {
                "threshold": round(threshold, 4),
                "coverage": float(keep.mean()),
                "routing_accuracy": float(right_task[keep].mean()) if keep.any() else None,
                "normalised": normalised(right_task & split.merged_right, split, keep),
                "true_task_normalised": normalised(split.merged_right, split, keep),
                "at_90_coverage": threshold == at_90,
            }
        )
    return rows


def confusion(probabilities: torch.Tensor, split: Split, tasks: list[str]) -> list[list[int]]:
    """Counts: rows the true task, columns the routed task."""
    matrix = np.zeros((len(tasks), len(tasks)), dtype=int)
    np.add.at(matrix, (split.task, probabilities.argmax(-1).numpy()), 1)
    return matrix.tolist()


def cost_per_text(
    routers: dict[str, Router], model: MergedClassifier, texts: list[str], rounds: int
) -> dict[str, dict]:
    """Milliseconds per text, one text at a time: each kind's router alone, and a tagged
    text's whole answer; kinds interleaved in every round; median and range over rounds."""
    plan = PassPlan.for_device(model.device)
    task = model.tasks[0]
    timed: dict[str, list[float]] = {name: [] for name in [*routers, "tagged answer"]}
    for _ in range(rounds):
        for name in timed:
            start = time.perf_counter()
            for text in texts:
                if name == "tagged answer":
                    model.classify_rows([text], [task])
                else:
                    routers[name].routes(model.backbone, model.tokenizer, [text], plan)
            timed[name].append(1000 * (time.perf_counter() - start) / len(texts))
    return {name: spread(v) for name, v in timed.items()}


def fit_kinds(
    kinds: list[str],
    artifact: Path,
    zoo: Zoo,
    splits: dict,
    scratch: Path,
    examples_per_task: int = RouterConfig.examples_per_task,
) -> tuple[dict, dict]:
    """Every kind fitted on the zoo's train texts and saved under ``scratch/<kind>`` as a merge
    saves it; the saved router's probabilities per split, and the fitting figures."""
    tasks = list(open_artifact(artifact, verify=False).tasks)
    data = {task: str(zoo.tasks[task].path / "texts.jsonl") for task in tasks}
    config = RouterConfig(examples_per_task=examples_per_task, data=data)
    texts, labels = router_examples(config, tasks)
    manifest_tasks = open_artifact(artifact, verify=False).tasks
    backbone = open_router_backbone(artifact, manifest_tasks, subspaces=True)
    print("features: train, validation, test", flush=True)
    features = {"train": all_features(texts, backbone, config.buckets)}
    for name, split in splits.items():
        features[name] = all_features(split.texts, backbone, config.buckets)
    probabilities: dict[str, dict] = {}
    fitting: dict[str, dict] = {}
    for kind in tqdm(kinds, desc="router kinds"):
        start = time.perf_counter()
        train = kind_inputs(kind, features["train"])
        router, metrics = fit_calibrated(train, labels, len(tasks), replace(config, kind=kind))
        fitting[kind] = {**metrics, "fit_seconds": time.perf_counter() - start}
        folder = scratch / kind
        folder.mkdir()
        save_router(folder, router, router_record(router, kind, tasks))
        saved = load_router(folder)[0]  # as served: the n-gram table in 16-bit floats
        with torch.no_grad():
            probabilities[kind] = {
                s: torch.softmax(saved(kind_inputs(kind, features[s])), -1) for s in splits
            }
    return probabilities, fitting


def router_record(router: TaskRouter, kind: str, tasks: list[str]) -> dict:
    """What a merge records beside a router fitted with the default settings."""
    return {
        "kind": kind,
        "tasks": tasks,
        "buckets": RouterConfig.buckets,
        "ngram_dim": router.bag.embedding_dim if router.bag is not None else 0,
        "dense_features": len(router.dense_mean),
        "hidden": RouterConfig.hidden,
        "max_length": RouterConfig.max_length,
    }


def pick_default(kinds: dict[str, dict]) -> str:
    """The best routing accuracy on validation among the kinds within the cost budget."""
    within = [k for k, r in kinds.items() if _within_budget(r["cost_ms"])] or list(kinds)
    return max(within, key=lambda k: kinds[k]["validation"]["mean"]["routing_accuracy_all"])


def _within_budget(cost_ms: dict) -> bool:
    """Whether the router's cost per text stayed within :data:`COST_BUDGET_MS` every round."""
    return clears(cost_ms, COST_BUDGET_MS, higher_is_better=False)


def run_router_bench(
    zoo: Zoo,
    artifact: Path,
    kinds: list[str] | None = None,
    rounds: int = 3,
    examples_per_task: int = RouterConfig.examples_per_task,
) -> dict:
    """Every kind fitted and scored; the default picked; its confusion matrix and coverage."""
    start = time.perf_counter()
    kinds = list(kinds or ROUTER_KINDS)
    model = MergedClassifier(open_artifact(artifact))
    tasks = list(model.tasks)
    splits = {s: load_split(model, zoo, tasks, s) for s in ("validation", "test")}
    sample = splits["test"].texts[:: max(1, len(splits["test"].texts) // 100)]
    with tempfile.TemporaryDirectory(prefix="freemerge-routers-") as scratch:
        probabilities, fitting = fit_kinds(
            kinds, artifact, zoo, splits, Path(scratch), examples_per_task
        )
        served = {
            k: Router(Path(scratch) / k, model.device, model.store.load_all, model.layer_matrices)
            for k in kinds
        }
        costs = cost_per_text(served, model, sample, rounds)
    results = {
        kind: {
            "fitting": fitting[kind],
            "cost_ms": costs[kind],
            **{s: routed_scores(probabilities[kind][s], splits[s], tasks) for s in splits},
        }
        for kind in kinds
    }
    default = pick_default(results)
    test = probabilities[default]["test"]
    return {
        "machine": describe_machine(),
        "wall_seconds": round(time.perf_counter() - start),
        "tasks": tasks,
        "artifact": model.artifact.version,
        "kinds": results,
        "tagged_answer_ms": costs["tagged answer"],
        "default": default,
        "confusion": confusion(test, splits["test"], tasks),
        "coverage": {
            kind: coverage_curve(probabilities[kind]["test"], splits["test"]) for kind in kinds
        },
        "true_task": {name: true_task_scores(split) for name, split in splits.items()},
        "cost_budget_ms": COST_BUDGET_MS,
        "rounds": rounds,
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


KIND_COLUMNS = [
    "kind",
    "routing accuracy, validation",
    "routing accuracy, test",
    "routed accuracy, test",
    "normalised, test",
    "ECE, test",
    "router cost per text (ms)",
    "fit (s)",
]


def _kinds_table(result: dict) -> list[str]:
    true_task = result["true_task"]["test"]
    ceiling = [
        "the true task given (no router: the ceiling)",
        "",
        "",
        f"{true_task['accuracy']:.3f}",
        _pct(true_task["normalised"]),
        "",
        "",
        "",
    ]
    rows = [ceiling]
    for kind, r in result["kinds"].items():
        val, test = r["validation"]["mean"], r["test"]["mean"]
        mark = " (default)" if kind == result["default"] else ""
        rows.append(
            [
                f"`{kind}`{mark}",
                _pct(val["routing_accuracy_all"]),
                _pct(test["routing_accuracy_all"]),
                f"{test['routed_accuracy']:.3f}",
                _pct(test["normalised"]),
                f"{test['ece']:.3f}",
                median_and_range(r["cost_ms"], ".2f"),
                f"{r['fitting']['fit_seconds']:.0f}",
            ]
        )
    return markdown_table(KIND_COLUMNS, rows)


def _coverage_table(rows: list[dict]) -> list[str]:
    header = [
        "min confidence",
        "coverage",
        "routing accuracy",
        "normalised routed accuracy",
        "the same texts with the true task (ceiling)",
    ]
    figures = ("coverage", "routing_accuracy", "normalised", "true_task_normalised")
    cells = []
    for row in sorted(rows, key=lambda r: r["threshold"]):
        label = f"{row['threshold']:.3f}" + (" (90% coverage)" if row["at_90_coverage"] else "")
        cells.append([label, *(_pct(row[key]) for key in figures)])
    return markdown_table(header, cells)


def _confusion_table(result: dict) -> list[str]:
    tasks = result["tasks"]
    rows = [[task, *row] for task, row in zip(tasks, result["confusion"], strict=True)]
    return markdown_table(["true \\ routed", *tasks], rows)


def _targets(result: dict) -> list[str]:
    default = result["default"]
    test = result["kinds"][default]["test"]["mean"]
    at_90 = next(r for r in result["coverage"][default] if r["at_90_coverage"])
    cost = result["kinds"][default]["cost_ms"]
    checks = [
        ("routing accuracy at full coverage >= 96%", test["routing_accuracy_all"], 0.96),
        (
            "routed accuracy at full coverage >= 93% of the individual models",
            test["normalised"],
            0.93,
        ),
        (
            "routed accuracy at 90% coverage >= 97% of the individual models",
            at_90["normalised"],
            0.97,
        ),
    ]
    rows = [[name, _pct(value), _yes(value >= goal)] for name, value, goal in checks]
    tagged = result["tagged_answer_ms"]["per_round"]
    ratios = spread([(r + t) / t for r, t in zip(cost["per_round"], tagged, strict=True)])
    rows.append(
        [
            "untagged answer within 1.10x of tagged (router + tagged answer over the tagged "
            "answer, one text, every round)",
            median_and_range(ratios, ".3f", "x"),
            _yes(clears(ratios, 1.10, higher_is_better=False)),
        ]
    )
    rows.append(
        [
            f"router cost <= {COST_BUDGET_MS:g} ms per text (every round)",
            median_and_range(cost, ".2f", " ms"),
            _yes(_within_budget(cost)),
        ]
    )
    return markdown_table(["target (default router, test)", "measured", "met"], rows)


def _yes(met: bool) -> str:
    return "yes" if met else "no"


def router_markdown(result: dict, command: str) -> str:
    """The report: kinds, targets, the default's confusion matrix and coverage curves."""
    default = result["default"]
    tagged = result["tagged_answer_ms"]
    parts = [
        "# Routers",
        "",
        "Every router kind fitted on the same train texts of the zoo (the merge's own draw, "
        "20% held out for calibration, then refitted on all), on the artifact's merged "
        "backbone and experts. Routing accuracy over all texts; *routed accuracy*: task and "
        "label right (mean over tasks); *normalised*: per task over the individual fine-tuned "
        "model's accuracy on the same texts, mean over tasks; ECE: expected calibration error "
        "(15 bins). Cost: the router alone, one text at a time, median and range over "
        f"{result['rounds']} interleaved rounds; "
        f"a tagged text's whole answer took {median_and_range(tagged, '.1f', ' ms')} "
        f"in the same rounds. The default (`{default}`) "
        f"is the best on validation among the kinds within {COST_BUDGET_MS:g} ms per text.",
        "",
        *_kinds_table(result),
        "",
        "## Targets",
        "",
        *_targets(result),
        "",
        f"## Confusion matrix of the default (`{default}`, test)",
        "",
        *_confusion_table(result),
    ]
    for kind, rows in result["coverage"].items():
        parts += ["", f"## Coverage and accuracy: `{kind}` (test)", "", *_coverage_table(rows)]
    parts += [
        "",
        f"Machine: {machine_line(result['machine'])}. "
        f"Whole run: {result['wall_seconds'] / 60:.0f} min.",
        "",
        f"Command: `{command}`",
    ]
    return "\n".join(parts) + "\n"
