"""The expert store's tiers: least recently used out within byte budgets, counts, verified reads
from disk, budgets too small for one expert, and a cold fetch beside hot traffic."""

import threading
import time

import pytest
import torch

from freemerge.merging.artifact import EXPERTS_FOLDER, ArtifactError, open_artifact
from freemerge.serving.engine import MergedEngine
from freemerge.serving.expert_store import ExpertStore, expert_nbytes
from freemerge.serving.requests import ClassifyRequest, StageTimings


@pytest.fixture(scope="module")
def artifact(tiny_routed_artifact):
    return open_artifact(tiny_routed_artifact, deferred=(EXPERTS_FOLDER,))


def sizes(artifact):
    """Bytes of each task's expert as stored and as made ready (float32 on the CPU)."""
    store = ExpertStore(artifact, torch.device("cpu"), torch.float32, 2**40, 2**40)
    return {
        t: (artifact.tasks[t]["expert_bytes"], expert_nbytes(store.get(t))) for t in store.files
    }


def test_each_tier_keeps_the_most_recently_used_within_its_budget(artifact):
    size = sizes(artifact)
    tasks = list(size)
    assert len(tasks) >= 3
    stored, ready = max(s for s, _ in size.values()), max(r for _, r in size.values())
    # room for two experts in host memory, one ready on the device
    store = ExpertStore(artifact, torch.device("cpu"), torch.float32, 2 * stored, ready)
    a, b, c = tasks[:3]
    store.get(a)
    store.get(b)
    store.get(a)  # device: b out (a in); host: a is now the most recent
    assert list(store.ready.items) == [a] and list(store.host.items) == [b, a]
    store.get(c)  # host: b, the least recently used, out
    assert list(store.host.items) == [a, c] and list(store.ready.items) == [c]
    counts = store.counts()
    assert (counts["device"].hits, counts["device"].misses) == (0, 4)
    assert (counts["host"].hits, counts["host"].misses) == (1, 3)
    assert counts["host"].evictions == 1 and counts["device"].evictions == 3
    assert counts["disk"].hits == 3  # a, b, c read once each
    assert counts["host"].bytes == size[a][0] + size[c][0] <= store.host.budget
    assert counts["device"].bytes == size[c][1] <= store.ready.budget
    assert store.is_cold(b) and not store.is_cold(a)
    fetched = store.drain_fetches()
    assert [tier for tier, _ in fetched].count("disk") == 3 and store.drain_fetches() == []


def test_a_budget_that_cannot_hold_one_expert_is_refused(artifact):
    stored = max(s for s, _ in sizes(artifact).values())
    with pytest.raises(ValueError, match="--host-expert-bytes 100 cannot hold one expert"):
        ExpertStore(artifact, torch.device("cpu"), torch.float32, 100, 2**30)
    with pytest.raises(ValueError, match="--device-expert-bytes .* cannot hold one expert"):
        ExpertStore(artifact, torch.device("cpu"), torch.float32, 2**30, stored)


def test_expert_files_are_hashed_when_read(tiny_routed_artifact, tmp_path):
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(tiny_routed_artifact, copy)
    opened = open_artifact(copy, deferred=(EXPERTS_FOLDER,))
    name = next(iter(opened.tasks.values()))["expert"]
    original = (copy / name).read_bytes()
    # replaced in the folder (a new file): the snapshot's link still holds the bytes verified
    (copy / name).unlink()
    (copy / name).write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    assert opened.read_verified(name) == original
    # opened afterwards: the open itself does not hash expert files, the read does
    later = open_artifact(copy, deferred=(EXPERTS_FOLDER,))
    with pytest.raises(ArtifactError, match=f"altered file: {name}"):
        later.read_verified(name)
    # changed in place behind the link: refused too
    with open(opened.root / name, "r+b") as handle:
        handle.write(b"\0" * 8)
    with pytest.raises(ArtifactError, match=f"altered file: {name}"):
        opened.read_verified(name)


def test_a_cold_fetch_does_not_hold_up_a_batch_of_hot_tasks(tiny_routed_artifact):
    """While one task's expert is being read (slowly) on another thread, a batch of a task
    already in memory runs and answers on the model's thread."""
    engine = MergedEngine(tiny_routed_artifact, "cpu")
    hot, cold = engine.model.tasks[:2]
    engine.classify_requests([ClassifyRequest(hot, ["warm"], 0.0)], StageTimings())
    assert not engine.is_cold(ClassifyRequest(hot, ["x"], 0.0))
    cold_request = ClassifyRequest(cold, ["x"], 0.0)
    assert engine.is_cold(cold_request)
    release = threading.Event()
    read = engine.model.artifact.read_verified

    def slow_read(name):
        release.wait(30)
        return read(name)

    engine.model.artifact.read_verified = slow_read
    fetch = threading.Thread(target=engine.prefetch, args=(cold_request,))
    fetch.start()
    start = time.perf_counter()
    answers = engine.classify_requests([ClassifyRequest(hot, ["hello"] * 4, 0.0)], StageTimings())
    assert len(answers[0]) == 4 and fetch.is_alive()  # answered while the fetch still waits
    release.set()
    fetch.join(30)
    assert not engine.is_cold(cold_request) and time.perf_counter() - start < 30
    assert engine.classify_requests([cold_request], StageTimings())[0][0].task == cold
