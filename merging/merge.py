"""The merge: stream tensors from N checkpoints, merge, build experts, write the artifact.

Per shared tensor (one at a time, so peak memory stays near one checkpoint plus a few tensors):
tau_t = theta_t - theta_0; theta_m = method(theta_0, [tau_t]); then, when the method or the
config asks for experts, each task's expert takes its part of the residual theta_t - theta_m.
Heads (the tensors outside the base model) are never merged: each task keeps its own, with
its own config. What differs by architecture comes from :mod:`freemerge.merging.families`.
The artifact is written to a temporary folder and renamed into place when whole.
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

from freemerge.merging.artifact import staged_directory, write_manifest
from freemerge.merging.checkpoint import Checkpoint, CheckpointError
from freemerge.merging.config import MergeConfig
from freemerge.merging.experts import Expert
from freemerge.merging.families import (
    FamilyError,
    TaskHead,
    backbone_config_differences,
    config_from_dict,
    family_of,
    head_tensor_names,
    layer_matrices,
    linear_weights,
    skeleton,
)
from freemerge.merging.files import sha256_file
from freemerge.merging.filters import HighPass
from freemerge.merging.kind_rules import EMBEDDING, scoring_of, takes_pairs
from freemerge.merging.kinds import (
    KindError,
    backbone_tensors,
    embedding_settings,
    head_class,
    kind_of_model,
)
from freemerge.merging.methods import get_method
from freemerge.merging.router_training import build_router


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
    """The shared float tensors: those of the family's backbone that ``base`` holds.
    CheckpointError if ``base`` is of no supported family, or a model is not a task of a
    served kind (:mod:`freemerge.merging.kinds`) of the same family, backbone settings and
    tensor shapes as ``base`` (``reference`` in messages). Base tensors the family's
    classifiers do not hold (a pooler that their heads replace) are left out."""
    try:
        config = config_from_dict(base.config)
    except FamilyError as err:
        raise CheckpointError(f"{base.label}: {err}") from None
    backbone = set(skeleton(config).state_dict())
    shared = [n for n in base.names if n in backbone and base.is_float(n)]
    for name, model in models.items():
        if model.model_type != base.model_type:
            raise CheckpointError(
                f"model {name}: model type {model.model_type!r} differs from {reference}'s "
                f"{base.model_type!r}; one merge holds models of one family"
            )
        differs = backbone_config_differences(base.config, model.config)
        if differs:
            raise CheckpointError(
                f"model {name}: its backbone settings differ from {reference}'s: "
                + "; ".join(
                    f"{key} is {model.config[key]!r} where {reference} has {base.config[key]!r}"
                    for key in differs[:3]
                )
            )
        kind = model_kind(name, model)
        _check_head(name, model, kind)
        _check_tensors(name, model, base, shared, backbone, reference, kind)
    return shared


def model_kind(name: str, model: Checkpoint) -> str:
    """``model``'s task kind; CheckpointError naming the model when it has none served."""
    try:
        return kind_of_model(model.path, model.config)
    except KindError as err:
        raise CheckpointError(f"model {name}: {err}") from None


def _check_head(name: str, model: Checkpoint, kind: str) -> None:
    """CheckpointError unless ``model``'s tensors outside its backbone are its family's head
    of its kind for its labels (an embedding model has none)."""
    heads = sorted(n for n in model.names if model.is_head(n))
    config = config_from_dict(model.config)
    cls = head_class(kind, config)
    expected = sorted(head_tensor_names(config, cls)) if cls else []
    if heads != expected:
        what = f"a {kind} head {expected}" if cls else "no head (an embedding model)"
        raise CheckpointError(f"model {name}: expected {what}, found {heads or 'none'}")


def _check_tensors(
    name: str,
    model: Checkpoint,
    base: Checkpoint,
    shared: list[str],
    backbone: set[str],
    reference: str,
    kind: str,
) -> None:
    """CheckpointError unless ``model`` holds every shared tensor its kind's class holds
    (BERT's token classifiers hold no pooler) in its shape, and no backbone tensor that
    ``base`` lacks (it would have nothing to merge with)."""
    held = backbone_tensors(kind, config_from_dict(model.config))
    for tensor in shared:
        if tensor not in model.names and tensor not in held:
            continue  # taken as the base's (a task vector of zero): its head never reads it
        if tensor not in model.names:
            raise CheckpointError(f"model {name}: lacks tensor {tensor!r} of {reference}")
        if model.shape(tensor) != base.shape(tensor):
            raise CheckpointError(
                f"model {name}: tensor {tensor!r} has shape {model.shape(tensor)}, "
                f"{reference} has {base.shape(tensor)}"
            )
    extra = [n for n in model.names if n in backbone and model.is_float(n) and n not in base.names]
    if extra:
        raise CheckpointError(f"model {name}: has tensor {extra[0]!r}, which {reference} lacks")


def module_targets(base: Checkpoint, shared: list[str]) -> tuple[frozenset, frozenset]:
    """The shared matrices by module type: every ``nn.Linear`` weight of the backbone (what
    low-rank experts factor), and those inside the encoder's blocks (the filter's default)."""
    model = skeleton(config_from_dict(base.config))
    held = set(shared)
    return (
        frozenset(n for n in linear_weights(model) if n in held),
        frozenset(n for n in layer_matrices(model) if n in held),
    )


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


def check_filter_targets(params: dict, shared: list[str], layers: frozenset[str]) -> None:
    """CheckpointError when a filter's ``targets`` regex matches none of the shared matrices,
    or (``targets`` unset) the family's blocks hold no linear layer: the filter would filter
    nothing, and the merge would silently be task arithmetic."""
    for value in params.values():
        if not isinstance(value, HighPass):
            continue
        if value.targets is None and not layers:
            raise CheckpointError("the filter found no linear layer in the model's blocks")
        if value.targets is not None and not any(value.targets_tensor(n) for n in shared):
            example = ", ".join(sorted(layers)[:3])
            raise CheckpointError(
                f"filter.targets {value.targets!r} matches no tensor of this model; its layer "
                f"matrices are named like {example} (leave targets out to filter all of them)"
            )


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
    linear, layers = module_targets(base, shared)
    check_filter_targets(params, shared, layers)
    if params.get("task_weights") == "energy":  # needs every checkpoint before the first tensor
        params["task_weights"] = energy_weights(base, models, shared)
    merged = Merged()
    if config.experts is not None:
        merged.experts = {
            name: config.experts.make(model_kind(name, model)) for name, model in models.items()
        }
    for name in tqdm(shared, desc=f"merge ({config.method})", disable=not show_progress):
        theta0 = base.tensor(name)
        # tau_t computed in place: N tensors of this one name are held, never N models.
        taus = [task_vector(model, name, theta0) for model in models.values()]
        stats: dict = {}
        merged.tensors[name] = method(
            theta0, taus, name=name, stats=stats, matrices=layers, **params
        ).contiguous()
        if "removed_energy" in stats:
            merged.removed_energy[name] = dict(zip(models, stats["removed_energy"], strict=True))
        if merged.experts:
            shift = merged.tensors[name] - theta0  # theta_t - theta_m = tau_t - (theta_m - theta_0)
            for task, tau in zip(models, taus, strict=True):
                merged.experts[task].add(name, tau.sub_(shift), name in linear)
        del taus
    return merged


def task_vector(model: Checkpoint, name: str, theta0: torch.Tensor) -> torch.Tensor:
    """theta_t - theta_0 for tensor ``name``; zero when the model's kind does not hold it."""
    if name not in model.names:
        return torch.zeros_like(theta0)
    return model.tensor(name).sub_(theta0)


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
    backbone_config["architectures"] = [family_of(base.model_type).backbone_class_name]
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
                # base tensors the family's classifiers do not hold (not in the backbone)
                "left_out": sorted(
                    n
                    for n in base.names
                    if base.is_float(n) and not base.is_head(n) and n not in merged.tensors
                ),
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
    kind = model_kind(task, model)
    (tmp / "heads" / f"{task}.json").write_text(json.dumps(model.config, indent=2))
    entry = {
        "task_kind": kind,
        "text_pairs": takes_pairs(kind, model.config),
        **_head_entry(task, model, kind, tmp),
        "config": f"heads/{task}.json",
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


def _head_entry(task: str, model: Checkpoint, kind: str, tmp: Path) -> dict:
    """Write the task's head (none for an embedding); its labels, head file, scoring and (an
    embedding task) its pooling settings, for the manifest."""
    config = config_from_dict(model.config)
    if kind == EMBEDDING:
        try:
            settings = embedding_settings(model.path, config.hidden_size)
        except (KindError, OSError, ValueError) as err:
            raise CheckpointError(f"model {task}: {err}") from None
        return {"labels": [], "head": None, "scoring": None, "embedding": settings}
    head = {n: model.tensor(n).contiguous() for n in model.names if model.is_head(n)}
    try:  # the head as the runtime will build it: shapes checked before anything is written
        labels = TaskHead(config, head, torch.device("cpu"), head_class(kind, config)).labels
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"model {task}: its head does not load: {err}") from None
    save_file(head, str(tmp / "heads" / f"{task}.safetensors"))
    return {
        "labels": labels,
        "head": f"heads/{task}.safetensors",
        "scoring": scoring_of(kind, model.config),
    }


def _filter_report(removed: dict[str, dict[str, float]]) -> dict:
    """Per filtered matrix and task, the fraction of spectral energy removed; plus task means."""
    tasks = sorted({task for row in removed.values() for task in row})
    means = (
        {t: sum(row[t] for row in removed.values()) / len(removed) for t in tasks}
        if removed
        else {}
    )
    return {"mean_removed_energy": means, "removed_energy": removed}
