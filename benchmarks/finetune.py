"""One shared fine-tuning recipe for every task of the zoo, and its evaluation."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Encoding
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    BatchEncoding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from freemerge.benchmarks.datasets import TaskData, TokenTaskData
from freemerge.merging.batching import PassPlan, Tokenized, outputs_in_passes, run_texts
from freemerge.merging.export import label_settings


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters shared by every task (AdamW, linear warm-up then linear decay).

    ``max_train_examples`` caps the examples drawn from the train split per epoch (a fresh
    seeded draw every epoch), so large tasks cost no more than small ones.
    """

    epochs: int = 4
    max_train_examples: int = 2000
    batch_size: int = 16
    max_length: int = 128
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    seed: int = 0

    def fingerprint(self) -> str:
        return hashlib.sha256(
            json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        ).hexdigest()[:16]


@dataclass
class TrainResult:
    model: PreTrainedModel
    seconds: float
    steps: int
    losses: list[float]


def _length_bucketed_batches(
    lengths: np.ndarray, count: int, batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """A random draw of ``count`` rows cut into batches of similar length, in random order.

    Rows are sorted by token length within windows of 32 batches, so a batch pads little while
    every epoch still sees a fresh random draw and batch order.
    """
    order = rng.permutation(len(lengths))[:count]
    window = 32 * batch_size
    batches = []
    for start in range(0, count, window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def with_new_head(model_class: type, backbone: Path, label_names: list[str]) -> PreTrainedModel:
    """``model_class`` from the base model ``backbone`` with a new head for ``label_names``,
    without transformers' load report: its notes (the head "MISSING ... newly initialized",
    the base's pooler "UNEXPECTED" for a token model) describe what every fine-tune from a
    base does, and read as errors. A missing weight outside the head is still an error."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(
            backbone, output_loading_info=True, **label_settings(label_names)
        )
    finally:
        hf_logging.set_verbosity(level)
    missing = [key for key in info["missing_keys"] if "classifier" not in key]
    if missing:
        raise ValueError(f"{backbone}: weights missing beyond the new head: {missing[:5]}")
    return model


def fine_tune(
    backbone: Path, task: TaskData, recipe: Recipe, show_progress: bool = True
) -> TrainResult:
    """Fine-tune ``AutoModelForSequenceClassification`` from ``backbone`` on the train split."""
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = with_new_head(AutoModelForSequenceClassification, backbone, task.label_names)
    texts, labels = task.subset(task.split()["train"])
    tokens = Tokenized(tokenizer, texts, recipe.max_length)  # once, padded per batch below
    return _train(
        model, tokens, lambda rows: torch.from_numpy(labels[rows]), recipe, task.name, show_progress
    )


def fine_tune_tokens(
    backbone: Path, task: TokenTaskData, recipe: Recipe, show_progress: bool = True
) -> TrainResult:
    """Fine-tune ``AutoModelForTokenClassification`` from ``backbone`` on the train split:
    each sentence's words joined by spaces (as a client sends the text), each word's tag on
    its first token, the other tokens left out of the loss."""
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = with_new_head(AutoModelForTokenClassification, backbone, task.label_names)
    sentences, tags = task.subset(task.split()["train"])
    tokens = Tokenized(tokenizer, [" ".join(words) for words in sentences], recipe.max_length)
    ids = {name: i for i, name in enumerate(task.label_names)}
    targets = [
        [IGNORED if word is None else ids[tags[row][word]] for word in first_tokens(words, enc)]
        for row, (words, enc) in enumerate(zip(sentences, tokens.encoding.encodings, strict=True))
    ]

    def labels_for(rows: np.ndarray) -> torch.Tensor:
        longest = max(len(targets[i]) for i in rows)
        return torch.tensor([targets[i] + [IGNORED] * (longest - len(targets[i])) for i in rows])

    return _train(model, tokens, labels_for, recipe, task.name, show_progress)


IGNORED = -100  # a label the loss leaves out


def first_tokens(words: list[str], encoding: Encoding) -> list[int | None]:
    """Per token of ``" ".join(words)``: the index of the word it starts, or None (special
    tokens, and a word's later tokens)."""
    starts, offset = {}, 0
    for index, word in enumerate(words):
        starts[offset] = index
        offset += len(word) + 1
    found: list[int | None] = []
    for start, end in encoding.offsets:
        word = starts.pop(start, None) if end > start else None
        found.append(word)
    return found


def _train(
    model: PreTrainedModel,
    tokens: Tokenized,
    labels_for: Callable[[np.ndarray], torch.Tensor],
    recipe: Recipe,
    name: str,
    show_progress: bool,
) -> TrainResult:
    """The recipe's training loop over ``tokens`` (AdamW, warm-up then linear decay), batches
    of similar length drawn afresh every epoch; ``labels_for(rows)`` gives a batch's labels."""
    rng = np.random.default_rng(recipe.seed)
    lengths = np.array(tokens.lengths)
    per_epoch = min(len(lengths), recipe.max_train_examples)
    total_steps = recipe.epochs * math.ceil(per_epoch / recipe.batch_size)
    warmup = max(1, int(recipe.warmup_fraction * total_steps))
    optimizer = torch.optim.AdamW(  # fused: one kernel for all tensors, ~5x faster on CPU
        model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay, fused=True
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, (total_steps - step) / max(1, total_steps - warmup)),
    )
    model.train()
    losses = []
    start = time.perf_counter()
    with tqdm(total=total_steps, desc=f"fine-tune {name}", disable=not show_progress) as bar:
        for _ in range(recipe.epochs):
            for rows in _length_bucketed_batches(lengths, per_epoch, recipe.batch_size, rng):
                encoded = tokens.padded(rows, model.device)
                loss = model(**encoded, labels=labels_for(rows)).loss
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return TrainResult(model, time.perf_counter() - start, total_steps, losses)


@torch.no_grad()
def predict(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> np.ndarray:
    """Predicted class index per text, through the one tokenize-and-run loop."""
    model.eval()
    logits = run_texts(tokenizer, texts, max_length, model.device, lambda b: model(**b).logits)
    return logits.argmax(-1).numpy()


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels)) if len(labels) else float("nan")


def word_tags(
    rows: list[torch.Tensor], sentences: list[list[str]], tokens: Tokenized, names: list[str]
) -> list[list[str]]:
    """Each word's tag: the label its first token scores highest (``rows``: each text's token
    logits, its tokens only); a word truncation cut off is tagged "O"."""
    tags = []
    for row, words, encoding in zip(rows, sentences, tokens.encoding.encodings, strict=True):
        found = ["O"] * len(words)
        for logits, word in zip(row, first_tokens(words, encoding), strict=True):
            if word is not None:
                found[word] = names[int(logits.argmax())]
        tags.append(found)
    return tags


@torch.no_grad()
def token_logits(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> tuple[list[torch.Tensor], Tokenized]:
    """A token classifier's logits per text (its tokens only), through the one loop."""
    model.eval()
    tokens = Tokenized(tokenizer, texts, max_length)

    def forward(_rows: list[int], batch: BatchEncoding) -> list[torch.Tensor]:
        logits = model(**batch).logits.float().cpu()
        keep = batch["attention_mask"].bool().cpu()
        return [row[mask] for row, mask in zip(logits, keep, strict=True)]

    plan = PassPlan.for_device(model.device)
    return outputs_in_passes(tokens, plan.passes(tokens.lengths), model.device, forward), tokens
