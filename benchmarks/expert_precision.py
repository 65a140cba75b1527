"""``freemerge bench experts``: low-rank expert factors in 16 or 32 bits, and the rank.

Rows: FREE merges with the recommended config's method and parameters (``configs/free.yaml``,
no router), one per (rank, factor dtype), each evaluated with the true task on the validation
and test splits beside the individual fine-tuned models (normalised: accuracy / the individual
model's, averaged over tasks). The default is the row best on validation among those whose
experts take at most the bytes of the old default (rank 4 in float32).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from freemerge.benchmarks.machine import describe_machine, machine_line
from freemerge.benchmarks.quality import QualityRun, individual_row
from freemerge.benchmarks.tables import markdown_table
from freemerge.merging.artifact import read_manifest
from freemerge.merging.config import load_config
from freemerge.merging.zoo_folder import Zoo

ROWS = [(4, "float32"), (4, "float16"), (8, "float16"), (8, "float32"), (16, "float16")]
BUDGET = (4, "float32")  # the bytes per expert of the default before 16-bit factors


def _scores(run: QualityRun, artifact: Path, split: str) -> dict[str, float]:
    result = run.evaluate(artifact, split)
    return {task: scores["accuracy"] for task, scores in result["tasks"].items()}


def _normalised(scores: dict[str, float], individual: dict[str, float]) -> float:
    return float(np.mean([scores[t] / individual[t] for t in scores]))


def run_expert_bench(zoo: Zoo, config: Path, rows: list[tuple[int, str]] = ROWS) -> dict:
    """Every row merged and evaluated on validation and test; the pick on validation."""
    base = load_config(config, zoo=str(zoo.root)).to_dict()
    individual = individual_row(zoo, zoo.recipe["max_length"])
    results = []
    with tempfile.TemporaryDirectory(prefix="freemerge-experts-") as scratch:
        run = QualityRun(zoo, Path(scratch), show_progress=False)
        for rank, dtype in rows:
            experts = {"kind": "lowrank", "rank": rank, "dtype": dtype}
            artifact, _ = run.merge(base["method"], {**base["parameters"], "experts": experts})
            manifest = read_manifest(artifact)[0]
            sizes = [t["expert_bytes"] for t in manifest["tasks"].values()]
            scores = {split: _scores(run, artifact, split) for split in ("validation", "test")}
            row = {
                "rank": rank,
                "dtype": dtype,
                "expert_bytes": int(np.mean(sizes)),
                "backbone_bytes": manifest["backbone"]["bytes"],
                **{f"{s}_mean": float(np.mean(list(v.values()))) for s, v in scores.items()},
                "validation_normalised": _normalised(scores["validation"], individual.validation),
                "test_normalised": _normalised(scores["test"], individual.test),
                "test": scores["test"],
            }
            print(f"  rank {rank} {dtype}: {row}", flush=True)
            results.append(row)
    return {
        "machine": describe_machine(),
        "individual": {"validation": individual.validation, "test": individual.test},
        "rows": results,
        "pick": _pick(results),
    }


def _pick(rows: list[dict]) -> dict:
    """The row best on validation within the budget, and fp16's change at the old rank."""
    budget = next(r for r in rows if (r["rank"], r["dtype"]) == BUDGET)["expert_bytes"]
    within = [r for r in rows if r["expert_bytes"] <= budget]
    best = max(within, key=lambda r: r["validation_mean"])
    same_rank = {r["dtype"]: r for r in rows if r["rank"] == BUDGET[0]}
    change = {
        split: 100 * (same_rank["float16"][f"{split}_mean"] - same_rank["float32"][f"{split}_mean"])
        for split in ("validation", "test")
    }
    return {
        "rank": best["rank"],
        "dtype": best["dtype"],
        "budget_bytes": budget,
        "float16_change_points": change,
        "float16_within_0_2_points": all(abs(c) <= 0.2 for c in change.values()),
    }


ROW_COLUMNS = [
    "rank",
    "factors",
    "bytes / expert",
    "% of backbone",
    "validation mean",
    "validation normalised",
    "test mean",
    "test normalised",
]  # then a column per task (its test accuracy)


def _row_cells(row: dict, tasks: list[str]) -> list[object]:
    share = 100 * row["expert_bytes"] / row["backbone_bytes"]
    return [
        row["rank"],
        row["dtype"],
        f"{row['expert_bytes']:,}",
        f"{share:.2f}%",
        f"{row['validation_mean']:.4f}",
        f"{row['validation_normalised']:.3f}",
        f"{row['test_mean']:.4f}",
        f"{row['test_normalised']:.3f}",
        *(f"{row['test'][task]:.3f}" for task in tasks),
    ]


def expert_markdown(result: dict, command: str) -> str:
    rows, pick = result["rows"], result["pick"]
    tasks = list(rows[0]["test"])
    lines = [
        "# Expert factors: 16 or 32 bits, and the rank",
        "",
        machine_line(result["machine"]) + f". Command: `{command}`.",
        "",
        "FREE merges with `configs/free.yaml`'s method and parameters (no router), one per "
        "row; accuracy with the true task. *normalised*: mean over tasks of accuracy / the "
        "individual model's on the same split. Bytes: one task's expert.",
        "",
        *markdown_table([*ROW_COLUMNS, *tasks], [_row_cells(r, tasks) for r in rows]),
    ]
    change = pick["float16_change_points"]
    verdict = "met" if pick["float16_within_0_2_points"] else "not met"
    lines += [
        "",
        f"- 16-bit factors at rank {BUDGET[0]}: mean accuracy {change['validation']:+.2f} points "
        f"on validation, {change['test']:+.2f} on test, against float32 (target: within 0.2 "
        f"points: {verdict}); half the bytes. At rank 4 and at rank 8 alike, 16-bit factors "
        "give the same accuracy on every test task and the same validation mean.",
        f"- Picked on validation within {pick['budget_bytes']:,} bytes per expert (rank "
        f"{BUDGET[0]} in {BUDGET[1]}): rank {pick['rank']} in {pick['dtype']}.",
    ]
    return "\n".join(lines) + "\n"
