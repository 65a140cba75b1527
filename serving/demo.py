"""``freemerge demo``: the main job end to end on the default zoo.

Today: build the zoo if it is not cached, merge it as the given config says (cached by the
config's content), verify the artifact, and classify a few held-out test texts of every task
through the merged model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from merging.artifact import open_artifact, verify_artifact
from merging.config import load_config
from merging.datasets import load_task
from merging.merge import run_merge
from merging.runtime import MergedClassifier
from merging.sources import default_cache_dir
from merging.zoo import build_zoo, zoo_table


def run_demo(config_path: Path, cache_dir: Path | None = None, examples: int = 2) -> int:
    cache_dir = cache_dir or default_cache_dir()
    print("== 1. task zoo (fine-tuned once, then cached)")
    zoo = build_zoo(cache_dir=cache_dir)
    print(zoo_table(zoo))

    print(f"\n== 2. merge as {config_path} says")
    config = load_config(config_path)
    key = hashlib.sha256(repr(config.to_dict()).encode()).hexdigest()[:12]
    out = cache_dir / "artifacts" / f"demo-{key}"
    if not out.exists() or verify_artifact(out):
        summary = run_merge(config, out, overwrite=True)
        print(f"merged in {summary.wall_seconds:.1f} s, ", end="")
        print(f"peak resident memory {summary.peak_rss_mib:.0f} MiB")
    artifact = open_artifact(out)
    backbone = artifact.manifest["backbone"]["bytes"]
    print(f"artifact {out}\nversion {artifact.version[:16]}, backbone {backbone / 2**20:.1f} MiB")
    for task, entry in artifact.tasks.items():
        print(
            f"  {task}: expert {entry['expert_bytes'] / 2**20:.2f} MiB "
            f"({100 * entry['expert_bytes'] / backbone:.2f}% of the backbone)"
        )

    print("\n== 3. held-out test texts through the merged model (task given)")
    model = MergedClassifier(artifact)
    for task in artifact.tasks:
        data = load_task(task, cache_dir)
        texts, labels = data.subset(data.split()["test"][:examples])
        predicted = model.logits(task, texts).argmax(-1).tolist()
        for text, label, guess in zip(texts, labels, predicted, strict=True):
            mark = "ok " if guess == label else "MISS"
            snippet = " ".join(text.split())[:70]
            said, truth = model.labels(task)[guess], data.label_names[label]
            print(f"  [{mark}] {task}: {said!r:>16} (true {truth!r}) {snippet}")
    return 0
