"""The merge: stream tensors from N checkpoints, merge, build experts, write the artifact.

Per shared tensor (one at a time, so peak memory stays near one checkpoint plus a few tensors):
tau_t = theta_t - theta_0; theta_m = method(theta_0, [tau_t]); then, when the method or the
config asks for experts, each task's expert takes its part of the residual theta_t - theta_m.
Heads (tensors outside the base model, ``classifier.*``) are never merged: each task keeps its
own. The artifact is written to a temporary folder and renamed into place when whole.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from freemerge.merging.artifact import staged_directory, write_manifest
from freemerge.merging.checkpoint import Checkpoint, CheckpointError
from freemerge.merging.config import MergeConfig
from freemerge.merging.experts import Expert
from freemerge.merging.files import sha256_file
from freemerge.merging.methods import get_method
from freemerge.merging.router_training import build_router

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


@dataclass
class Merged:
    """What the tensor loop produces: the backbone, the experts and the filter's record."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    experts: dict[str, Expert] = field(default_factory=dict)
    removed_energy: dict[str, dict[str, float]] = field(default_factory=dict)


def check_compatible(
    base: Checkpoint, models: dict[str, Checkpoint], reference: str = "the base"
) -> list[str]:
    """Shared float tensor names; CheckpointError if a model is not a sequence classifier or
    differs from ``base`` (``reference`` in messages) in type or in a tensor's shape."""
    if base.model_type not in POOLER_HEAD_MODEL_TYPES:
        raise CheckpointError(
            f"base model type {base.model_type!r} is not supported; supported: "
            f"{', '.join(POOLER_HEAD_MODEL_TYPES)}"
        )
    shared = [n for n in base.names if not base.is_head(n) and base.is_float(n)]
    for name, model in models.items():
        if model.model_type != base.model_type:
            raise CheckpointError(
                f"model {name}: model type {model.model_type!r} differs from {reference}'s "
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
                raise CheckpointError(f"model {name}: lacks tensor {tensor!r} of {reference}")
            if model.shape(tensor) != base.shape(tensor):
                raise CheckpointError(
                    f"model {name}: tensor {tensor!r} has shape {model.shape(tensor)}, "
                    f"{reference} has {base.shape(tensor)}"
                )
    return shared


def energy_weights(
    base: Checkpoint, models: dict[str, Checkpoint], shared: list[str]
) -> list[float]:
    """w_t = E(tau_t) / sum_s E(tau_s), E = sum over shared tensors of ||theta_t - theta_0||^2."""
    energies = [0.0] * len(models)
    for name in shared:
        theta0 = base.tensor(name)
        for i, model in enumerate(models.values()):
            energies[i] += float(((model.tensor(name) - theta0) ** 2).sum())
    return [e / sum(energies) for e in energies]


def merge_tensors(
    config: MergeConfig,
    base: Checkpoint,
    models: dict[str, Checkpoint],
    shared: list[str],
    show_progress: bool,
) -> Merged:
    """The tensor loop: theta_m per shared tensor, and each task's expert from its residual."""
    method = get_method(config.method)
    params = dict(config.parameters)
    if params.get("task_weights") == "energy":  # needs every checkpoint before the first tensor
        params["task_weights"] = energy_weights(base, models, shared)
    merged = Merged()
    if config.experts is not None:
        merged.experts = {name: config.experts.make() for name in models}
    for name in tqdm(shared, desc=f"merge ({config.method})", disable=not show_progress):
        theta0 = base.tensor(name)
        # tau_t computed in place: N tensors of this one name are held, never N models.
        taus = [model.tensor(name).sub_(theta0) for model in models.values()]
        stats: dict = {}
        merged.tensors[name] = method(theta0, taus, name=name, stats=stats, **params).contiguous()
        if "removed_energy" in stats:
            merged.removed_energy[name] = dict(zip(models, stats["removed_energy"], strict=True))
        if merged.experts:
            shift = merged.tensors[name] - theta0  # theta_t - theta_m = tau_t - (theta_m - theta_0)
            for task, tau in zip(models, taus, strict=True):
                merged.experts[task].add(name, tau.sub_(shift))
        del taus
    return merged


def run_merge(
    config: MergeConfig, out: Path, overwrite: bool = False, show_progress: bool = True
) -> MergeSummary:
    """Merge as ``config`` says and write the artifact to ``out`` (staged, renamed when whole)."""
    start = time.perf_counter()
    base = Checkpoint(config.base_model, "base_model")
    models = {m.name: Checkpoint(m.path, f"model {m.name}") for m in config.models}
    shared = check_compatible(base, models)
    merged = merge_tensors(config, base, models, shared, show_progress)
    with staged_directory(out, overwrite) as tmp:
        tasks = _write_artifact(config, base, models, merged, tmp)
    return MergeSummary(
        out=Path(out),
        wall_seconds=time.perf_counter() - start,
        peak_rss_mib=peak_rss_mib(),
        backbone_bytes=_nbytes(merged.tensors),
        expert_bytes={task: entry["expert_bytes"] for task, entry in tasks.items()},
    )


def peak_rss_mib() -> float:
    """Peak resident memory of this process image in MiB: Linux's VmHWM, which starts afresh
    at exec (``ru_maxrss`` carries a forking parent's size into a spawned child)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _source_hash(path: Path) -> str | None:
    weights = path / "model.safetensors"
    return sha256_file(weights) if weights.is_file() else None


def _write_artifact(
    config: MergeConfig, base: Checkpoint, models: dict[str, Checkpoint], merged: Merged, tmp: Path
) -> dict[str, dict]:
    """Backbone, heads, experts, router, filter report and manifest into ``tmp``."""
    backbone = tmp / "backbone"
    backbone.mkdir()
    save_file(merged.tensors, str(backbone / "model.safetensors"), metadata={"format": "pt"})
    backbone_config = dict(base.config)
    backbone_config["architectures"] = [MODEL_MAPPING_NAMES[base.model_type]]
    (backbone / "config.json").write_text(json.dumps(backbone_config, indent=2))
    AutoTokenizer.from_pretrained(config.base_model).save_pretrained(backbone)
    (tmp / "heads").mkdir()
    (tmp / "experts").mkdir()
    tasks = {
        task: write_task(task, model, merged.experts.get(task), tmp)
        for task, model in models.items()
    }
    router = None
    if config.router is not None:
        router = build_router(config.router, tmp, tasks)
    (tmp / "filter_report.json").write_text(
        json.dumps(_filter_report(merged.removed_energy), indent=2)
    )
    write_manifest(
        tmp,
        {
            "method": config.method,
            "parameters": config.to_dict(),
            "backbone": {
                "model_type": base.model_type,
                "parameters": sum(t.numel() for t in merged.tensors.values()),
                "bytes": _nbytes(merged.tensors),
            },
            "tasks": tasks,
            "router": router and {"file": "router.safetensors", "record": "router.json", **router},
            "sources": {"base_model": str(base.path), "base_model_sha256": _source_hash(base.path)},
        },
    )
    return tasks


def write_task(task: str, model: Checkpoint, expert: Expert | None, tmp: Path) -> dict:
    """Write one task's head (and expert) into the artifact being written in ``tmp``, whose
    ``heads`` and ``experts`` folders must exist; the task's manifest entry."""
    head = {n: model.tensor(n).contiguous() for n in HEAD_TENSORS}
    save_file(head, str(tmp / "heads" / f"{task}.safetensors"))
    id2label = model.config.get("id2label") or {}
    labels = [id2label.get(str(i), f"LABEL_{i}") for i in range(head["classifier.bias"].numel())]
    entry = {
        "labels": labels,
        "head": f"heads/{task}.safetensors",
        "expert": None,
        "expert_bytes": 0,
        "source": str(model.path),
        "source_sha256": _source_hash(model.path),
    }
    if expert is not None:
        expert.save(tmp / "experts" / f"{task}.safetensors")
        entry["expert"] = f"experts/{task}.safetensors"
        entry["expert_bytes"] = expert.nbytes()
    return entry


def _filter_report(removed: dict[str, dict[str, float]]) -> dict:
    """Per filtered matrix and task, the fraction of spectral energy removed; plus task means."""
    tasks = sorted({task for row in removed.values() for task in row})
    means = (
        {t: sum(row[t] for row in removed.values()) / len(removed) for t in tasks}
        if removed
        else {}
    )
    return {"mean_removed_energy": means, "removed_energy": removed}
