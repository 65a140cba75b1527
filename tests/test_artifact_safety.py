"""Artifact safety on a tiny artifact of small files (no models): paths stay inside, the
expected version, the verified snapshot, atomic replacement, stale temporary folders."""

import gc
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from freemerge.merging import files
from freemerge.merging.artifact import (
    ArtifactError,
    open_artifact,
    verify_artifact,
    write_manifest,
)
from freemerge.merging.files import (
    exchange_directories,
    replaced_directory,
    stale_partials,
)
from freemerge.serving.cli import main

HEAD = "heads/spam.safetensors"
EXPERT = "experts/spam.safetensors"


def make_artifact(root: Path) -> Path:
    """A backbone, a head and an expert of a few bytes each, and their manifest."""
    for name, data in {
        "backbone/model.safetensors": b"backbone weights",
        "backbone/config.json": b"{}",
        HEAD: b"head weights",
        EXPERT: b"expert weights",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    tasks = {"spam": {"labels": ["ham", "spam"], "head": HEAD, "expert": EXPERT}}
    write_manifest(root, {"tasks": tasks})
    return root


def edit_manifest(root: Path, change) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def artifact_dir(tmp_path: Path) -> Path:
    return make_artifact(tmp_path / "art")


@pytest.fixture
def snapshots(tmp_path: Path) -> Path:
    folder = tmp_path / "snapshots"
    folder.mkdir()
    return folder


def run_child(code: str) -> None:
    """Run ``code`` in a fresh Python process (which ends without any cleanup of its own)."""
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=60)


UNSAFE = ["../outside.safetensors", "/etc/passwd", "heads/../../x", "heads\\..\\..\\x", "C:x"]


@pytest.mark.parametrize("bad", UNSAFE)
@pytest.mark.parametrize("where", ["head", "expert", "files"])
def test_manifest_paths_leaving_the_artifact_are_refused(artifact_dir, bad, where):
    def change(manifest):
        if where == "files":
            manifest["files"][bad] = "0" * 64
        else:
            manifest["tasks"]["spam"][where] = bad

    edit_manifest(artifact_dir, change)
    for verify in (True, False):
        with pytest.raises(ArtifactError, match=re.escape(f"unsafe path in artifact: {bad!r}")):
            open_artifact(artifact_dir, verify=verify)
    assert "unsafe path" in verify_artifact(artifact_dir)[0]


def test_a_loaded_path_must_be_a_hashed_one(artifact_dir):
    edit_manifest(artifact_dir, lambda m: m["tasks"]["spam"].update(head="heads/other"))
    with pytest.raises(ArtifactError, match="task 'spam' head 'heads/other' is not among"):
        open_artifact(artifact_dir, verify=False)


def test_artifact_path_refuses_escapes(artifact_dir, snapshots):
    with open_artifact(artifact_dir, snapshot_dir=snapshots) as artifact:
        assert artifact.path(HEAD).read_bytes() == b"head weights"
        for bad in ("../art/" + HEAD, str(artifact_dir / HEAD), "heads/../../x"):
            with pytest.raises(ArtifactError, match="unsafe path"):
                artifact.path(bad)
    plain = open_artifact(artifact_dir, verify=False)
    outside = artifact_dir.parent / "outside"
    outside.mkdir()
    (outside / "x").write_bytes(b"not the artifact's")
    (artifact_dir / "heads" / "link").symlink_to(outside)
    with pytest.raises(ArtifactError, match="'heads/link/x' leads to .*, outside it"):
        plain.path("heads/link/x")


@pytest.mark.parametrize("target", ["file", "folder", "unlisted"])
def test_symlinks_leading_outside_are_refused_even_with_matching_hashes(
    artifact_dir, snapshots, tmp_path, target
):
    if target == "file":
        outside = tmp_path / "outside.safetensors"
        outside.write_bytes((artifact_dir / HEAD).read_bytes())
        (artifact_dir / HEAD).unlink()
        (artifact_dir / HEAD).symlink_to(outside)
    elif target == "folder":
        outside = tmp_path / "outside-backbone"
        (artifact_dir / "backbone").rename(outside)
        (artifact_dir / "backbone").symlink_to(outside)
    else:  # named nowhere in the manifest
        (tmp_path / "secret").write_bytes(b"not the artifact's")
        (artifact_dir / "notes.txt").symlink_to(tmp_path / "secret")
    for verify in (True, False):
        with pytest.raises(ArtifactError, match="unsafe path in artifact: .*outside"):
            open_artifact(artifact_dir, verify=verify, snapshot_dir=snapshots)
    assert "unsafe path" in verify_artifact(artifact_dir)[0]
    assert main(["verify", str(artifact_dir)]) == 1
    assert not list(snapshots.iterdir())


def test_a_symlink_to_a_file_inside_is_followed(artifact_dir, snapshots):
    (artifact_dir / "backbone" / "config.json").unlink()
    (artifact_dir / "backbone" / "config.json").symlink_to("../" + HEAD)
    tasks = json.loads((artifact_dir / "manifest.json").read_text())["tasks"]
    write_manifest(artifact_dir, {"tasks": tasks})
    with open_artifact(artifact_dir, snapshot_dir=snapshots) as artifact:
        copied = artifact.backbone / "config.json"
        assert not copied.is_symlink() and copied.read_bytes() == b"head weights"
    (artifact_dir / "more").symlink_to("backbone")  # a folder: never followed
    with pytest.raises(ArtifactError, match="symlink more leads to a folder"):
        open_artifact(artifact_dir, snapshot_dir=snapshots)


def test_expected_version(artifact_dir, snapshots):
    version = open_artifact(artifact_dir, verify=False).version
    assert open_artifact(artifact_dir, expect_version=version, snapshot_dir=snapshots).version
    assert open_artifact(artifact_dir, verify=False, expect_version=version[:12].upper())
    other = ("0" if version[0] != "0" else "1") + version[1:]
    with pytest.raises(ArtifactError, match=f"is version {version}, expected {other}"):
        open_artifact(artifact_dir, expect_version=other, snapshot_dir=snapshots)
    with pytest.raises(ArtifactError, match="not a sha256"):
        open_artifact(artifact_dir, expect_version=version[:8], snapshot_dir=snapshots)
    assert not list(snapshots.iterdir())


def test_loading_reads_the_verified_bytes(artifact_dir, snapshots):
    artifact = open_artifact(artifact_dir, snapshot_dir=snapshots)
    assert artifact.source == artifact_dir and artifact.root.parent == snapshots.resolve()
    assert artifact.root.stat().st_mode & 0o777 == 0o700
    (artifact_dir / HEAD).write_bytes(b"swapped after verification")
    (artifact_dir / "backbone" / "model.safetensors").write_bytes(b"swapped too")
    assert artifact.path(HEAD).read_bytes() == b"head weights"
    assert (artifact.backbone / "model.safetensors").read_bytes() == b"backbone weights"
    assert verify_artifact(artifact.root) == []
    artifact.close()


def test_a_file_changed_during_verification_never_reaches_the_loader(
    artifact_dir, snapshots, monkeypatch
):
    """Each file is changed right after it is read: what was hashed is still what is loaded."""
    from freemerge.merging import artifact as module

    copy = module._copy_hashed

    def copy_then_tamper(source, target, *args):
        digest = copy(source, target, *args)
        source.write_bytes(b"tampered")
        return digest

    monkeypatch.setattr(module, "_copy_hashed", copy_then_tamper)
    with open_artifact(artifact_dir, snapshot_dir=snapshots) as artifact:
        assert (artifact_dir / HEAD).read_bytes() == b"tampered"
        assert artifact.path(HEAD).read_bytes() == b"head weights"
        assert artifact.path(EXPERT).read_bytes() == b"expert weights"


def test_a_file_changed_before_opening_is_refused_and_leaves_no_snapshot(artifact_dir, snapshots):
    (artifact_dir / EXPERT).write_bytes(b"altered")
    with pytest.raises(ArtifactError, match=f"failed verification:\n  altered file: {EXPERT}"):
        open_artifact(artifact_dir, snapshot_dir=snapshots)
    (artifact_dir / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="file not in manifest: extra.bin"):
        open_artifact(artifact_dir, snapshot_dir=snapshots)
    assert not list(snapshots.iterdir())


def test_the_snapshot_is_removed_on_close_exit_and_collection(artifact_dir, snapshots):
    artifact = open_artifact(artifact_dir, snapshot_dir=snapshots)
    assert artifact.root.is_dir()
    artifact.close()
    artifact.close()
    assert not artifact.root.exists()
    with open_artifact(artifact_dir, snapshot_dir=snapshots) as artifact:
        assert artifact.root.is_dir()
    assert not artifact.root.exists()
    root = open_artifact(artifact_dir, snapshot_dir=snapshots).root
    gc.collect()
    assert not root.exists()
    assert artifact_dir.joinpath(HEAD).is_file()
    assert not list(snapshots.iterdir())


def test_the_snapshot_is_removed_at_exit_and_a_killed_ones_on_the_next_open(
    artifact_dir, snapshots
):
    opener = (
        "from freemerge.merging.artifact import open_artifact\n"
        f"kept = open_artifact({str(artifact_dir)!r}, snapshot_dir={str(snapshots)!r})\n"
    )
    run_child(opener)  # ends normally: the exit removes its snapshot
    assert not list(snapshots.iterdir())
    run_child(opener + "import os; os._exit(0)")  # killed: no cleanup
    (left,) = snapshots.iterdir()
    with open_artifact(artifact_dir, snapshot_dir=snapshots) as artifact:
        assert list(snapshots.iterdir()) == [artifact.root]
    assert not left.exists()


def write_folder(out: Path, marker: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "marker").write_text(marker)


def test_replacing_keeps_the_old_folder_until_the_swap(tmp_path):
    out = tmp_path / "art"
    write_folder(out, "old")
    with replaced_directory(out) as tmp:
        write_folder(tmp, "new")
        assert (out / "marker").read_text() == "old"
    assert (out / "marker").read_text() == "new"
    with pytest.raises(RuntimeError), replaced_directory(out) as tmp:
        write_folder(tmp, "newer")
        raise RuntimeError("merge failed")
    assert (out / "marker").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def exchange_works(folder: Path) -> bool:
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    return exchange_directories(folder / "a", folder / "b")


def test_replacing_never_leaves_the_output_missing(tmp_path, monkeypatch):
    if not exchange_works(tmp_path):
        pytest.skip("no renameat2 exchange here: the fallback has a moment without output")
    out = tmp_path / "art"
    write_folder(out, "old")
    seen: list[str] = []

    def watched(function):
        def call(*args):
            result = function(*args)
            seen.append((out / "marker").read_text() if out.exists() else "MISSING")
            return result

        return call

    monkeypatch.setattr(files, "exchange_directories", watched(exchange_directories))
    monkeypatch.setattr(os, "rename", watched(os.rename))
    with replaced_directory(out) as tmp:
        write_folder(tmp, "new")
    assert seen == ["new"]


def test_replacing_without_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "exchange_directories", lambda a, b: False)
    test_replacing_keeps_the_old_folder_until_the_swap(tmp_path)


def test_a_killed_merge_is_reported_then_cleaned_up(tmp_path, capsys):
    out = make_artifact(tmp_path / "art")
    run_child(
        f"""
        import os
        from freemerge.merging.files import replaced_directory
        with replaced_directory({str(out)!r}) as tmp:
            (tmp / "half").write_text("half a merge")
            os._exit(0)
        """
    )
    (stale,) = stale_partials(out)
    assert stale.name.startswith(".art-partial-") and (stale / "half").is_file()
    assert main(["verify", str(out)]) == 0
    assert f"note: {stale} is left over from a killed merge" in capsys.readouterr().out
    with replaced_directory(out) as tmp:
        assert not stale.exists()
        assert stale_partials(out) == []  # this process's own folder is alive
        make_artifact(tmp)
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_a_swap_killed_halfway_puts_the_old_folder_back(tmp_path):
    out = tmp_path / "art"
    write_folder(out, "old")
    run_child(
        f"""
        import os
        from freemerge.merging import files
        files.exchange_directories = lambda a, b: False
        rename = os.rename
        def rename_then_die(a, b):
            rename(a, b)
            os._exit(0)
        os.rename = rename_then_die
        with files.replaced_directory({str(out)!r}) as tmp:
            (tmp / "marker").write_text("new")
        """
    )
    assert not out.exists() and len(stale_partials(out)) == 2
    files.remove_stale_partials(out)
    assert (out / "marker").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
