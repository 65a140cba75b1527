"""The merge artifact on disk: manifest with hashes, backbone, experts, heads; verify and open.

    DIR/manifest.json            format version, tasks and labels, method and parameters,
                                 sources, sha256 of every other file
    DIR/backbone/                a save_pretrained directory (AutoModel loads it offline)
    DIR/experts/<task>.safetensors
    DIR/heads/<task>.safetensors
    DIR/filter_report.json       per filtered matrix, the spectral energy removed per task

Nothing in an artifact is pickled. The artifact's version is the sha256 of its manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from freemerge.merging.files import replaced_directory, sha256_file

ARTIFACT_FORMAT = "freemerge-artifact"
ARTIFACT_VERSION = 1


class ArtifactError(ValueError):
    """An artifact that is missing, incomplete, of another format, or altered."""


@contextmanager
def staged_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` only if the block succeeds.
    An existing ``out`` is an error unless ``overwrite``."""
    if Path(out).exists() and not overwrite:
        raise ArtifactError(f"output {out} already exists; choose another path or overwrite it")
    with replaced_directory(out) as tmp:
        yield tmp


def hash_files(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the manifest, by relative POSIX path."""
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }


def write_manifest(root: Path, manifest: dict) -> None:
    manifest = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION, **manifest}
    manifest["files"] = hash_files(root)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


@dataclass
class Artifact:
    root: Path
    manifest: dict
    version: str  # sha256 of manifest.json

    @property
    def tasks(self) -> dict[str, dict]:
        return self.manifest["tasks"]

    @property
    def backbone(self) -> Path:
        return self.root / "backbone"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def task(self, name: str) -> dict:
        if name not in self.tasks:
            raise ArtifactError(
                f"unknown task {name!r}; this artifact has: {', '.join(self.tasks)}"
            )
        return self.tasks[name]


def read_manifest(root: Path) -> tuple[dict, str]:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"{root} is not an artifact: {path} is missing")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON: {err}") from None
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path}: not a {ARTIFACT_FORMAT} manifest")
    if manifest.get("format_version") != ARTIFACT_VERSION:
        raise ArtifactError(
            f"{path}: format version {manifest.get('format_version')}, "
            f"this freemerge reads version {ARTIFACT_VERSION}"
        )
    return manifest, hashlib.sha256(raw).hexdigest()


def verify_artifact(root: Path) -> list[str]:
    """Problems found: files missing, altered (hash mismatch) or not listed; empty when intact."""
    return _problems(Path(root), read_manifest(root)[0])


def _problems(root: Path, manifest: dict) -> list[str]:
    """:func:`verify_artifact` against a manifest already read."""
    expected: dict[str, str] = manifest.get("files", {})
    actual = hash_files(root)
    problems = [f"missing file: {name}" for name in sorted(set(expected) - set(actual))]
    problems += [
        f"altered file: {name} (sha256 {actual[name]}, manifest says {expected[name]})"
        for name in sorted(set(expected) & set(actual))
        if actual[name] != expected[name]
    ]
    problems += [f"file not in manifest: {name}" for name in sorted(set(actual) - set(expected))]
    return problems


def open_artifact(root: Path, verify: bool = True) -> Artifact:
    """Open an artifact; by default every file's hash is checked first."""
    root = Path(root)
    manifest, version = read_manifest(root)
    if verify:
        problems = _problems(root, manifest)
        if problems:
            raise ArtifactError(f"artifact {root} failed verification:\n  " + "\n  ".join(problems))
    return Artifact(root, manifest, version)
