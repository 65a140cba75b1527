"""Task kinds: everything that differs by what a task answers, in this module and its
torch-free half, :mod:`freemerge.merging.kind_rules` (the kinds' names, routes, options and
scoring rules, which the HTTP fronts check requests with).

A task's kind is read from its own model folder (:func:`kind_of_model`):

- a sentence-transformers folder (``modules.json``) is an **embedding** task: its sentence
  embedding is the pooling its ``1_Pooling/config.json`` names (CLS, mean, max, mean over
  sqrt(length)) of the backbone's last hidden states, no head tensors;
- a ``*ForTokenClassification`` (``config.architectures``) is a **token classification**
  task: per-token logits from the family's own token head, grouped into entities by
  transformers' own token-classification pipeline code (:class:`EntityGrouper`);
- a ``*ForSequenceClassification`` is a **single-label**, **multi-label** or **regression**
  task by its ``problem_type`` and label count, scored as transformers' text-classification
  pipeline scores it (:func:`~freemerge.merging.kind_rules.scoring_of`): softmax, sigmoid,
  or the raw logit. Its inputs may be text pairs (a cross-encoder: NLI labels, a relevance
  score).

Heads are computed by transformers' own classes (:class:`~freemerge.merging.families.TaskHead`
with the kind's head class); only the pooling of an embedding task is computed here, as
sentence-transformers' ``Pooling`` module defines it.
"""

from __future__ import annotations

import functools
import json
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Encoding
from transformers import PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
)
from transformers.pipelines.token_classification import (
    AggregationStrategy,
    TokenClassificationPipeline,
)

from freemerge.merging.families import TaskHead, config_family, config_from_dict, skeleton
from freemerge.merging.kind_rules import (
    EMBEDDING,
    MULTI_LABEL,
    REGRESSION,
    SEQUENCE_KINDS,
    SINGLE_LABEL,
    TOKEN_CLASSIFICATION,
    scoring_of,
)

# sentence-transformers' pooling modes, in the order it concatenates them.
POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")
ST_MODULES = {
    "sentence_transformers.models.Transformer": "transformer",
    "sentence_transformers.models.Pooling": "pooling",
    "sentence_transformers.models.Normalize": "normalize",
}


class KindError(ValueError):
    """A model folder whose task kind is not served, or whose settings are not supported."""


def kind_of_model(folder: Path, config: dict) -> str:
    """The task kind of the model saved in ``folder`` with config ``config`` (config.json)."""
    if (Path(folder) / "modules.json").is_file():
        return EMBEDDING
    architecture = (config.get("architectures") or [None])[0]
    if architecture in MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES.values():
        return TOKEN_CLASSIFICATION
    if architecture is not None and architecture not in (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()
    ):
        raise KindError(
            f"a {architecture} is not a task this server runs: give a sequence or token "
            "classifier, or a sentence-transformers folder (with modules.json)"
        )
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if config.get("problem_type") == REGRESSION or labels == 1:
        return REGRESSION
    if config.get("problem_type") == MULTI_LABEL:
        return MULTI_LABEL
    return SINGLE_LABEL


def head_class(kind: str, config: PretrainedConfig) -> type | None:
    """The family's model class whose head the task keeps (None: an embedding has no head)."""
    if kind == EMBEDDING:
        return None
    names = (
        MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES
        if kind == TOKEN_CLASSIFICATION
        else MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    )
    return getattr(transformers, names[config_family(config).model_type])


def backbone_tensors(kind: str, config: PretrainedConfig) -> frozenset[str]:
    """The backbone tensors a task of ``kind`` holds: the family's backbone, less those its
    head class leaves out (BERT's and ALBERT's token classifiers hold no pooler)."""
    return _backbone_tensors(kind, config.to_json_string())


@functools.lru_cache(maxsize=32)
def _backbone_tensors(kind: str, config_json: str) -> frozenset[str]:
    config = config_from_dict(json.loads(config_json))
    backbone = set(skeleton(config).state_dict())
    cls = head_class(kind, config)
    if cls is None:
        return frozenset(backbone)
    with torch.device("meta"):
        held = cls(config).state_dict()
    prefix = f"{cls.base_model_prefix}."
    return frozenset(n[len(prefix) :] for n in held if n.startswith(prefix)) & backbone


def embedding_settings(folder: Path, hidden_size: int) -> dict:
    """An embedding task's settings from its sentence-transformers files: ``pooling`` (modes,
    in concatenation order), ``normalize``, ``max_seq_length``, ``do_lower_case``,
    ``dimensions``. KindError for modules or pooling modes not supported."""
    folder = Path(folder)
    modules = json.loads((folder / "modules.json").read_text())
    kinds = [ST_MODULES.get(m.get("type")) for m in modules]
    if None in kinds or "pooling" not in kinds:
        unknown = [m.get("type") for m in modules if m.get("type") not in ST_MODULES]
        raise KindError(
            f"{folder}: sentence-transformers modules {unknown or ['(no Pooling)']} are not "
            "supported; supported: Transformer, Pooling, Normalize"
        )
    pooling_dir = next(m["path"] for m in modules if ST_MODULES[m["type"]] == "pooling")
    pooling = json.loads((folder / pooling_dir / "config.json").read_text())
    on = [mode for mode in POOLING_MODES if pooling.get(f"pooling_mode_{mode}")]
    other = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
    if not on or len(on) != len(other):
        raise KindError(f"{folder}: pooling {other} is not supported; supported: {POOLING_MODES}")
    bert_config = folder / "sentence_bert_config.json"
    settings = json.loads(bert_config.read_text()) if bert_config.is_file() else {}
    return {
        "pooling": on,
        "normalize": "normalize" in kinds,
        "max_seq_length": settings.get("max_seq_length"),
        "do_lower_case": bool(settings.get("do_lower_case", False)),
        "dimensions": hidden_size * len(on),
    }


def pooled(hidden: torch.Tensor, mask: torch.Tensor, modes: list[str]) -> torch.Tensor:
    """sentence-transformers' pooling of ``hidden`` (rows, tokens, width) over the tokens
    ``mask`` keeps, the modes concatenated; never in place (the output is shared by rows of
    other tasks)."""
    keep = mask.unsqueeze(-1).to(hidden.dtype)
    total = (hidden * keep).sum(1)
    count = keep.sum(1).clamp(min=1e-9)
    parts = {
        "cls_token": lambda: hidden[:, 0],
        "max_tokens": lambda: hidden.masked_fill(keep == 0, -1e9).max(1).values,
        "mean_tokens": lambda: total / count,
        "mean_sqrt_len_tokens": lambda: total / count.sqrt(),
    }
    return torch.cat([parts[mode]() for mode in modes], dim=1)


class EntityGrouper(TokenClassificationPipeline):
    """transformers' own token-classification postprocess (scores, words, aggregation,
    grouping of B-/I- tags) run on logits computed elsewhere: no model, no device."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> None:
        # Pipeline.__init__ is skipped: postprocess reads only the tokenizer and the config
        self.tokenizer = tokenizer
        self.model = types.SimpleNamespace(config=config)

    def entities(
        self, text: str, logits: torch.Tensor, encoding: Encoding, aggregation: str
    ) -> list[dict]:
        """The entities of ``text`` from its tokens' ``logits`` (its tokens only, no padding):
        ``{"label", "score", "start", "end", "text"}``, offsets into ``text``."""
        row = {
            "logits": logits[None].float(),
            "input_ids": torch.tensor(encoding.ids)[None],
            "offset_mapping": torch.tensor(encoding.offsets)[None],
            "special_tokens_mask": torch.tensor(encoding.special_tokens_mask)[None],
            "sentence": text,
            "word_ids": None,
            "word_to_chars_map": None,
        }
        with warnings.catch_warnings():  # its word heuristic warns per token for BPE tokenizers
            warnings.simplefilter("ignore")
            found = self.postprocess([row], aggregation_strategy=AggregationStrategy(aggregation))
        return [
            {
                "label": entity.get("entity_group", entity.get("entity")),
                "score": float(entity["score"]),
                "start": int(entity["start"]),
                "end": int(entity["end"]),
                "text": text[int(entity["start"]) : int(entity["end"])],
            }
            for entity in found
        ]


@dataclass
class TaskRunner:
    """One task at inference: its kind, its head (or pooling) on the backbone's output, and
    how a row's output becomes its answer."""

    kind: str
    labels: list[str]
    scoring: str | None
    head: TaskHead | None
    embedding: dict | None = None
    grouper: EntityGrouper | None = None

    def rows(self, output: object, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Each row's output on the CPU: logits (a token task's: its tokens only, by the
        attention mask), or an embedding task's pooled vector."""
        mask = batch["attention_mask"]
        if self.kind == EMBEDDING:
            return list(pooled(output[0], mask, self.embedding["pooling"]).float().cpu())
        logits = self.head(output, batch).float().cpu()
        if self.kind == TOKEN_CLASSIFICATION:
            return [row[keep.bool().cpu()] for row, keep in zip(logits, mask, strict=True)]
        return list(logits)

    def prepared(self, text: str | tuple[str, str]) -> str | tuple[str, str]:
        """The text as the task's own model reads it (sentence-transformers strips it, and
        lowercases it when its config says so)."""
        if self.kind != EMBEDDING:
            return text
        text = text.strip()
        return text.lower() if self.embedding["do_lower_case"] else text

    def token_limit(self, limit: int) -> int:
        """The task's token limit within the backbone's ``limit``."""
        own = self.embedding and self.embedding.get("max_seq_length")
        return min(limit, own) if own else limit

    def answer(self, row: torch.Tensor, text: object, encoding: Encoding, options: dict) -> dict:
        """A row's answer fields by kind (see the README's API section)."""
        if self.kind == EMBEDDING:
            vector = torch.nn.functional.normalize(row, dim=0) if options["normalize"] else row
            return {"embedding": vector.tolist()}
        if self.kind == TOKEN_CLASSIFICATION:
            return {"entities": self.grouper.entities(text, row, encoding, options["aggregation"])}
        scores = _scored(row, options.get("function_to_apply") or self.scoring)
        if self.kind == REGRESSION:
            return {"score": float(scores[0])}
        named = dict(zip(self.labels, scores.tolist(), strict=True))
        if self.kind == MULTI_LABEL:
            return {
                "labels": [k for k, s in named.items() if s >= options["threshold"]],
                "scores": named,
            }
        best = int(scores.argmax())
        return {"label": self.labels[best], "score": float(scores[best]), "scores": named}


def _scored(row: torch.Tensor, scoring: str | None) -> torch.Tensor:
    """A sequence row's logits as scores: ``softmax``, ``sigmoid``, or as they are."""
    if scoring == "softmax":
        return torch.softmax(row, dim=-1)
    return torch.sigmoid(row) if scoring == "sigmoid" else row


def task_runner(
    entry: dict,
    config: PretrainedConfig,
    head: dict[str, torch.Tensor] | None,
    device: torch.device,
    tokenizer: PreTrainedTokenizerBase,
) -> TaskRunner:
    """A task's runner from its manifest ``entry``, ``config`` and ``head`` tensors (an entry
    without ``task_kind``, written before kinds, is single-label, as it was served)."""
    kind = entry.get("task_kind", SINGLE_LABEL)
    if kind == EMBEDDING:
        return TaskRunner(kind, [], None, None, embedding=entry["embedding"])
    module = TaskHead(config, head, device, head_class(kind, config))
    grouper = EntityGrouper(tokenizer, config) if kind == TOKEN_CLASSIFICATION else None
    return TaskRunner(kind, module.labels, entry.get("scoring", "softmax"), module, grouper=grouper)


def model_runner(folder: Path, config: PretrainedConfig) -> TaskRunner:
    """The answering rules of the fine-tuned sequence model in ``folder`` (no head: the
    separate-models baseline runs the whole model and hands its logits to :meth:`answer`)."""
    kind = kind_of_model(folder, config.to_dict())
    if kind not in SEQUENCE_KINDS:
        raise KindError(f"{folder}: the separate-models baseline serves sequence tasks, not {kind}")
    labels = [config.id2label[i] for i in range(config.num_labels)]
    return TaskRunner(kind, labels, scoring_of(kind, config.to_dict()), None)
