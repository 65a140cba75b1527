"""The merge engine: stream tensors from N checkpoints, merge, build experts, write the artifact.

Per shared tensor (one at a time, so peak memory stays near one checkpoint plus a few tensors):
tau_t = theta_t - theta_0; theta_m = method(theta_0, [tau_t]); then, when experts are asked
for, each task's expert takes its part of the residual theta_t - theta_m. Heads (tensors outside
the base model, ``classifier.*``) are never merged: each task keeps its own.
"""

from __future__ import annotations

import json
import re
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from merging.artifact import staged_directory, write_manifest
from merging.checkpoint import Checkpoint, CheckpointError
from merging.config import MergeConfig
from merging.methods import get_method
from merging.router import build_router
from merging.sources import sha256_file

# The runtime reads a task's head as a linear layer on the backbone's pooled output, which is
# what these model types' *ForSequenceClassification do.
POOLER_HEAD_MODEL_TYPES = ("bert",)
HEAD_TENSORS = ("classifier.bias", "classifier.weight")


@dataclass
class MergeSummary:
    out: Path
    wall_seconds: float
    peak_rss_mib: float
    backbone_bytes: int
    expert_bytes: dict[str, int]


def _check_compatible(base: Checkpoint, models: dict[str, Checkpoint]) -> list[str]:
    """Shared float tensor names; raise if any model differs from the base in type or shape."""
    if base.model_type not in POOLER_HEAD_MODEL_TYPES:
        raise CheckpointError(
            f"base model type {base.model_type!r} is not supported; supported: "
            f"{', '.join(POOLER_HEAD_MODEL_TYPES)}"
        )
    shared = [n for n in base.names if not base.is_head(n) and base.is_float(n)]
    for name, model in models.items():
        if model.model_type != base.model_type:
            raise CheckpointError(
                f"model {name}: model type {model.model_type!r} differs from the base's "
                f"{base.model_type!r}"
            )
        heads = sorted(n for n in model.names if model.is_head(n))
        if tuple(heads) != HEAD_TENSORS:
            raise CheckpointError(
                f"model {name}: expected a sequence-classification head {HEAD_TENSORS}, "
                f"found {heads or 'none'}"
            )
        for tensor in shared:
            if tensor not in model.names:
                raise CheckpointError(f"model {name}: lacks tensor {tensor!r} of the base model")
            if model.shape(tensor) != base.shape(tensor):
                raise CheckpointError(
                    f"model {name}: tensor {tensor!r} has shape {model.shape(tensor)}, "
                    f"the base has {base.shape(tensor)}"
                )
    return shared


def _task_energies(
    base: Checkpoint, models: dict[str, Checkpoint], shared: list[str]
) -> list[float]:
    """E(tau_t) = sum over shared tensors of ||theta_t - theta_0||^2, per task."""
    energies = [0.0] * len(models)
    for name in shared:
        theta0 = base.tensor(name)
        for i, model in enumerate(models.values()):
            energies[i] += float(((model.tensor(name) - theta0) ** 2).sum())
    return energies


def _merge_params(config: MergeConfig, name: str, task_weights: list[float] | None) -> dict:
    """The method's parameters for one tensor (fr/free filter only the target matrices)."""
    if config.method == "average":
        return {}
    if config.method == "task_arithmetic":
        return {"scaling": config.lam}
    if config.method == "ties":
        return {"scaling": config.lam, "density": config.ties.density}
    targeted = re.search(config.filter.targets, name) is not None
    return {
        "scaling": config.lam if targeted else config.lam_other,
        "high_pass": config.filter.high_pass() if targeted else None,
        "task_weights": task_weights,
        "magnitude_alignment": config.magnitude_alignment and targeted,
    }


def run_merge(
    config: MergeConfig, out: Path, overwrite: bool = False, show_progress: bool = True
) -> MergeSummary:
    """Merge as ``config`` says and write the artifact to ``out`` (staged, renamed when whole)."""
    start = time.perf_counter()
    base = Checkpoint(config.base_model, "base_model")
    models = {m.name: Checkpoint(m.path, f"model {m.name}") for m in config.models}
    shared = _check_compatible(base, models)
    method = get_method("fr" if config.method == "free" else config.method)
    task_weights = None
    if config.task_weights == "energy":
        energies = _task_energies(base, models, shared)
        task_weights = [e / sum(energies) for e in energies]
    experts = {}
    if config.experts is not None:
        experts = {name: config.experts.make() for name in models}
    merged: dict[str, torch.Tensor] = {}
    removed_energy: dict[str, dict[str, float]] = {}
    for name in tqdm(shared, desc=f"merge ({config.method})", disable=not show_progress):
        theta0 = base.tensor(name)
        # tau_t computed in place: N tensors of this one name are held, never N models.
        taus = [model.tensor(name).sub_(theta0) for model in models.values()]
        stats: dict = {}
        params = _merge_params(config, name, task_weights)
        if config.method in ("fr", "free"):
            params["stats"] = stats
        merged[name] = method(theta0, taus, **params).contiguous()
        if "removed_energy" in stats:
            removed_energy[name] = dict(zip(models, stats["removed_energy"], strict=True))
        if experts:
            shift = merged[name] - theta0  # theta_t - theta_m = tau_t - (theta_m - theta_0)
            for task, tau in zip(models, taus, strict=True):
                experts[task].add(name, tau.sub_(shift))
        del taus

    with staged_directory(out, overwrite) as tmp:
        backbone = tmp / "backbone"
        backbone.mkdir()
        save_file(merged, str(backbone / "model.safetensors"), metadata={"format": "pt"})
        backbone_config = dict(base.config)
        backbone_config["architectures"] = [MODEL_MAPPING_NAMES[base.model_type]]
        (backbone / "config.json").write_text(json.dumps(backbone_config, indent=2))
        AutoTokenizer.from_pretrained(config.base_model).save_pretrained(backbone)
        (tmp / "heads").mkdir()
        (tmp / "experts").mkdir()
        tasks = {}
        for task, model in models.items():
            head = {n: model.tensor(n).contiguous() for n in HEAD_TENSORS}
            save_file(head, str(tmp / "heads" / f"{task}.safetensors"))
            id2label = model.config.get("id2label") or {}
            labels = [
                id2label.get(str(i), f"LABEL_{i}") for i in range(head["classifier.bias"].numel())
            ]
            entry = {
                "labels": labels,
                "head": f"heads/{task}.safetensors",
                "expert": None,
                "expert_bytes": 0,
                "source": str(model.path),
                "source_sha256": sha256_file(model.path / "model.safetensors")
                if (model.path / "model.safetensors").is_file()
                else None,
            }
            if task in experts:
                experts[task].save(tmp / "experts" / f"{task}.safetensors")
                entry["expert"] = f"experts/{task}.safetensors"
                entry["expert_bytes"] = experts[task].nbytes()
            tasks[task] = entry
        router = None
        if config.router is not None:
            router = build_router(config.router, list(models), backbone, tmp)
        (tmp / "filter_report.json").write_text(
            json.dumps(_filter_report(removed_energy), indent=2)
        )
        backbone_bytes = sum(t.numel() * t.element_size() for t in merged.values())
        write_manifest(
            tmp,
            {
                "method": config.method,
                "parameters": config.to_dict(),
                "backbone": {
                    "model_type": base.model_type,
                    "parameters": sum(t.numel() for t in merged.values()),
                    "bytes": backbone_bytes,
                },
                "tasks": tasks,
                "router": router
                and {"file": "router.safetensors", "record": "router.json", **router},
                "sources": {
                    "base_model": str(base.path),
                    "base_model_sha256": sha256_file(base.path / "model.safetensors")
                    if (base.path / "model.safetensors").is_file()
                    else None,
                },
            },
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return MergeSummary(
        out=Path(out),
        wall_seconds=time.perf_counter() - start,
        peak_rss_mib=peak,
        backbone_bytes=backbone_bytes,
        expert_bytes={task: entry["expert_bytes"] for task, entry in tasks.items()},
    )


def _filter_report(removed: dict[str, dict[str, float]]) -> dict:
    """Per filtered matrix and task, the fraction of spectral energy removed; plus task means."""
    tasks = sorted({task for row in removed.values() for task in row})
    means = (
        {t: sum(row[t] for row in removed.values()) / len(removed) for t in tasks}
        if removed
        else {}
    )
    return {"mean_removed_energy": means, "removed_energy": removed}
