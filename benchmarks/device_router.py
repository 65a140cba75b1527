"""The router and the runtime on a GPU, for a device machine that cannot reach the registries.

``pack`` (here) writes a bundle small enough to travel: the artifact without its router, the
backbone in 16-bit floats (restored to 32-bit there, so GPU and CPU answers there use the same
rounded weights), each task's train texts and the test split. ``run`` (there, with only torch,
transformers and safetensors installed) fits the default router on the bundle as a merge
does, then measures on the GPU and on that machine's CPU: routing accuracy, agreement of the
GPU's answers with the CPU's, the router's own milliseconds per text and a tagged text's whole
answer, one text at a time, in interleaved rounds.

    python -m freemerge.benchmarks.device_router pack ARTIFACT ZOO_DIR OUT_DIR
    python -m freemerge.benchmarks.device_router run BUNDLE RESULT.json
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from freemerge.serving.runtime import MergedClassifier

TEXTS_PER_TASK = 200  # of the test split, per task


def pack(artifact: Path, zoo: Path, out: Path) -> None:
    """The bundle: artifact files (no router), backbone in 16 bits, train and test texts."""
    from freemerge.benchmarks.evaluate import task_texts

    manifest = json.loads((artifact / "manifest.json").read_text())
    shutil.copytree(artifact, out, ignore=shutil.ignore_patterns("router.*"))
    weights = out / "backbone" / "model.safetensors"
    save_file({k: v.half() for k, v in load_file(str(weights)).items()}, str(weights))
    (out / "texts").mkdir()
    test = []
    for task in manifest["tasks"]:
        shutil.copy(zoo / "tasks" / task / "texts.jsonl", out / "texts" / f"{task}.jsonl")
        texts, labels = task_texts(task, "test")
        names = manifest["tasks"][task]["labels"]
        test += [
            {"text": t, "task": task, "label": names[y]}
            for t, y in list(zip(texts, labels, strict=True))[:TEXTS_PER_TASK]
        ]
    (out / "test.jsonl").write_text("\n".join(json.dumps(row) for row in test))


def _restored(bundle: Path) -> dict:
    """Back to 32-bit weights, and the router fitted as a merge fits it; the manifest."""
    from freemerge.merging.artifact import write_manifest
    from freemerge.merging.router_config import RouterConfig
    from freemerge.merging.router_training import build_router

    weights = bundle / "backbone" / "model.safetensors"
    save_file({k: v.float() for k, v in load_file(str(weights)).items()}, str(weights))
    manifest = json.loads((bundle / "manifest.json").read_text())
    data = {task: str(bundle / "texts" / f"{task}.jsonl") for task in manifest["tasks"]}
    metrics = build_router(RouterConfig(data=data), bundle, manifest["tasks"])
    body = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")}
    router = {"file": "router.safetensors", "record": "router.json"}
    write_manifest(bundle, {**body, "router": router})
    return metrics


def _timed(call: Callable[[str], object], texts: list[str]) -> float:
    start = time.perf_counter()
    for text in texts:
        call(text)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / len(texts)


def _costs(model: MergedClassifier, texts: list[str], rounds: int = 3) -> dict:
    """Router alone and a tagged answer, one text at a time, interleaved rounds (ms)."""
    task = model.tasks[0]
    calls = {
        "router": lambda text: model.route([text]),
        "tagged answer": lambda text: model.classify_rows([text], [task]),
        "untagged answer": lambda text: model.classify_rows([text], [None]),
    }
    for call in calls.values():
        _timed(call, texts[:5])  # warm-up
    timed = {name: [_timed(call, texts) for _ in range(1)] for name, call in calls.items()}
    for _ in range(rounds - 1):
        for name, call in calls.items():
            timed[name].append(_timed(call, texts))
    return {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v)}
        for name, v in timed.items()
    }


def run(bundle: Path, result_path: Path) -> None:
    from freemerge.merging.artifact import open_artifact
    from freemerge.serving.runtime import MergedClassifier

    start = time.perf_counter()
    fitted = _restored(bundle)
    fit_seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (bundle / "test.jsonl").read_text().splitlines()]
    texts = [row["text"] for row in rows]
    result = {"router_fit_seconds": fit_seconds, "router": fitted, "texts": len(rows)}
    answers = {}
    for device in ("cuda", "cpu"):
        model = MergedClassifier(open_artifact(bundle, verify=False), device)
        found = []
        for begin in range(0, len(texts), 256):
            chunk = texts[begin : begin + 256]
            found += model.classify_rows(chunk, [None] * len(chunk))
        answers[device] = found
        pairs = list(zip(found, rows, strict=True))
        result[device] = {
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "torch_threads": torch.get_num_threads(),
            "routing_accuracy": sum(a.task == r["task"] for a, r in pairs) / len(rows),
            "routed_accuracy": sum(a.task == r["task"] and a.label == r["label"] for a, r in pairs)
            / len(rows),
            "costs_ms": _costs(model, texts[:: max(1, len(texts) // 100)]),
        }
    pairs = list(zip(answers["cuda"], answers["cpu"], strict=True))
    result["gpu_cpu_same_task"] = sum(a.task == b.task for a, b in pairs) / len(pairs)
    result["gpu_cpu_same_label"] = sum(a.label == b.label for a, b in pairs) / len(pairs)
    result["wall_seconds"] = time.perf_counter() - start
    result_path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    if sys.argv[1] == "pack":
        pack(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        run(Path(sys.argv[2]), Path(sys.argv[3]))
