"""The expert store of a replica: every task's expert in host memory, and on a GPU a
least-recently-used cache of device copies for the experts applied in place.

Which experts go through the device cache: sparse experts and softmax mixtures, applied to the
weights in place per pass. Low-rank experts on linear layers are served as row adapters
instead (:mod:`freemerge.serving.adapters`): all of them are put on the device when the replica
starts, so the cache is not used for them. :func:`held_bytes` counts every copy of an expert
that the replica holds, wherever it lives.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from freemerge.merging.experts import Expert, LowRankExpert, SparseExpert


class ExpertStore:
    """Host experts by task, plus up to ``device_capacity`` device copies (GPU only; on the
    CPU the host copy is the device copy, and every lookup is a hit)."""

    def __init__(
        self, experts: dict[str, Expert | None], device: torch.device, device_capacity: int
    ) -> None:
        if device_capacity < 1:
            raise ValueError(f"expert cache capacity must be >= 1, got {device_capacity}")
        self.host = experts
        self.device = device
        self.capacity = device_capacity
        self.on_device: OrderedDict[str, Expert] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, task: str) -> Expert | None:
        """Task's expert, on the device (copied there first on a miss)."""
        host = self.host[task]
        if host is None:
            return None
        if self.device.type == "cpu":
            self.hits += 1
            return host
        if task in self.on_device:
            self.hits += 1
            self.on_device.move_to_end(task)
            return self.on_device[task]
        self.misses += 1
        if len(self.on_device) >= self.capacity:
            self.on_device.popitem(last=False)
        self.on_device[task] = host.to(self.device)
        return self.on_device[task]

    def count_resident(self, lookups: int) -> None:
        """Count ``lookups`` of experts that live on the device anyway (row adapters) as hits."""
        self.hits += lookups

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of every expert held, host and device copies. Safe to call from another
        thread while the cache changes (it reads a snapshot)."""
        experts = [e for e in self.host.values() if e is not None]
        return [t for e in experts + list(self.on_device.values()) for t in expert_tensors(e)]


def expert_tensors(expert: Expert) -> list[torch.Tensor]:
    if isinstance(expert, SparseExpert):
        return [t for pair in expert.entries.values() for t in pair]
    if isinstance(expert, LowRankExpert):
        return [t for pair in expert.factors.values() for t in pair] + list(expert.full.values())
    raise TypeError(f"unknown expert type {type(expert).__name__}")


def held_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    storages: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())
