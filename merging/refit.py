"""A new router for an existing artifact, without re-merging (``freemerge router fit``), and
the way every such edit writes a new artifact version (also ``add-task``, ``remove-task``).

artifact -> verified -> files linked into a staged folder -> the edit's files written (here:
the router) -> manifest -> the staged folder replaces the output. The new artifact shares every
file the edit leaves alone with the old one (hard links where the file system allows, else
copies), so it is a new version (the manifest's hash) at the cost of the changed files alone.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from freemerge.merging.artifact import (
    MANIFEST,
    ArtifactError,
    check_manifest_paths,
    read_manifest,
    staged_directory,
    verify_artifact,
    write_manifest,
)
from freemerge.merging.router import ROUTER_RECORD, ROUTER_WEIGHTS
from freemerge.merging.router_config import RouterConfig
from freemerge.merging.router_training import build_router

NOT_SHARED = (MANIFEST, ROUTER_WEIGHTS, ROUTER_RECORD)  # written anew, never linked
Result = TypeVar("Result")


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


def _share(source: Path, staged: Path, dropped: set[str]) -> None:
    """Every file of ``source`` but those in ``dropped`` (relative POSIX paths), hard-linked
    (or copied) into ``staged``."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_dir() or relative.as_posix() in dropped:
            continue
        target = staged / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def verified_manifest(artifact: Path) -> dict:
    """The manifest of the artifact in ``artifact``; ArtifactError unless it verifies."""
    problems = verify_artifact(Path(artifact))
    if problems:
        raise ArtifactError(f"{artifact} does not verify: {problems[0]}")
    return read_manifest(Path(artifact))[0]


def write_version(
    artifact: Path,
    manifest: dict,
    edit: Callable[[Path, dict], Result],
    out: Path | None = None,
    dropped: Iterable[str] = (),
) -> tuple[Result, str]:
    """Write a new version of the artifact in ``artifact`` (``manifest``: its verified
    manifest) to ``out`` (default: in place, replaced in one step): every file but ``dropped``
    and :data:`NOT_SHARED` is shared (so an edit of an artifact with a router must fit one),
    then ``edit(staged, body)`` writes its files and changes ``body`` (the manifest less its
    format and hashes). What ``edit`` returns, and the new version."""
    artifact = Path(artifact)
    target = Path(out) if out is not None else artifact
    body = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")}
    with staged_directory(target, overwrite=out is None) as staged:
        _share(artifact, staged, {*NOT_SHARED, *dropped})
        result = edit(staged, body)
        write_manifest(staged, body)
        written, version = read_manifest(staged)
        check_manifest_paths(staged, written)  # names only files written
    return result, version


def fit_router_into(staged: Path, body: dict, config: RouterConfig) -> dict:
    """Fit a router with ``config`` for the tasks of ``body`` (a manifest being written in
    ``staged``), save it there and record it in ``body``; the fitting figures."""
    metrics = build_router(config, staged, body["tasks"])
    body["parameters"] = {**(body.get("parameters") or {}), "router": dataclasses.asdict(config)}
    body["router"] = {"file": ROUTER_WEIGHTS, "record": ROUTER_RECORD, **metrics}
    return metrics


def refit_router(artifact: Path, config: RouterConfig, out: Path | None = None) -> tuple[dict, str]:
    """Fit a router with ``config`` for the artifact in ``artifact`` and write the artifact
    with it to ``out`` (default: in place, replaced in one step); the fitting figures and the
    new version."""
    manifest = verified_manifest(artifact)
    return write_version(
        artifact, manifest, lambda staged, body: fit_router_into(staged, body, config), out
    )
