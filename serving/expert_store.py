"""The expert store of a replica: three tiers, each within its byte budget, least recently used
out first.

- disk: the artifact's expert files. The replica's snapshot links them instead of copying them
  (:func:`~freemerge.merging.artifact.open_artifact` defers ``experts/``), so an artifact of a
  thousand tasks opens in the time of its backbone; a fetch reads a file once, checks its
  sha256 against the manifest and parses those same bytes.
- host: experts as stored (16-bit factors by default), within ``host_bytes``.
- device: experts ready to apply, on the replica's device in the backbone's dtype, within
  ``device_bytes``. On the CPU this is the float32 copy the forward pass reads.

:meth:`ExpertStore.get` gives a task's ready copy, fetching through the tiers on a miss;
:meth:`ExpertStore.prefetch` brings an expert into host memory from another thread (the replica
does so for a tagged request before it joins a batch, so a cold fetch never holds up the
batch). Every tier counts hits, misses, evictions and bytes held; each fetch's seconds are
recorded under the tier it came from (``disk``: read into host memory; ``host``: put on the
device).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from freemerge.merging.artifact import Artifact
from freemerge.merging.experts import Expert, ExpertLayout, expert_from_bytes, expert_layout

TIERS = ("disk", "host", "device")
FETCHES_KEPT = 10_000  # fetch timings waiting for the metrics to read them


def expert_tensors(expert: Expert) -> list[torch.Tensor]:
    """Every tensor an expert holds."""
    if hasattr(expert, "entries"):
        return [t for pair in expert.entries.values() for t in pair]
    return [t for pair in expert.factors.values() for t in pair] + list(expert.full.values())


def held_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    storages: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


@dataclass
class TierCounts:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0


class Tier:
    """Experts by task within ``budget`` bytes, least recently used out first. Not
    thread-safe: the store holds its lock around every call."""

    def __init__(self, name: str, budget: int) -> None:
        self.name = name
        self.budget = budget
        self.items: OrderedDict[str, tuple[Expert, int]] = OrderedDict()
        self.counts = TierCounts()

    def lookup(self, task: str) -> Expert | None:
        found = self.items.get(task)
        if found is None:
            self.counts.misses += 1
            return None
        self.counts.hits += 1
        self.items.move_to_end(task)
        return found[0]

    def put(self, task: str, expert: Expert, size: int) -> None:
        """Hold ``expert``, evicting the least recently used until it fits (never itself)."""
        self.drop(task)
        while self.items and self.counts.bytes + size > self.budget:
            _, (_, freed) = self.items.popitem(last=False)
            self.counts.bytes -= freed
            self.counts.evictions += 1
        self.items[task] = (expert, size)
        self.counts.bytes += size

    def drop(self, task: str) -> None:
        if task in self.items:
            self.counts.bytes -= self.items.pop(task)[1]


class ExpertStore:
    """A replica's experts by task through the disk, host and device tiers."""

    def __init__(
        self,
        artifact: Artifact,
        device: torch.device,
        dtype: torch.dtype,
        host_bytes: int,
        device_bytes: int,
        known: dict[str, tuple[str, ExpertLayout]] | None = None,
    ) -> None:
        """``known``: layouts already read, by task, with the hash of the file they describe."""
        self.artifact = artifact
        self.device = device
        self.dtype = dtype
        self.files = {t: e["expert"] for t, e in artifact.tasks.items() if e.get("expert")}
        self.hashes = {task: artifact.manifest["files"][n] for task, n in self.files.items()}
        known = known or {}
        self.layouts: dict[str, ExpertLayout] = {
            task: known[task][1]
            if known.get(task, ("",))[0] == self.hashes[task]
            else expert_layout(artifact.path(name))
            for task, name in self.files.items()
        }
        self.host = Tier("host", host_bytes)
        self.ready = Tier("device", device_bytes)
        self.disk = TierCounts(
            bytes=sum(artifact.path(n).stat().st_size for n in self.files.values())
        )
        self.fetches: deque[tuple[str, float]] = deque(maxlen=FETCHES_KEPT)
        self.lock = threading.Lock()
        self._check_budgets(artifact)

    def _check_budgets(self, artifact: Artifact) -> None:
        """ValueError unless each tier can hold the largest expert (device: in its dtype)."""
        if not self.files:
            return
        stored = max(artifact.tasks[t]["expert_bytes"] for t in self.files)
        widest = max(self.files, key=lambda t: artifact.tasks[t]["expert_bytes"])
        stored_expert = self._read(widest)
        ready = expert_nbytes(stored_expert.to(self.device, self.dtype))
        for tier, need, flag in ((self.host, stored, "host"), (self.ready, ready, "device")):
            if tier.budget < need:
                raise ValueError(
                    f"--{flag}-expert-bytes {tier.budget} cannot hold one expert: the largest "
                    f"takes {need} bytes there ({widest!r})"
                )

    def moved_to(self, artifact: Artifact) -> ExpertStore:
        """A store for ``artifact``, another version, with the same budgets, counts so far,
        and every expert held whose file is unchanged (same hash); this store is unchanged."""
        known = {task: (self.hashes[task], self.layouts[task]) for task in self.files}
        host, ready = self.host.budget, self.ready.budget
        moved = ExpertStore(artifact, self.device, self.dtype, host, ready, known)
        with self.lock:
            for old, new in ((self.host, moved.host), (self.ready, moved.ready)):
                for task, (expert, size) in old.items.items():
                    if moved.hashes.get(task) == self.hashes[task]:
                        new.put(task, expert, size)
                new.counts = TierCounts(**{**vars(old.counts), "bytes": new.counts.bytes})
            moved.disk = TierCounts(**{**vars(self.disk), "bytes": moved.disk.bytes})
        return moved

    def has_expert(self, task: str) -> bool:
        return task in self.files

    def is_cold(self, task: str) -> bool:
        """Whether fetching ``task``'s expert would read its file (it is in no memory tier)."""
        with self.lock:
            return (
                task in self.files and task not in self.host.items and task not in self.ready.items
            )

    def get(self, task: str) -> Expert | None:
        """``task``'s expert on the device in the compute dtype (None without one)."""
        if task not in self.files:
            return None
        with self.lock:
            found = self.ready.lookup(task)
        if found is not None:
            return found
        stored = self.prefetch(task)
        start = time.perf_counter()
        ready = stored.to(self.device, self.dtype)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        with self.lock:
            self.ready.put(task, ready, expert_nbytes(ready))
            self.fetches.append(("host", time.perf_counter() - start))
        return ready

    def prefetch(self, task: str) -> Expert:
        """``task``'s expert in host memory, read from disk (hash checked) when it is not."""
        with self.lock:
            found = self.host.lookup(task)
        if found is not None:
            return found
        start = time.perf_counter()
        stored = self._read(task)
        with self.lock:
            self.host.put(task, stored, expert_nbytes(stored))
            self.disk.hits += 1
            self.fetches.append(("disk", time.perf_counter() - start))
        return stored

    def _read(self, task: str) -> Expert:
        """``task``'s expert read from its file, the bytes hashed before they are parsed."""
        name = self.files[task]
        return expert_from_bytes(self.artifact.read_verified(name), name)

    def load_all(self) -> dict[str, Expert | None]:
        """Every task's stored expert, read from disk past the tiers (for a router that needs
        them all at start)."""
        return {
            task: self._read(task) if task in self.files else None for task in self.artifact.tasks
        }

    def counts(self) -> dict[str, TierCounts]:
        """Each tier's counts so far (copies)."""
        with self.lock:
            return {
                "disk": TierCounts(**vars(self.disk)),
                "host": TierCounts(**vars(self.host.counts)),
                "device": TierCounts(**vars(self.ready.counts)),
            }

    def drain_fetches(self) -> list[tuple[str, float]]:
        """The (tier, seconds) of each fetch since the last call."""
        with self.lock:
            drained = list(self.fetches)
            self.fetches.clear()
        return drained

    def held_bytes(self) -> int:
        """Bytes of every expert held in memory, host and device tiers (distinct storages)."""
        with self.lock:
            experts = [e for tier in (self.host, self.ready) for e, _ in tier.items.values()]
        return held_bytes([t for e in experts for t in expert_tensors(e)])


def expert_nbytes(expert: Expert) -> int:
    return sum(t.numel() * t.element_size() for t in expert_tensors(expert))
