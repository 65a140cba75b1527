"""``freemerge bench quality``: the paper's quality table at our scale, on a zoo.

Every hyperparameter is picked on the validation split (mean accuracy over tasks); the picked
configuration is then reported on test. Rows: individual models, the pretrained backbone with
the fine-tuned heads, average, task arithmetic, TIES, FR (reference and radial), FREE with
sparse experts (paper's density and at the low-rank experts' bytes), experts over a
task-arithmetic backbone (Twin-Merging style), FREE with low-rank experts, each with-router
variant routed, and heads re-fitted on the merged backbone. Ablations: filter ratio, sparse
density, rank.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BatchEncoding

from freemerge.benchmarks.evaluate import evaluate_artifact, task_texts
from freemerge.benchmarks.finetune import accuracy, predict
from freemerge.benchmarks.machine import describe_machine, machine_line
from freemerge.benchmarks.tables import markdown_table
from freemerge.merging.artifact import open_artifact, read_manifest
from freemerge.merging.batching import run_texts
from freemerge.merging.config import parse_config
from freemerge.merging.merge import run_merge
from freemerge.merging.zoo_folder import Zoo
from freemerge.serving.runtime import MergedClassifier


@dataclass
class QualityGrid:
    """The candidates tried per row (picked on validation) and the ablation values."""

    scalings: list[float] = field(default_factory=lambda: [0.3, 0.5, 1.0])
    ties_scalings: list[float] = field(default_factory=lambda: [0.5, 1.0])
    ratios: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    cutoffs: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1])
    densities: list[float] = field(default_factory=lambda: [0.0037, 0.01, 0.02, 0.05])
    ranks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    paper_density: float = 0.01
    rank: int = 8  # the shipped default (16-bit factors, the kind's default dtype)
    router: dict = field(default_factory=dict)  # the default router (RouterConfig)
    refit_examples: int = 2000

    @classmethod
    def small(cls) -> QualityGrid:
        """Fewer candidates per row, the shipped router and refit: for a larger backbone."""
        return cls(
            scalings=[0.5, 1.0],
            ties_scalings=[1.0],
            ratios=[0.5, 0.7],
            cutoffs=[0.05],
            densities=[0.01, 0.05],
            ranks=[4, 8, 16],
        )

    @classmethod
    def quick(cls) -> QualityGrid:
        """One candidate per row: a smoke run."""
        return cls(
            scalings=[0.5],
            ties_scalings=[1.0],
            ratios=[0.7],
            cutoffs=[0.05],
            densities=[0.01],
            ranks=[8],
            router={"examples_per_task": 100},
            refit_examples=200,
        )


@dataclass
class Row:
    name: str
    picked: dict
    validation: dict[str, float]
    test: dict[str, float]
    extra_bytes_pct: float = 0.0
    merge_seconds: float | None = None
    note: str = ""


class QualityRun:
    """Merges, evaluates and picks; artifacts go to a scratch folder removed at the end."""

    def __init__(self, zoo: Zoo, scratch: Path, show_progress: bool) -> None:
        self.zoo = zoo
        self.scratch = scratch
        self.show_progress = show_progress
        self.count = 0

    def merge(
        self, method: str, parameters: dict, router: dict | None = None
    ) -> tuple[Path, float]:
        self.count += 1
        out = self.scratch / f"a{self.count}"
        parameters = dict(parameters)
        experts = parameters.pop("experts", None)  # the rows' `picked` keep experts beside
        raw = {"zoo": str(self.zoo.root), "method": method, "parameters": parameters}
        if experts:
            raw["experts"] = experts
        if router is not None:
            raw["router"] = router
        start = time.perf_counter()
        run_merge(parse_config(raw), out, show_progress=False)
        return out, time.perf_counter() - start

    def evaluate(self, artifact: Path, split: str, routed: bool = False) -> dict:
        model = MergedClassifier(open_artifact(artifact))
        return evaluate_artifact(model, split, routed=routed, show_progress=self.show_progress)

    def pick(
        self, name: str, method: str, candidates: list[dict], router: dict | None = None
    ) -> list[Row]:
        """Best candidate on validation, reported on test (and routed, with a router)."""
        scored = []
        for parameters in candidates:
            artifact, seconds = self.merge(method, parameters)
            validation = self.evaluate(artifact, "validation")
            scored.append(
                (validation["mean"]["accuracy"], parameters, artifact, seconds, validation)
            )
            if self.show_progress:
                print(f"  {name} {parameters}: validation {scored[-1][0]:.4f}", flush=True)
        _, parameters, artifact, seconds, validation = max(scored, key=lambda s: s[0])
        if (
            router is not None
        ):  # the same merge plus a router: tagged validation accuracy is unchanged
            artifact, seconds = self.merge(method, parameters, router)
        extra = 100 * _largest_expert_share(artifact)
        test = self.evaluate(artifact, "test", routed=router is not None)
        rows = [Row(name, parameters, _accuracies(validation), _accuracies(test), extra, seconds)]
        if router is not None:
            routed = {t: s["routed_accuracy"] for t, s in test["tasks"].items()}
            routing = float(np.mean([s["routing_accuracy"] for s in test["tasks"].values()]))
            note = (
                f"routing accuracy {routing:.3f}; router + routed forward "
                f"{1000 * test['routed_seconds_per_text']:.1f} ms per text"
            )
            rows.append(Row(f"{name}, routed", parameters, {}, routed, extra, seconds, note))
        for other in scored:
            if other[2] != artifact:
                shutil.rmtree(other[2], ignore_errors=True)
        return rows


def _accuracies(result: dict) -> dict[str, float]:
    return {task: scores["accuracy"] for task, scores in result["tasks"].items()}


def individual_row(zoo: Zoo, max_length: int) -> Row:
    """The fine-tuned models themselves, through the zoo's own prediction code."""
    scores: dict[str, dict[str, float]] = {"validation": {}, "test": {}}
    for name, task in zoo.tasks.items():
        model = AutoModelForSequenceClassification.from_pretrained(task.path).eval()
        tokenizer = AutoTokenizer.from_pretrained(task.path)
        for split in scores:
            texts, labels = task_texts(name, split)
            scores[split][name] = accuracy(predict(model, tokenizer, texts, max_length), labels)
    return Row(
        "individual fine-tuned models",
        {},
        scores["validation"],
        scores["test"],
        100.0,
        None,
        "each task is a whole model",
    )


@torch.no_grad()
def refit_heads_row(run: QualityRun, base_row: Row, examples: int) -> Row:
    """Ablation: new linear heads (logistic regression) on the frozen merged backbone's pooled
    output (the first token's hidden state where the backbone has no pooler), trained on each
    task's train split; uses task data that merging alone does not."""
    artifact, seconds = run.merge("task_arithmetic", base_row.picked)
    model = MergedClassifier(open_artifact(artifact))
    scores: dict[str, dict[str, float]] = {"validation": {}, "test": {}}
    for task in model.tasks:
        texts, labels = task_texts(task, "train")
        keep = np.random.default_rng(0).permutation(len(texts))[:examples]
        features = _pooler_features(model, [texts[i] for i in keep])
        head = torch.nn.Linear(features.shape[1], len(model.labels(task)))
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-3)
        targets = torch.from_numpy(labels[keep])
        with torch.enable_grad():
            for _ in range(300):
                loss = torch.nn.functional.cross_entropy(head(features), targets)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        for split in scores:
            texts, labels = task_texts(task, split)
            predicted = head(_pooler_features(model, texts)).argmax(-1).numpy()
            scores[split][task] = float(np.mean(predicted == labels))
    return Row(
        "task arithmetic, heads re-fitted (ablation)",
        base_row.picked,
        scores["validation"],
        scores["test"],
        0.0,
        seconds,
        f"logistic-regression heads on {examples} train texts per task",
    )


def _pooler_features(model: MergedClassifier, texts: list[str]) -> torch.Tensor:
    """The merged backbone's pooled output (no expert applied; the first token's hidden state
    without a pooler), in the order of ``texts``."""

    def pooled(batch: BatchEncoding) -> torch.Tensor:
        output = model.backbone(**batch)
        pooler = getattr(output, "pooler_output", None)
        return pooler if pooler is not None else output.last_hidden_state[:, 0]

    return run_texts(model.tokenizer, texts, 128, model.device, pooled)


GRIDS = {"full": QualityGrid, "small": QualityGrid.small, "quick": QualityGrid.quick}


def run_quality(zoo: Zoo, grid_name: str = "full", show_progress: bool = True) -> dict:
    """Every row and ablation of the table on the named grid; returns the JSON-able result."""
    grid = GRIDS[grid_name]()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="freemerge-quality-") as scratch:
        run = QualityRun(zoo, Path(scratch), show_progress)
        rows = [individual_row(zoo, zoo.recipe["max_length"])]
        ta, fr = _merge_rows(run, grid, rows)
        _expert_rows(run, grid, ta, fr, rows)
        if show_progress:
            print("== heads re-fitted", flush=True)
        rows.append(refit_heads_row(run, ta, grid.refit_examples))
        ablations = _ablations(run, grid, fr)
    individual = rows[0].test
    return {
        "machine": describe_machine(),
        "wall_seconds": round(time.perf_counter() - start),
        "grid": grid_name,
        "tasks": list(zoo.tasks),
        "rows": [_row_json(row, individual) for row in rows],
        "ablations": {
            name: [_row_json(r, individual) for r in entries] for name, entries in ablations.items()
        },
    }


def _step(
    run: QualityRun,
    rows: list[Row],
    name: str,
    method: str,
    candidates: list[dict],
    router: dict | None = None,
) -> Row:
    """Pick one row's configuration on validation, append its rows; the picked row."""
    if run.show_progress:
        print(f"== {name}", flush=True)
    picked = run.pick(name, method, candidates, router)
    rows.extend(picked)
    return picked[0]


def _merge_rows(run: QualityRun, grid: QualityGrid, rows: list[Row]) -> tuple[Row, Row]:
    """The merges without experts; returns the picked task-arithmetic and FR rows."""
    _step(
        run, rows, "pretrained backbone + fine-tuned heads", "task_arithmetic", [{"scaling": 0.0}]
    )
    _step(run, rows, "average", "average", [{}])
    scalings = [{"scaling": s} for s in grid.scalings]
    ta = _step(run, rows, "task arithmetic", "task_arithmetic", scalings)
    ties = [{"scaling": s, "density": 0.2} for s in grid.ties_scalings]
    _step(run, rows, "TIES", "ties", ties)
    reference = [
        {"scaling": s, "filter": {"mode": "reference", "ratio": r}}
        for s in grid.scalings
        for r in grid.ratios
    ]
    fr = _step(run, rows, "FR (reference filter)", "fr", reference)
    radial = [
        {"scaling": s, "filter": {"mode": "radial", "cutoff": c}}
        for s in grid.scalings
        for c in grid.cutoffs
    ]
    _step(run, rows, "FR (radial filter)", "fr", radial)
    return ta, fr


def _expert_rows(run: QualityRun, grid: QualityGrid, ta: Row, fr: Row, rows: list[Row]) -> None:
    """FREE and Twin-Merging-style rows: sparse and low-rank experts, with routed variants."""
    lowrank = {"kind": "lowrank", "rank": grid.rank}
    sparse = {"kind": "sparse", "density": grid.paper_density}
    matched = _matched_density(run, fr.picked, lowrank)
    entries = [
        (f"FREE, sparse experts (density {grid.paper_density})", fr, sparse, grid.router),
        (
            f"FREE, sparse experts at low-rank bytes (density {matched:.4f})",
            fr,
            {"kind": "sparse", "density": matched},
            None,
        ),
        ("experts over task arithmetic (Twin-Merging style), sparse", ta, sparse, None),
        (f"FREE, low-rank experts (rank {grid.rank})", fr, lowrank, grid.router),
        (f"experts over task arithmetic, low-rank (rank {grid.rank})", ta, lowrank, None),
    ]
    for name, over, experts, router in entries:
        method = "free" if over is fr else "task_arithmetic"
        _step(run, rows, name, method, [{**over.picked, "experts": experts}], router)


def _ablations(run: QualityRun, grid: QualityGrid, fr: Row) -> dict[str, list[Row]]:
    """Filter ratio, sparse density and rank, each around the picked FR configuration."""
    ratios = [
        _ablation(
            run, "fr", {**fr.picked, "filter": {"mode": "reference", "ratio": r}}, f"ratio {r}"
        )
        for r in sorted({*grid.ratios, 0.71})
    ]
    densities = [
        _ablation(
            run, "free", {**fr.picked, "experts": {"kind": "sparse", "density": d}}, f"density {d}"
        )
        for d in grid.densities
    ]
    ranks = [
        _ablation(
            run, "free", {**fr.picked, "experts": {"kind": "lowrank", "rank": r}}, f"rank {r}"
        )
        for r in grid.ranks
    ]
    return {
        "filter ratio (FR, reference)": ratios,
        "sparse density (FREE)": densities,
        "rank (FREE, low-rank)": ranks,
    }


def _largest_expert_share(artifact: Path) -> float:
    """The largest expert's bytes as a fraction of the backbone's (from the manifest)."""
    manifest, _ = read_manifest(artifact)
    largest = max(t["expert_bytes"] for t in manifest["tasks"].values())
    return largest / manifest["backbone"]["bytes"]


def _matched_density(run: QualityRun, parameters: dict, lowrank: dict) -> float:
    """The sparse density whose experts take the bytes of the low-rank ones (8 B an entry)."""
    artifact, _ = run.merge("free", {**parameters, "experts": lowrank})
    share = _largest_expert_share(artifact)
    shutil.rmtree(artifact)
    return round(share * 4 / 8, 4)  # backbone is float32: 4 B a weight; a sparse entry 8 B


def _ablation(run: QualityRun, method: str, parameters: dict, label: str) -> Row:
    artifact, seconds = run.merge(method, parameters)
    extra = 100 * _largest_expert_share(artifact)
    row = Row(
        label,
        parameters,
        _accuracies(run.evaluate(artifact, "validation")),
        _accuracies(run.evaluate(artifact, "test")),
        extra,
        seconds,
    )
    shutil.rmtree(artifact)
    return row


def _row_json(row: Row, individual: dict[str, float]) -> dict:
    mean = float(np.mean(list(row.test.values())))
    normalised = float(np.mean([row.test[t] / individual[t] for t in row.test]))
    return {
        "name": row.name,
        "picked": row.picked,
        "note": row.note,
        "validation_mean": float(np.mean(list(row.validation.values())))
        if row.validation
        else None,
        "test": row.test,
        "test_mean": mean,
        "normalised_mean": normalised,
        "extra_bytes_pct": row.extra_bytes_pct,
        "merge_seconds": None if row.merge_seconds is None else round(row.merge_seconds, 1),
    }


def _method_cells(row: dict, tasks: list[str]) -> list[str]:
    """A method's row: test accuracy per task, mean, normalised, bytes, time, what was picked."""
    seconds = "" if row["merge_seconds"] is None else f"{row['merge_seconds']:.0f}"
    picked = json.dumps(row["picked"]).replace("|", "/") if row["picked"] else ""
    note = f" {row['note']}" if row["note"] else ""
    return [
        row["name"],
        *(f"{row['test'][task]:.3f}" for task in tasks),
        f"{row['test_mean']:.3f}",
        f"{row['normalised_mean']:.3f}",
        f"{row['extra_bytes_pct']:.2f}%",
        seconds,
        f"`{picked}`{note}",
    ]


def quality_markdown(result: dict, command: str) -> str:
    tasks = result["tasks"]
    header = [
        "method",
        *tasks,
        "mean",
        "normalised",
        "extra bytes / task",
        "merge time (s)",
        "picked on validation",
    ]

    def table(entries: list[dict]) -> str:
        return "\n".join(markdown_table(header, [_method_cells(row, tasks) for row in entries]))

    ablations = "\n\n".join(
        f"### {name}\n\n{table(rows)}" for name, rows in result["ablations"].items()
    )
    return (
        "# Merge quality\n\n"
        f"Test accuracy per task ({len(tasks)} tasks of the zoo); every hyperparameter picked on "
        "the validation split. *normalised*: mean over tasks of accuracy / the individual "
        "model's accuracy. *extra bytes / task*: the largest expert as a share of the backbone's "
        "bytes (an individual model is a whole backbone per task).\n\n"
        f"{table(result['rows'])}\n\n"
        "## Ablations (test; the rest of the configuration as picked above)\n\n"
        f"{ablations}\n\n"
        f"Machine: {machine_line(result['machine'])}. "
        f"Grid: {result.get('grid', 'full')}. "
        f"Whole run: {result['wall_seconds'] / 60:.0f} min.\n\n"
        f"Command: `{command}`\n"
    )
