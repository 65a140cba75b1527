"""The task zoo: every task fine-tuned from the same pretrained backbone with one recipe.

Layout of a zoo (one folder per recipe and backbone, under the cache directory)::

    zoo.json              # written last: recipe, tasks and their scores (the zoo's index)
    base/                 # the pretrained backbone, a Hugging Face model directory
    tasks/<task>/         # save_pretrained of the fine-tuned model, tokenizer, task.json

Each task folder is written under a temporary name and renamed when complete, so an interrupted
build leaves only whole tasks behind and resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from merging.atomic import replaced_directory, write_json_atomically
from merging.datasets import TASKS, TaskData, load_task, task_spec
from merging.finetune import Recipe, accuracy, fine_tune, predict
from merging.machine import describe_machine, machine_line
from merging.sources import backbone_dir, default_cache_dir, sha256_file

ZOO_FORMAT = 1


class ZooError(RuntimeError):
    """A zoo that is missing, incomplete or does not match what was asked for."""


@dataclass
class ZooTask:
    name: str
    path: Path
    label_names: list[str]
    sizes: dict[str, int]
    majority_accuracy: float
    test_accuracy: float
    validation_accuracy: float
    build_seconds: float
    steps: int
    data_fingerprint: str


@dataclass
class Zoo:
    root: Path
    recipe: Recipe
    tasks: dict[str, ZooTask]
    machine: dict

    @property
    def base(self) -> Path:
        return self.root / "base"


def zoo_dir(recipe: Recipe, backbone: Path, cache_dir: Path | None = None) -> Path:
    """Folder of the zoo for this recipe and these backbone weights."""
    weights = sha256_file(backbone / "model.safetensors")
    key = hashlib.sha256(f"{ZOO_FORMAT}:{recipe.fingerprint()}:{weights}".encode()).hexdigest()[:16]
    return (cache_dir or default_cache_dir()) / "zoo" / key


def _train_task(
    task: TaskData, base: Path, recipe: Recipe, target: Path, show_progress: bool
) -> ZooTask:
    """Fine-tune, evaluate and save one task under a temporary name, then rename it into place."""
    result = fine_tune(base, task, recipe, show_progress=show_progress)
    tokenizer = AutoTokenizer.from_pretrained(base)
    split = task.split()
    scores = {}
    for part in ("validation", "test"):
        texts, labels = task.subset(split[part])
        desc = f"evaluate {task.name} ({part})" if show_progress else None
        scores[part] = accuracy(
            predict(result.model, tokenizer, texts, recipe.max_length, desc=desc), labels
        )
    entry = ZooTask(
        name=task.name,
        path=target,
        label_names=task.label_names,
        sizes={part: len(indices) for part, indices in split.items()},
        majority_accuracy=task.majority_accuracy(split["test"]),
        test_accuracy=scores["test"],
        validation_accuracy=scores["validation"],
        build_seconds=round(result.seconds, 1),
        steps=result.steps,
        data_fingerprint=task_spec(task.name).fingerprint(),
    )
    with replaced_directory(target) as tmp:
        result.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomically(tmp / "task.json", _task_record(entry))
    return entry


def _task_record(entry: ZooTask) -> dict:
    record = dataclasses.asdict(entry)
    record.pop("path")
    return record


def _read_task(path: Path) -> ZooTask:
    record = json.loads((path / "task.json").read_text())
    return ZooTask(path=path, **record)


def build_zoo(
    task_names: list[str] | None = None,
    recipe: Recipe | None = None,
    cache_dir: Path | None = None,
    backbone: Path | None = None,
    force: bool = False,
    show_progress: bool = True,
) -> Zoo:
    """Fine-tune every named task (default: all) that the cached zoo does not hold yet."""
    names = list(task_names or TASKS)
    for name in names:
        task_spec(name)  # unknown names fail here, before anything is written
    recipe = recipe or Recipe()
    backbone = backbone or backbone_dir(cache_dir)
    root = zoo_dir(recipe, backbone, cache_dir)
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    if not (root / "base" / "model.safetensors").is_file():
        with replaced_directory(root / "base") as tmp:
            shutil.copytree(backbone, tmp, dirs_exist_ok=True)
    previous = _read_index(root)
    tasks = {}
    trained = False
    for name in names:
        target = root / "tasks" / name
        if not force and (target / "task.json").is_file():
            cached = _read_task(target)
            if cached.data_fingerprint == task_spec(name).fingerprint():
                tasks[name] = cached
                continue
        task = load_task(name, cache_dir)
        tasks[name] = _train_task(task, root / "base", recipe, target, show_progress)
        trained = True
    # The machine (and date) of the last build that trained something; a cache hit keeps it.
    machine = previous.machine if previous and not trained else describe_machine()
    merged = {**(previous.tasks if previous else {}), **tasks}
    write_json_atomically(
        root / "zoo.json",
        {
            "format": ZOO_FORMAT,
            "recipe": dataclasses.asdict(recipe),
            "tasks": sorted(merged),
            "machine": machine,
        },
    )
    return Zoo(root, recipe, merged, machine)


def _read_index(root: Path) -> Zoo | None:
    index = root / "zoo.json"
    if not index.is_file():
        return None
    record = json.loads(index.read_text())
    if record.get("format") != ZOO_FORMAT:
        raise ZooError(
            f"{index}: zoo format {record.get('format')}, this version reads {ZOO_FORMAT}"
        )
    tasks = {}
    for name in record["tasks"]:
        path = root / "tasks" / name
        if not (path / "task.json").is_file():
            raise ZooError(f"{index} lists task {name!r} but {path} is missing or incomplete")
        tasks[name] = _read_task(path)
    return Zoo(root, Recipe(**record["recipe"]), tasks, record.get("machine", {}))


def open_zoo(root: Path) -> Zoo:
    """Open a built zoo from its folder."""
    zoo = _read_index(Path(root))
    if zoo is None:
        raise ZooError(
            f"no zoo at {root} (zoo.json is missing); build one with `freemerge zoo build`"
        )
    return zoo


def cached_zoo(recipe: Recipe | None = None, cache_dir: Path | None = None) -> Zoo:
    """The zoo built for ``recipe`` (default recipe) from the default backbone."""
    return open_zoo(zoo_dir(recipe or Recipe(), backbone_dir(cache_dir), cache_dir))


def zoo_table(zoo: Zoo) -> str:
    """Markdown table: task, classes, split sizes, majority baseline, accuracy, build time."""
    lines = [
        "| task | classes | train / val / test | majority baseline | val accuracy | test accuracy "
        "| fine-tune time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in zoo.tasks.values():
        sizes = " / ".join(str(task.sizes[p]) for p in ("train", "validation", "test"))
        lines.append(
            f"| {task.name} | {len(task.label_names)} ({', '.join(task.label_names)}) | {sizes} "
            f"| {task.majority_accuracy:.3f} | {task.validation_accuracy:.3f} "
            f"| {task.test_accuracy:.3f} | {task.build_seconds:.0f} |"
        )
    return "\n".join(lines)


def zoo_report(zoo: Zoo, command: str) -> str:
    """The committed report: the table plus recipe, sources, machine and command."""
    sources = "\n".join(
        f"- `{spec.name}`: `{spec.source.requirement}` `{spec.member}` "
        f"(licence: {spec.source.licence}; wheel sha256 `{spec.source.sha256[:12]}…`): "
        f"{spec.description}"
        for spec in (task_spec(name) for name in zoo.tasks)
    )
    recipe = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(zoo.recipe).items())
    return (
        "# Task zoo\n\n"
        "Every task fine-tuned from all-MiniLM-L6-v2 (`AutoModelForSequenceClassification`) with "
        "one shared recipe; accuracy on the fixed test split, the majority baseline predicts the "
        "train split's most frequent class.\n\n"
        f"{zoo_table(zoo)}\n\n"
        f"Fine-tuning, all tasks: {sum(t.build_seconds for t in zoo.tasks.values()) / 60:.1f} min "
        "(reading data and evaluating come on top).\n\n"
        f"Recipe: {recipe}.\n\n"
        f"Machine: {machine_line(zoo.machine)}.\n\nCommand: `{command}`\n\n"
        f"Sources:\n{sources}\n"
    )
