"""A zoo folder: the base model and N fine-tuned task models, as the merge reads them.

    zoo.json              written last: recipe, tasks, machine (the zoo's index)
    base/                 the pretrained backbone, a Hugging Face model directory
    tasks/<task>/         save_pretrained of the fine-tuned model, tokenizer, task.json,
                          texts.jsonl (train texts, one {"text": ...} a line, for the router)

A merge config names a zoo by path, or by name (``demo``, ``full``) for a zoo built under the
cache folder by ``freemerge zoo build``. Building a zoo (data, fine-tuning) is benchmark code
(:mod:`freemerge.benchmarks.zoo`); this module only reads one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from freemerge.merging.files import default_cache_dir

ZOO_FORMAT = 2
TEXTS_FILE = "texts.jsonl"


class ZooError(ValueError):
    """A zoo that is missing, incomplete or of another format."""


@dataclass
class ZooTask:
    name: str
    path: Path
    label_names: list[str]
    sizes: dict[str, int]
    majority_accuracy: float | None
    test_accuracy: float | None
    validation_accuracy: float | None
    build_seconds: float
    steps: int
    fingerprint: str  # recipe, backbone weights and data: a task is rebuilt when it changes
    # what the three scores above measure: "accuracy", "entity_f1" (token classification), or
    # "none" (an embedding task, which is not trained: the scores are None)
    metric: str = "accuracy"

    @property
    def texts(self) -> Path:
        return self.path / TEXTS_FILE


@dataclass
class Zoo:
    root: Path
    recipe: dict
    tasks: dict[str, ZooTask]
    machine: dict

    @property
    def base(self) -> Path:
        return self.root / "base"


def zoo_path(zoo: str | Path, cache_dir: Path | None = None) -> Path:
    """A zoo given by name (letters, digits, ``_``, ``-``: under the cache folder) or path."""
    text = str(zoo)
    if "/" not in text and text not in (".", "..") and not Path(text).exists():
        return (cache_dir or default_cache_dir()) / "zoo" / text
    return Path(text).expanduser()


def read_task(path: Path) -> ZooTask:
    record = json.loads((path / "task.json").read_text())
    return ZooTask(path=path, **record)


def read_index(root: Path) -> Zoo | None:
    """The zoo in ``root``; None when it has no index yet."""
    index = root / "zoo.json"
    if not index.is_file():
        return None
    record = json.loads(index.read_text())
    if record.get("format") != ZOO_FORMAT:
        raise ZooError(
            f"{index}: zoo format {record.get('format')}, this version reads {ZOO_FORMAT}; "
            "build it again with `freemerge zoo build`"
        )
    tasks = {}
    for name in record["tasks"]:
        path = root / "tasks" / name
        if not (path / "task.json").is_file():
            raise ZooError(f"{index} lists task {name!r} but {path} is missing or incomplete")
        tasks[name] = read_task(path)
    return Zoo(root, record["recipe"], tasks, record.get("machine", {}))


def open_zoo(zoo: str | Path, cache_dir: Path | None = None) -> Zoo:
    """Open a built zoo by name or path."""
    root = zoo_path(zoo, cache_dir)
    opened = read_index(root)
    if opened is None:
        raise ZooError(
            f"no zoo at {root} (zoo.json is missing); build one with `freemerge zoo build`"
        )
    return opened


def read_texts(path: Path) -> list[str]:
    """The texts of a JSONL file of ``{"text": ...}`` lines."""
    texts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                texts.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError):
                raise ZooError(f'{path}:{number}: expected a {{"text": ...}} JSON line') from None
    return texts
