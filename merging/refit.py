"""A new router for an existing artifact, without re-merging (``freemerge router fit``).

artifact -> verified -> files linked into a staged folder -> router fitted -> manifest ->
the staged folder replaces the output. The new artifact shares every file but the router and
the manifest with the old one (hard links where the file system allows, else copies), so it
is a new version (the manifest's hash) at the cost of the router alone.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from freemerge.merging.artifact import (
    MANIFEST,
    ArtifactError,
    read_manifest,
    staged_directory,
    verify_artifact,
    write_manifest,
)
from freemerge.merging.router import ROUTER_RECORD, ROUTER_WEIGHTS
from freemerge.merging.router_config import RouterConfig
from freemerge.merging.router_training import build_router

NOT_SHARED = (MANIFEST, ROUTER_WEIGHTS, ROUTER_RECORD)  # written anew, never linked


def router_data(manifest: dict, given: dict[str, str]) -> dict[str, str]:
    """Each task's texts: ``given`` (task -> JSONL file) over the files the artifact's router
    was fitted on; ArtifactError naming a task without texts, an unknown task or a missing
    file."""
    tasks = list(manifest["tasks"])
    unknown = [task for task in given if task not in tasks]
    if unknown:
        raise ArtifactError(f"--data names {unknown[0]!r}, not a task of this artifact ({tasks})")
    previous = ((manifest.get("parameters") or {}).get("router") or {}).get("data") or {}
    data = {task: given.get(task) or previous.get(task) for task in tasks}
    for task, path in data.items():
        if not path:
            raise ArtifactError(
                f"no texts for task {task!r}: give --data {task}=FILE.jsonl (lines of "
                '{"text": ...})'
            )
        if not Path(path).is_file():
            raise ArtifactError(f"texts for task {task!r}: {path} does not exist")
    return data


def _share(source: Path, staged: Path) -> None:
    """Every file of ``source`` but :data:`NOT_SHARED`, hard-linked (or copied) into ``staged``."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_dir() or relative.as_posix() in NOT_SHARED:
            continue
        target = staged / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def refit_router(artifact: Path, config: RouterConfig, out: Path | None = None) -> tuple[dict, str]:
    """Fit a router with ``config`` for the artifact in ``artifact`` and write the artifact
    with it to ``out`` (default: in place, replaced in one step); the fitting figures and the
    new version."""
    artifact = Path(artifact)
    problems = verify_artifact(artifact)
    if problems:
        raise ArtifactError(f"{artifact} does not verify: {problems[0]}")
    manifest = read_manifest(artifact)[0]
    target = Path(out) if out is not None else artifact
    with staged_directory(target, overwrite=out is None) as staged:
        _share(artifact, staged)
        metrics = build_router(config, staged, manifest["tasks"])
        body = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")}
        body["parameters"] = {**body.get("parameters", {}), "router": dataclasses.asdict(config)}
        body["router"] = {"file": ROUTER_WEIGHTS, "record": ROUTER_RECORD, **metrics}
        write_manifest(staged, body)
    return metrics, read_manifest(target)[1]
