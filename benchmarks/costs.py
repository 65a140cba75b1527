"""Micro-costs of the expert path, timed in one process: a plain forward against the expert
applied in place and restored, the forward with row adapters and the forward as served, at
batch 1 and 32; the router against a tagged text. Also the cost of each merge method (wall
time, peak memory, artifact bytes), every merge in a fresh process."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from freemerge.benchmarks.judging import MIN_ROUNDS, spread
from freemerge.benchmarks.spawn import run_in_child
from freemerge.merging.artifact import open_artifact
from freemerge.merging.batching import Tokenized
from freemerge.serving.adapters import rows_assigned
from freemerge.serving.requests import StageTimings
from freemerge.serving.runtime import MergedClassifier


@torch.no_grad()
def costs(artifact: Path, texts: list[str], repeats: int = 30, rounds: int = MIN_ROUNDS) -> dict:
    """Against one plain forward at batch 1 and 32: the expert applied in place and restored
    (the path for sparse experts) and, where the artifact has them, the forward with row
    adapters (the path the server takes for low-rank experts: its cost is that forward minus
    the plain one). Also the router against a tagged request. Each quantity is timed once, all
    of a group interleaved, in ``rounds`` rounds of ``repeats`` alternations; shares are taken
    per round and reported as median and range.
    """
    in_place = MergedClassifier(open_artifact(artifact), row_adapters=False)
    served = MergedClassifier(open_artifact(artifact))
    task = in_place.tasks[0]
    out: dict = {"timing": {"repeats": repeats, "rounds": rounds}}
    for size in (1, 32):
        out[f"batch_{size}"] = forward_costs(in_place, served, task, texts, size, repeats, rounds)
    if in_place.router is not None:
        out["router"] = router_costs(in_place, task, texts[:1], repeats, rounds)
    return out


def forward_costs(
    in_place: MergedClassifier,
    served: MergedClassifier,
    task: str,
    texts: list[str],
    batch_size: int,
    repeats: int,
    rounds: int,
) -> dict:
    """Plain forward, in-place apply + restore, and forward with row adapters at one batch
    size: median ms over the rounds (of each round's median), and the shares per round. Each
    quantity is timed in a group of its own, beside a plain forward, its share taken against
    that forward: applying an expert in place (as the served path does above
    ``merge_above_tokens``) and restoring it rewrites the weights, and what ran right after it
    paid for the caches it cleared (measured in one group: the row adapters' forward right
    after the apply + restore +28.8% over a plain forward, the same path one call later
    +16.7%)."""
    batch = Tokenized(in_place.tokenizer, (texts * batch_size)[:batch_size], 128).padded(
        list(range(batch_size)), in_place.device
    )
    measured: dict[str, Callable[[], object]] = {
        "expert_apply_restore": lambda: _enter_and_exit(in_place.expert_applied(task)),
    }
    if served.row_adapters is not None:
        measured["row_adapter_forward"] = lambda: _adapted_forward(served, task, batch)
        measured["served_forward"] = lambda: _served_forward(served, task, batch)
    groups = {
        name: _interleaved(
            {"forward": lambda: in_place.backbone(**batch), name: function}, repeats, rounds
        )
        for name, function in measured.items()
    }
    # the plain forward's time from a group where nothing rewrites the weights, when there is one
    clean = groups.get("row_adapter_forward", groups["expert_apply_restore"])
    per_round = [{"forward": r["forward"]} for r in clean]
    for name, group in groups.items():
        for row, other in zip(per_round, group, strict=True):
            row[name] = other[name]
    figures: dict = {
        f"{name}_ms": 1000 * float(np.median([r[name] for r in per_round])) for name in per_round[0]
    }
    figures["rounds_ms"] = [{k: 1000 * v for k, v in r.items()} for r in per_round]
    figures["apply_share_of_forward"] = spread(
        [r["expert_apply_restore"] / r["forward"] for r in groups["expert_apply_restore"]]
    )
    for name in ("row_adapter", "served"):
        if f"{name}_forward" in groups:
            figures[f"{name}_share_of_forward"] = spread(
                [
                    (r[f"{name}_forward"] - r["forward"]) / r["forward"]
                    for r in groups[f"{name}_forward"]
                ]
            )
    return figures


def router_costs(
    model: MergedClassifier, task: str, one: list[str], repeats: int, rounds: int
) -> dict:
    """One text tagged against one text routed, interleaved: median ms, and the router's
    overhead per round."""
    per_round = _interleaved(
        {"tagged": lambda: model.classify(one, task=task), "untagged": lambda: model.classify(one)},
        repeats,
        rounds,
    )
    return {
        "tagged_ms": 1000 * float(np.median([r["tagged"] for r in per_round])),
        "untagged_ms": 1000 * float(np.median([r["untagged"] for r in per_round])),
        "router_overhead_ms": spread([1000 * (r["untagged"] - r["tagged"]) for r in per_round]),
        "untagged_over_tagged": spread([r["untagged"] / r["tagged"] for r in per_round]),
    }


def _adapted_forward(model: MergedClassifier, task: str, batch: object) -> None:
    """As the server runs a pass: the task's expert from the store, the rows assigned."""
    experts = {task: model.store.get(task)}
    with rows_assigned(model.row_adapters, [task] * len(batch["input_ids"]), experts):
        model.backbone(**batch)


def _served_forward(model: MergedClassifier, task: str, batch: object) -> None:
    """One pass as the runtime runs it: row adapters, or the expert merged in for a large
    one-task pass (``merge_above_tokens``)."""
    model.logits_pass([task] * len(batch["input_ids"]), None, batch, StageTimings())


def _enter_and_exit(context: object) -> None:
    with context:
        pass


def _interleaved(
    functions: dict[str, Callable[[], object]], repeats: int, rounds: int
) -> list[dict[str, float]]:
    """Per round, the median seconds of each function over ``repeats`` alternations (one
    call of every function in turn), so that the machine's drift hits all alike; one warm-up
    call of each first."""
    for function in functions.values():
        function()
    per_round = []
    for _ in range(rounds):
        seconds: dict[str, list[float]] = {name: [] for name in functions}
        for _ in range(repeats):
            for name, function in functions.items():
                start = time.perf_counter()
                function()
                seconds[name].append(time.perf_counter() - start)
        per_round.append({name: float(np.median(s)) for name, s in seconds.items()})
    return per_round


# Merge methods for the cost table, each as a merge config (less the zoo) with its parameters
# as picked on validation (benchmarks/results/merge_quality.md); the FREE rows without a router.
FR_PARAMETERS = {"scaling": 0.5, "filter": {"mode": "reference", "ratio": 0.5}}
MERGE_METHODS = {
    "average": {"method": "average"},
    "task arithmetic": {"method": "task_arithmetic", "parameters": {"scaling": 0.3}},
    "TIES": {"method": "ties", "parameters": {"scaling": 1.0, "density": 0.2}},
    "FR (reference filter)": {"method": "fr", "parameters": FR_PARAMETERS},
    "FREE, sparse experts 1%": {
        "method": "free",
        "parameters": FR_PARAMETERS,
        "experts": {"kind": "sparse", "density": 0.01},
    },
    "FREE, low-rank experts rank 4": {
        "method": "free",
        "parameters": FR_PARAMETERS,
        "experts": {"kind": "lowrank", "rank": 4},
    },
}


def _merge_child(zoo: str, config: dict, out: str) -> dict:
    from freemerge.merging.config import parse_config
    from freemerge.merging.merge import run_merge
    from freemerge.serving.engine import process_resident_bytes

    imported = process_resident_bytes()  # the interpreter with torch and transformers
    summary = run_merge(parse_config({"zoo": zoo, **config}), Path(out), show_progress=False)
    artifact = open_artifact(Path(out), verify=False)  # just written
    heads = {t: artifact.path(e["head"]).stat().st_size for t, e in artifact.tasks.items()}
    return {
        "wall_seconds": summary.wall_seconds,
        "peak_rss_bytes": int(summary.peak_rss_mib * 2**20),
        "rss_after_imports_bytes": imported,
        "backbone_bytes": summary.backbone_bytes,
        "per_task_bytes": {t: summary.expert_bytes.get(t, 0) + heads[t] for t in heads},
        "artifact_bytes": sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()),
    }


def merge_costs(zoo: Path, names: list[str], scratch: Path) -> list[dict]:
    """Wall time, peak resident memory and artifact bytes of each merge method, every merge
    in a fresh process (so the peak is that merge's own)."""
    rows = []
    for name in names:
        config = MERGE_METHODS[name]
        out = scratch / name.replace(" ", "_").replace(",", "").replace("%", "")
        measured = run_in_child(_merge_child, str(zoo), config, str(out), timeout=1800)
        row = {
            "name": name,
            "method": config["method"],
            "parameters": config.get("parameters", {}),
            "experts": config.get("experts"),
            **measured,
        }
        rows.append(row)
        print(
            f"  merge {name}: {row['wall_seconds']:.1f} s, "
            f"peak {row['peak_rss_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
    return rows
