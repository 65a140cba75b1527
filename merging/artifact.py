"""The merge artifact on disk: manifest with hashes, backbone, experts, heads; verify and open.

    DIR/manifest.json            format version, tasks and labels, method and parameters,
                                 sources, sha256 of every other file
    DIR/backbone/                a save_pretrained directory (AutoModel loads it offline)
    DIR/experts/<task>.safetensors
    DIR/heads/<task>.safetensors
    DIR/filter_report.json       per filtered matrix, the spectral energy removed per task

Nothing in an artifact is pickled. The artifact's version is the sha256 of its manifest.

Every path the manifest names is relative, ``/``-separated, without ``..``, and stays inside
the artifact (symlinks followed); a symlink in the artifact may only lead to a file inside it.
:func:`open_artifact` verifies by copying the artifact into a private snapshot, hashing each
file from the very bytes it writes, and hands out the snapshot: what is loaded is what was
verified, whatever happens to the original folder afterwards. Files under a *deferred* folder
(a server's ``experts/``, read on demand) are hard-linked into the snapshot instead (copied
where links fail) and hashed when read, by :meth:`Artifact.read_verified`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

from freemerge.merging.files import (
    owned_tempdir,
    replaced_directory,
    sha256_file,
    stale_folders,
)

ARTIFACT_FORMAT = "freemerge-artifact"
ARTIFACT_VERSION = 1
MANIFEST = "manifest.json"
EXPERTS_FOLDER = "experts"  # a server reads these files on demand
SNAPSHOT_PREFIX = "freemerge-snapshot"
_VERSION_PREFIX = re.compile(r"[0-9a-f]{12,64}")


class ArtifactError(ValueError):
    """An artifact that is missing, incomplete, of another format, altered, or unsafe."""


@contextmanager
def staged_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` only if the block succeeds.
    An existing ``out`` is an error unless ``overwrite``."""
    if Path(out).exists() and not overwrite:
        raise ArtifactError(f"output {out} already exists; choose another path or overwrite it")
    with replaced_directory(out) as tmp:
        yield tmp


def _checked_name(name: object) -> str:
    """``name`` if it is a plain relative POSIX path; ArtifactError otherwise."""
    unsafe = (
        not isinstance(name, str)
        or not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or bool(PureWindowsPath(name).drive)
        or any(part in ("", ".", "..") for part in name.split("/"))
    )
    if unsafe:
        raise ArtifactError(
            f"unsafe path in artifact: {name!r} (a path must be relative, '/'-separated, "
            "without '.', '..' or empty parts)"
        )
    return name


def _inside(root: Path, name: str) -> Path:
    """``root / name``, once ``name`` is checked and resolves (symlinks followed) inside."""
    path = Path(root) / _checked_name(name)
    real_root, resolved = Path(root).resolve(), path.resolve()
    if not resolved.is_relative_to(real_root):
        raise ArtifactError(f"unsafe path in artifact: {name!r} leads to {resolved}, outside it")
    return path


def _symlinked_file(real_root: Path, name: str, link: Path) -> Path:
    """Where the symlink ``link`` leads, if that is a file inside ``real_root``."""
    target = link.resolve()
    if not target.is_relative_to(real_root):
        raise ArtifactError(
            f"unsafe path in artifact: symlink {name} leads to {target}, outside it"
        )
    if not target.is_file():
        raise ArtifactError(f"unsafe path in artifact: symlink {name} leads to a folder")
    return target


def _artifact_files(root: Path) -> list[tuple[str, Path]]:
    """Every file under ``root`` but its manifest: (relative POSIX name, path to read), sorted.
    A symlink is followed only to a file inside ``root``; any other is an ArtifactError."""
    root = Path(root)
    real_root = root.resolve()
    found: list[tuple[str, Path]] = []
    pending = [root]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                path = Path(entry.path)
                name = path.relative_to(root).as_posix()
                if entry.is_symlink():
                    found.append((name, _symlinked_file(real_root, name, path)))
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                elif not entry.is_file(follow_symlinks=False):
                    raise ArtifactError(f"unsafe path in artifact: {name} is not a regular file")
                elif name != MANIFEST:
                    found.append((name, path))
    return sorted(found)


def hash_files(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the manifest, by relative POSIX path."""
    return {name: sha256_file(path) for name, path in _artifact_files(root)}


def write_manifest(root: Path, manifest: dict) -> None:
    """Write ``root``'s manifest: ``manifest`` plus the format and the hash of every file."""
    manifest = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION, **manifest}
    manifest["files"] = hash_files(root)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def check_manifest_paths(root: Path, manifest: dict) -> None:
    """ArtifactError unless every path the manifest names (``files``, each task's head and
    expert, the router's files) stays inside ``root``, and those loaded are hashed ones."""
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise ArtifactError("manifest: `files` is not a mapping of paths to hashes")
    for name in files:
        _inside(root, name)
    named = [
        (f"task {task!r} {key}", entry.get(key))
        for task, entry in manifest.get("tasks", {}).items()
        for key in ("head", "expert", "config")
    ]
    router = manifest.get("router") or {}
    named += [(f"router {key}", router.get(key)) for key in ("file", "record")]
    for what, name in named:
        if name is None:
            continue
        _inside(root, name)
        if name not in files:
            raise ArtifactError(f"manifest: {what} {name!r} is not among its hashed files")


@dataclass
class Artifact:
    """An opened artifact. ``root`` is where to load from: a private verified snapshot when
    opened with ``verify`` (removed by :meth:`close`, when the Artifact is collected, or at
    exit), else the folder itself; ``source`` is the folder it was opened from."""

    root: Path
    manifest: dict
    version: str  # sha256 of manifest.json
    source: Path | None = None
    _finalizer: weakref.finalize | None = field(default=None, repr=False, compare=False)
    deferred: tuple[str, ...] = ()  # folders whose files are hashed when read, not at open

    def __post_init__(self) -> None:
        if self.source is None:
            self.source = self.root

    @property
    def tasks(self) -> dict[str, dict]:
        return self.manifest["tasks"]

    @property
    def backbone(self) -> Path:
        return self.path("backbone")

    def path(self, relative: str | os.PathLike) -> Path:
        """``root / relative``; ArtifactError if that is not a plain path inside ``root``."""
        return _inside(self.root, os.fspath(relative))

    def task(self, name: str) -> dict:
        if name not in self.tasks:
            raise ArtifactError(
                f"unknown task {name!r}; this artifact has: {', '.join(self.tasks)}"
            )
        return self.tasks[name]

    def read_verified(self, name: str) -> bytes:
        """The bytes of file ``name``, once their sha256 matches the manifest's (ArtifactError
        otherwise): what the caller parses is what was checked."""
        data = self.path(name).read_bytes()
        expected = self.manifest.get("files", {}).get(name)
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ArtifactError(f"altered file: {name} (sha256 {actual}, manifest says {expected})")
        return data

    def close(self) -> None:
        """Remove the snapshot, if any; the Artifact's files are unusable afterwards."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Artifact:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _manifest_bytes(root: Path) -> bytes:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root} is not an artifact: {path} is missing")
    return path.read_bytes()


def _parse_manifest(raw: bytes, path: Path) -> dict:
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path}: not a {ARTIFACT_FORMAT} manifest")
    if manifest.get("format_version") != ARTIFACT_VERSION:
        raise ArtifactError(
            f"{path}: format version {manifest.get('format_version')}, "
            f"this freemerge reads version {ARTIFACT_VERSION}"
        )
    return manifest


def read_manifest(root: Path) -> tuple[dict, str]:
    """The manifest of the artifact at ``root`` and its version (sha256 of manifest.json)."""
    raw = _manifest_bytes(root)
    return _parse_manifest(raw, Path(root) / MANIFEST), hashlib.sha256(raw).hexdigest()


def verify_artifact(root: Path) -> list[str]:
    """Problems found: files missing, altered (hash mismatch) or not listed, or an unsafe
    path; empty when intact."""
    manifest = read_manifest(root)[0]
    try:
        check_manifest_paths(Path(root), manifest)
        return _problems(manifest.get("files", {}), hash_files(Path(root)))
    except ArtifactError as err:
        return [str(err)]


def _problems(expected: dict[str, str], actual: dict[str, str | None]) -> list[str]:
    """Differences between the manifest's hashes and the files found (None: not hashed)."""
    problems = [f"missing file: {name}" for name in sorted(set(expected) - set(actual))]
    problems += [
        f"altered file: {name} (sha256 {actual[name]}, manifest says {expected[name]})"
        for name in sorted(set(expected) & set(actual))
        if actual[name] != expected[name]
    ]
    problems += [f"file not in manifest: {name}" for name in sorted(set(actual) - set(expected))]
    return problems


def _check_version(version: str, expected: str | None, root: Path) -> None:
    if expected is None:
        return
    if not _VERSION_PREFIX.fullmatch(expected.lower()):
        raise ArtifactError(
            f"expected version {expected!r} is not a sha256 in hex, nor 12 or more of its "
            "first digits"
        )
    if not version.startswith(expected.lower()):
        raise ArtifactError(f"artifact {root} is version {version}, expected {expected}")


def _copy_hashed(source: Path, target: Path, chunk: int = 1 << 20) -> str:
    """Copy ``source`` to the new file ``target``; the sha256 of the bytes written."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    no_follow = os.O_NOFOLLOW
    with (
        open(source, "rb", opener=lambda p, f: os.open(p, f | no_follow)) as reader,
        open(target, "xb", opener=lambda p, f: os.open(p, f | no_follow, 0o600)) as writer,
    ):
        while block := reader.read(chunk):
            digest.update(block)
            writer.write(block)
    return digest.hexdigest()


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` at the new path ``target`` (copy it where links fail)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copyfile(source, target, follow_symlinks=False)


def _snapshot(
    root: Path, raw: bytes, manifest: dict, parent: Path | None, deferred: tuple[str, ...]
) -> Path:
    """Copy the artifact at ``root`` into a new private folder in ``parent``, checking each
    file's hash on the bytes copied (files under ``deferred`` folders: linked, hashed when
    read); the folder, or ArtifactError with it removed."""
    expected: dict[str, str] = manifest.get("files", {})
    snapshot = owned_tempdir(parent, SNAPSHOT_PREFIX)

    def taken(name: str, path: Path) -> str | None:
        if name not in expected:
            return None
        if name.startswith(tuple(f"{folder}/" for folder in deferred)):
            _link_or_copy(path, snapshot / name)
            return expected[name]
        return _copy_hashed(path, snapshot / name)

    try:
        (snapshot / MANIFEST).write_bytes(raw)
        actual = {name: taken(name, path) for name, path in _artifact_files(root)}
        problems = _problems(expected, actual)
        if problems:
            raise ArtifactError(f"artifact {root} failed verification:\n  " + "\n  ".join(problems))
    except BaseException:
        shutil.rmtree(snapshot, ignore_errors=True)
        raise
    return snapshot.resolve()


def _remove_snapshot(snapshot: Path, pid: int) -> None:
    if os.getpid() == pid:  # not from a forked child
        shutil.rmtree(snapshot, ignore_errors=True)


def open_artifact(
    root: Path,
    verify: bool = True,
    expect_version: str | None = None,
    snapshot_dir: Path | None = None,
    deferred: tuple[str, ...] = (),
) -> Artifact:
    """Open an artifact; its manifest's paths are always checked.

    With ``verify`` (the default) the artifact is copied into a private snapshot folder in
    ``snapshot_dir`` (default: the system's temporary folder), each file hashed from the bytes
    copied, and the Artifact's ``root`` is that snapshot, so later changes to the folder never
    reach what is loaded; close the Artifact (or let it go) to remove it. Without ``verify``
    ``root`` is the folder itself. ``expect_version``: the sha256 of manifest.json, or at
    least its first 12 hex digits; another version is an ArtifactError. ``deferred``: folders
    whose files the snapshot links instead of copying, hashed by :meth:`Artifact.read_verified`
    when read (a server's ``experts``)."""
    source = Path(root)
    raw = _manifest_bytes(source)
    manifest, version = _parse_manifest(raw, source / MANIFEST), hashlib.sha256(raw).hexdigest()
    _check_version(version, expect_version, source)
    check_manifest_paths(source, manifest)
    if not verify:
        _artifact_files(source)  # symlinks leading outside are refused
        return Artifact(source, manifest, version, source)
    parent = Path(snapshot_dir) if snapshot_dir is not None else None
    remove_stale_snapshots(parent)
    snapshot = _snapshot(source, raw, manifest, parent, deferred)
    artifact = Artifact(snapshot, manifest, version, source, deferred=deferred)
    artifact._finalizer = weakref.finalize(artifact, _remove_snapshot, snapshot, os.getpid())
    return artifact


def remove_stale_snapshots(parent: Path | None = None) -> None:
    """Remove snapshots in ``parent`` (default: the temporary folder) of processes now gone."""
    for path in stale_folders(parent or Path(tempfile.gettempdir()), SNAPSHOT_PREFIX):
        shutil.rmtree(path, ignore_errors=True)
