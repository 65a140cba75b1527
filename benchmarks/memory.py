"""Memory of served tasks: a replica's (as its ``/readyz`` reports it, and its proportional set
size), and the weights and resident memory of N tasks merged or as separate models, each N in
a fresh process. Also synthetic experts, shaped like real ones, for N beyond an artifact's."""

from __future__ import annotations

from pathlib import Path

import torch

from freemerge.benchmarks.loadgen import call
from freemerge.benchmarks.spawn import run_in_child
from freemerge.merging.artifact import open_artifact
from freemerge.merging.experts import LowRankExpert, SparseExpert
from freemerge.merging.zoo_folder import open_zoo
from freemerge.serving.runtime import MergedClassifier

MIB = 2**20
WARM_TEXT = "a short text to page the weights in"


def pss_bytes(pid: int) -> int | None:
    """Proportional set size of a process (Linux), or None where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def replica_memory(base_url: str) -> dict:
    """The memory a server's replica reports on ``/readyz``, and its proportional set size."""
    status, ready = call(f"{base_url}/readyz", timeout=30)
    if status != 200:
        raise RuntimeError(f"{base_url}/readyz answered {status}: {ready}")
    memory = dict(ready["memory"])
    memory["pss_bytes"] = pss_bytes(ready["pid"])
    return memory


def replica_weights(memory: dict) -> int:
    """Bytes of weights a replica holds (:func:`replica_memory`): backbone and experts."""
    return memory["backbone_bytes"] + memory["resident_expert_bytes"]


def _measure_memory_child(kind: str, n: int, artifact: str, zoo: str) -> dict:
    """Weights held and resident memory of ``n`` tasks, merged or as separate models, read
    after one forward through every model (so that their weights are paged in)."""
    from freemerge.serving.engine import process_resident_bytes

    torch.set_num_threads(1)
    before = process_resident_bytes()
    if kind == "merged":
        weights = _merged_weights(MergedClassifier(open_artifact(Path(artifact))), n)
    else:
        weights = _separate_weights(zoo, n)
    rss = process_resident_bytes()
    return {
        "kind": kind,
        "tasks": n,
        "weights_bytes": weights,
        "rss_bytes": rss,
        "rss_growth_bytes": rss - before,
    }


@torch.no_grad()
def _merged_weights(model: MergedClassifier, n: int) -> int:
    """Bytes of the backbone and ``n`` experts (synthetic ones of the same kind and shapes
    beyond the artifact's), after one classify."""
    real = [model.store.prefetch(task) for task in model.store.files]
    experts = real + [
        synthetic_like(real[i % len(real)], seed=i) for i in range(len(real), n if real else 0)
    ]
    model.classify([WARM_TEXT], task=model.tasks[0])
    weights = sum(p.numel() * p.element_size() for p in model.parameters.values())
    return weights + sum(e.nbytes() for e in experts[:n])


@torch.no_grad()
def _separate_weights(zoo: str, n: int) -> int:
    """Bytes of ``n`` separate models (the zoo's, cycled), after one forward through each."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    paths = [task.path for task in open_zoo(Path(zoo)).tasks.values()]
    models = [
        AutoModelForSequenceClassification.from_pretrained(paths[i % len(paths)]).eval()
        for i in range(n)
    ]
    batch = AutoTokenizer.from_pretrained(paths[0])([WARM_TEXT], return_tensors="pt")
    for model in models:
        model(**batch)
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


def synthetic_like(expert: LowRankExpert | SparseExpert, seed: int) -> LowRankExpert | SparseExpert:
    """An expert of the same kind, settings, shapes and dtypes as ``expert``, with random
    values (B small, so the update stays small)."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(expert, LowRankExpert):
        copy = LowRankExpert(expert.rank, expert.vectors, expert.skip, expert.dtype)
        copy.factors = {
            n: (
                (torch.randn(b.shape, generator=generator) * 1e-3).to(b.dtype),
                torch.randn(a.shape, generator=generator).to(a.dtype),
            )
            for n, (b, a) in expert.factors.items()
        }
        return copy
    copy = SparseExpert(expert.density, expert.granularity, expert.rescale)
    copy.entries = {
        n: (i.clone(), (torch.randn(v.shape, generator=generator) * 1e-3).to(v.dtype))
        for n, (i, v) in expert.entries.items()
    }
    return copy


def measure_memory(kind: str, n: int, artifact: Path, zoo: Path) -> dict:
    """:func:`_measure_memory_child` in a fresh process."""
    return run_in_child(_measure_memory_child, kind, n, str(artifact), str(zoo), timeout=900)


def memory_scaling(artifact: Path, zoo: Path, counts: list[int], measured_up_to: int) -> list[dict]:
    """Merged and separate for each number of tasks in ``counts``, each in a fresh process;
    separate beyond ``measured_up_to`` tasks computed from the measured bytes per model."""
    rows = []
    per_model = None
    for n in counts:
        merged = measure_memory("merged", n, artifact, zoo)
        if n <= measured_up_to or per_model is None:
            separate = {**measure_memory("separate", n, artifact, zoo), "computed": False}
            per_model = separate["weights_bytes"] / n
        else:
            separate = {
                "kind": "separate",
                "tasks": n,
                "weights_bytes": per_model * n,
                "rss_bytes": None,
                "computed": True,
            }
        rows += [merged | {"computed": False}, separate]
        print(
            f"  memory N={n}: merged {merged['weights_bytes'] / MIB:.0f} MiB, "
            f"separate {separate['weights_bytes'] / MIB:.0f} MiB",
            flush=True,
        )
    return rows
