"""A task added to an artifact, or removed from it, without re-merging (``freemerge add-task``,
``freemerge remove-task``).

add: the model is checked against the artifact's merged backbone theta_m (same model type, a
sequence-classification head, every shared tensor of the same shape, and fine-tuned from the
same base: ||theta_T - theta_m|| / ||theta_m|| at most :data:`MAX_DISTANCE`); its expert is
built from the residual theta_T - theta_m, tensor by tensor as the merge builds every expert,
with the kind and settings of the artifact's experts; its head and labels are copied as the
merge copies them. The backbone itself is left as it is: unlike a re-merge, the new task
shapes nothing but its own expert and head. remove: the task's head and expert are left out.

Either way the router, if the artifact has one, is fitted again over the new set of tasks with
the artifact's own router settings (each task's texts from the manifest, a new task's from the
file given), and a new version is written that shares every other file with the old one
(:func:`freemerge.merging.refit.write_version`): in place in one step, or to a new folder.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from freemerge.merging.artifact import ArtifactError
from freemerge.merging.checkpoint import Checkpoint, CheckpointError
from freemerge.merging.experts import Expert, expert_settings, load_expert, make_expert
from freemerge.merging.kind_rules import SINGLE_LABEL
from freemerge.merging.merge import check_compatible, model_kind, module_targets, write_task
from freemerge.merging.refit import fit_router_into, router_data, verified_manifest, write_version
from freemerge.merging.router_config import RouterConfig

# A task name becomes a file name (heads/<task>.safetensors). The merge config allows
# [A-Za-z0-9_.-]+ (merging/config.py); a task added later must also start with a letter or
# digit (no hidden file, nothing read as an option) and fit in 64 characters.
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# The relative distance ||theta_T - theta_m|| / ||theta_m|| over the shared tensors, measured
# against the merged backbones of the cached artifacts: models fine-tuned from the artifact's
# base model 0.014-0.016 (full zoo: MiniLM-L6-H384, 6 tasks, each of 4 FREE artifacts) and
# 0.017-0.026 (the tests' tiny zoo: 2-layer, 32-wide BERT, 3 tasks); the base model itself
# 0.011-0.013; a model of the very same config with fresh random weights 1.05 (full) and 1.20
# (tiny). 0.2 lies 8 times above the largest fine-tuned distance and 5 times below the
# smallest unrelated one.
MAX_DISTANCE = 0.2


@dataclass
class TaskEdit:
    """What an add or a remove wrote: the artifact's tasks now (sorted, as its manifest lists
    them; the router's record keeps them in the order it was fitted), the new version, the router's
    fitting figures (None: the artifact has no router); for an add, the model's relative
    distance from the merged backbone and its expert's size."""

    tasks: list[str]
    version: str
    router: dict | None
    distance: float | None = None
    expert_bytes: int = 0


def check_task_name(name: object) -> str:
    """``name`` if it may name a task (it becomes a file name); ArtifactError otherwise."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise ArtifactError(
            f"task name {name!r} is not allowed: 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def relative_distance(backbone: Checkpoint, model: Checkpoint, shared: list[str]) -> float:
    """||theta_T - theta_m|| / ||theta_m|| over the ``shared`` tensors, read one at a time."""
    difference = norm = 0.0
    for name in shared:
        merged = backbone.tensor(name).to(torch.float64)
        difference += float((model.tensor(name).to(torch.float64) - merged).square().sum())
        norm += float(merged.square().sum())
    return math.sqrt(difference / norm) if norm else math.inf


def _typed(value: str, default: object) -> object:
    """A setting as stored in a file's metadata (a string), as the type of its default."""
    if isinstance(default, bool):
        return value == "True"
    if isinstance(default, int | float):
        return type(default)(value)
    return value


def _reference_expert(manifest: dict, task_kind: str) -> str | None:
    """The expert file whose settings a new task's expert copies: one of a task of the same
    kind (the merge config may give kinds their own settings), else any task's."""
    entries = [e for e in manifest["tasks"].values() if e.get("expert")]
    same = [e for e in entries if e.get("task_kind", SINGLE_LABEL) == task_kind]
    return (same or entries or [{"expert": None}])[0]["expert"]


def expert_like(path: Path) -> Expert:
    """A new, empty expert of the kind and settings of the saved expert at ``path``."""
    saved = load_expert(path).settings
    settings = dict(saved)
    kind = settings.pop("kind")
    defaults = expert_settings(kind)
    try:
        expert = make_expert(kind, **{k: _typed(v, defaults.get(k)) for k, v in settings.items()})
    except (TypeError, ValueError) as err:
        raise ArtifactError(
            f"{path}: its expert settings {saved} cannot be rebuilt: {err}"
        ) from None
    if expert.settings != saved:
        raise ArtifactError(f"{path}: expert settings {saved} rebuilt as {expert.settings}")
    return expert


def build_expert(
    expert: Expert, backbone: Checkpoint, model: Checkpoint, shared: list[str]
) -> Expert:
    """``expert`` fed each shared tensor's residual theta_T - theta_m, as the merge does."""
    linear, _ = module_targets(backbone, shared)
    for name in shared:
        residual = model.tensor(name).to(torch.float32) - backbone.tensor(name).float()
        expert.add(name, residual, name in linear)
    return expert


def _router_config(manifest: dict, tasks: list[str], given: dict[str, str]) -> RouterConfig | None:
    """The artifact's own router settings, with each of ``tasks``'s texts (``given`` over the
    manifest's); None when the artifact has no router."""
    if not manifest.get("router"):
        return None
    stored = (manifest.get("parameters") or {}).get("router")
    if not isinstance(stored, dict):
        raise ArtifactError(
            "the artifact's router is fitted again over the new tasks, but its manifest records "
            "no router settings (parameters.router); fit one with `freemerge router fit` first"
        )
    try:
        data = router_data({**manifest, "tasks": dict.fromkeys(tasks)}, given)
    except ArtifactError as err:
        raise ArtifactError(
            f"{err} (the router is fitted again over every task; give other texts with "
            "`freemerge router fit --data` first)"
        ) from None
    try:
        return RouterConfig(**{**stored, "data": data})
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"the artifact's router settings (parameters.router): {err}") from None


def _new_task_texts(manifest: dict, name: str, texts: Path | None) -> dict[str, str]:
    """``{name: texts}`` for the router, checked; empty when the artifact has no router."""
    if not manifest.get("router"):
        return {}
    if texts is None:
        raise ArtifactError(
            f"this artifact has a router, fitted again with task {name!r}: give --router-data "
            'FILE.jsonl, the task\'s texts (one {"text": ...} a line)'
        )
    if not Path(texts).is_file():
        raise ArtifactError(f"texts for task {name!r}: {texts} does not exist")
    return {name: str(Path(texts).resolve())}


def _checked_model(
    artifact: Path, name: str, model: Path, max_distance: float
) -> tuple[Checkpoint, Checkpoint, list[str], float]:
    """The backbone's and the model's checkpoints, their shared tensors and the distance;
    CheckpointError for a model of another architecture or fine-tuned from another base."""
    backbone = Checkpoint(Path(artifact) / "backbone", "the artifact's backbone")
    checkpoint = Checkpoint(Path(model).resolve(), f"model {name}")
    shared = check_compatible(backbone, {name: checkpoint}, reference="the artifact")
    distance = relative_distance(backbone, checkpoint, shared)
    if distance > max_distance:
        raise CheckpointError(
            f"model {name}: its weights lie {distance:.3f} (relative distance) from the "
            f"artifact's merged backbone, over the {max_distance} of a model fine-tuned from "
            "the artifact's base model; it was fine-tuned from another base"
        )
    return backbone, checkpoint, shared, distance


def add_task(
    artifact: Path,
    name: str,
    model: Path,
    texts: Path | None = None,
    out: Path | None = None,
    max_distance: float = MAX_DISTANCE,
) -> TaskEdit:
    """Add task ``name`` from the fine-tuned ``model`` to the artifact in ``artifact``, its
    expert built against the merged backbone and the router (if any) fitted again with the
    task's ``texts``; written to ``out`` (default: in place, replaced in one step)."""
    manifest = verified_manifest(artifact)
    check_task_name(name)
    if name in manifest["tasks"]:
        raise ArtifactError(f"task {name!r} is already in the artifact (remove it first)")
    tasks = [*manifest["tasks"], name]
    router = _router_config(manifest, tasks, _new_task_texts(manifest, name, texts))
    backbone, checkpoint, shared, distance = _checked_model(artifact, name, model, max_distance)
    reference = _reference_expert(manifest, model_kind(name, checkpoint))

    def edit(staged: Path, body: dict) -> tuple[dict | None, int]:
        expert = None
        if reference is not None:
            expert = expert_like(Path(artifact) / reference)
            build_expert(expert, backbone, checkpoint, shared)
        for folder in ("heads", "experts"):
            (staged / folder).mkdir(exist_ok=True)
        body["tasks"] = {**body["tasks"], name: write_task(name, checkpoint, expert, staged)}
        return router and fit_router_into(staged, body, router), body["tasks"][name]["expert_bytes"]

    (metrics, size), version = write_version(artifact, manifest, edit, out)
    return TaskEdit(sorted(tasks), version, metrics, distance, size)


def remove_task(artifact: Path, name: str, out: Path | None = None) -> TaskEdit:
    """Remove task ``name`` (its head and expert) from the artifact in ``artifact``, the router
    (if any) fitted again over the other tasks; written to ``out`` (default: in place)."""
    manifest = verified_manifest(artifact)
    entries = manifest["tasks"]
    if name not in entries:
        raise ArtifactError(f"unknown task {name!r}; this artifact has: {', '.join(entries)}")
    if len(entries) == 1:
        raise ArtifactError(f"{name!r} is the artifact's only task; an artifact keeps at least one")
    tasks = [task for task in entries if task != name]
    router = _router_config(manifest, tasks, {})
    files = ("head", "expert", "config")
    kept = {entries[t].get(key) for t in tasks for key in files}
    dropped = {entries[name].get(key) for key in files} - kept - {None}

    def edit(staged: Path, body: dict) -> dict | None:
        body["tasks"] = {task: entries[task] for task in tasks}
        return router and fit_router_into(staged, body, router)

    metrics, version = write_version(artifact, manifest, edit, out, dropped)
    return TaskEdit(sorted(tasks), version, metrics)
