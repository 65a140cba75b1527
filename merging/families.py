"""Encoder families: everything that differs by model architecture, in this one module.

A family is keyed by the config's ``model_type``. What can be read from transformers' own
classes is read from them, never written down per family:

- the task's head: every tensor of the family's ``*ForSequenceClassification`` outside its
  ``base_model_prefix`` (BERT's ``classifier``, RoBERTa's ``classifier.dense`` and
  ``classifier.out_proj``, DistilBERT's ``pre_classifier``, DeBERTa's ``pooler``, ModernBERT's
  ``head``, ...); a head is computed by that class's own ``forward`` on a backbone output
  (:class:`TaskHead`), so the math is the library's;
- the matrices the FR filter targets: the weights of the ``nn.Linear`` modules inside the
  encoder's blocks (modules held in an ``nn.ModuleList``), found by module type;
- the matrices low-rank experts factor: the weights of every ``nn.Linear`` of the backbone;
- the tokenizer's inputs: those the backbone's ``forward`` names (DistilBERT, MPNet and
  ModernBERT take no ``token_type_ids``).

A :class:`Family` entry holds only what cannot be read off the classes: how to build the
backbone the family's classifiers hold, how its positions count, and whether its layers run
on inputs shared by the whole batch. Adding a family is one entry (and one test).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

if TYPE_CHECKING:
    from freemerge.merging.artifact import Artifact

# Config keys that belong to a task, not to the backbone: fine-tunes may differ from the base
# in these (labels, head settings, dropout, bookkeeping), never in any other.
TASK_CONFIG_KEYS = frozenset(
    {
        "architectures",
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "finetuning_task",
        "transformers_version",
        "_name_or_path",
        "torch_dtype",
        "dtype",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "use_cache",
        "gradient_checkpointing",
    }
)
TASK_CONFIG_PREFIXES = ("classifier_", "cls_", "pooler_", "summary_")


class FamilyError(ValueError):
    """A model of an unsupported family, or models that cannot share one backbone."""


@dataclass(frozen=True)
class Family:
    """What a family needs beyond what transformers' classes say.

    ``backbone_kwargs``: passed to ``AutoModel`` so the backbone is the one the family's
    classifiers hold (RoBERTa's classifiers hold no pooler). ``positions_from_padding``:
    positions count from the padding index + 1 (RoBERTa-style), so that many fewer fit; the
    padding index is the config's ``pad_token_id`` unless ``padding_idx`` fixes it.
    ``mixed_task_passes``: False where a layer also runs on an input shared by the whole
    batch (DeBERTa's relative-position projections), so one pass holds one task's rows.
    """

    model_type: str
    backbone_kwargs: dict = field(default_factory=dict)
    positions_from_padding: bool = False
    padding_idx: int | None = None
    mixed_task_passes: bool = True

    @property
    def classifier_class(self) -> type[PreTrainedModel]:
        """The family's ``*ForSequenceClassification``."""
        return getattr(
            transformers, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[self.model_type]
        )

    @property
    def backbone_class_name(self) -> str:
        """The family's bare model class (``AutoModel``'s), as a config's ``architectures``."""
        return MODEL_MAPPING_NAMES[self.model_type]

    @property
    def prefix(self) -> str:
        """Where the backbone sits inside the family's task models (``bert``, ``model``...)."""
        return self.classifier_class.base_model_prefix


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("bert"),
        Family("roberta", {"add_pooling_layer": False}, positions_from_padding=True),
        Family("xlm-roberta", {"add_pooling_layer": False}, positions_from_padding=True),
        Family("mpnet", {"add_pooling_layer": False}, positions_from_padding=True, padding_idx=1),
        Family("electra"),
        Family("distilbert"),
        Family("deberta-v2", mixed_task_passes=False),
        Family("modernbert"),
        Family("albert"),
    )
}


def family_of(model_type: object) -> Family:
    """The family of ``model_type``; FamilyError naming it and the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise FamilyError(
            f"model type {model_type!r} is not supported; supported families: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


def config_family(config: PretrainedConfig | dict) -> Family:
    """The family of a model config (a ``PretrainedConfig`` or a ``config.json`` mapping)."""
    model_type = config.get("model_type") if isinstance(config, dict) else config.model_type
    return family_of(model_type)


def backbone_config_differences(base: dict, model: dict) -> list[str]:
    """The backbone settings (config keys) in which ``model`` differs from ``base``: every key
    both configs hold except a task's own (labels, head settings, dropout, bookkeeping)."""
    return [
        key
        for key in sorted(set(base) & set(model))
        if key not in TASK_CONFIG_KEYS
        and not key.startswith(TASK_CONFIG_PREFIXES)
        and "dropout" not in key
        and base[key] != model[key]
    ]


def skeleton(config: PretrainedConfig) -> PreTrainedModel:
    """The family's backbone on the meta device: names, shapes and module types, no weights
    (built once per config: a merge asks for it more than once)."""
    return _skeleton(config.to_json_string())


@functools.lru_cache(maxsize=8)
def _skeleton(config_json: str) -> PreTrainedModel:
    config = config_from_dict(json.loads(config_json))
    with torch.device("meta"):
        return AutoModel.from_config(config, **config_family(config).backbone_kwargs)


def layer_matrices(model: torch.nn.Module) -> list[str]:
    """The weights of the ``nn.Linear`` modules inside the encoder's blocks (the modules an
    ``nn.ModuleList`` holds): the attention and feed-forward matrices, in module order."""
    blocks = [
        name for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)
    ]
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and any(name.startswith(f"{block}.") for block in blocks)
    ]


def linear_weights(model: torch.nn.Module) -> list[str]:
    """The weights of every ``nn.Linear`` of ``model``, in module order."""
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]


def head_tensor_names(config: PretrainedConfig, model_class: type | None = None) -> list[str]:
    """The tensors of a task's head: those of ``model_class`` (default: the family's
    ``*ForSequenceClassification``), for ``config``'s labels, outside its backbone."""
    name = (model_class or config_family(config).classifier_class).__name__
    return list(_classifier_without_backbone(_head_settings(config), name).state_dict())


def load_backbone(path: Path, device: torch.device | str = "cpu") -> PreTrainedModel:
    """The backbone saved at ``path`` (an artifact's ``backbone/``), as the family's
    classifiers hold it, in eval mode; FamilyError if a weight it needs is not in the file."""
    config = AutoConfig.from_pretrained(path)
    family = config_family(config)
    model, info = AutoModel.from_pretrained(
        path, output_loading_info=True, **family.backbone_kwargs
    )
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise FamilyError(f"{path}: the backbone's file lacks {', '.join(missing[:5])}")
    return model.to(device).eval()


def load_classifier(path: Path, device: torch.device | str = "cpu") -> PreTrainedModel:
    """A fine-tuned model saved at ``path`` as its family's ``*ForSequenceClassification``
    (safetensors only), in eval mode: the separate-models baseline."""
    family = config_family(AutoConfig.from_pretrained(path))
    model = family.classifier_class.from_pretrained(path, use_safetensors=True)
    return model.to(device).eval()


def load_tokenizer(path: Path, model: PreTrainedModel) -> PreTrainedTokenizerBase:
    """The tokenizer saved at ``path``, giving only the inputs ``model``'s forward names."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    accepted = inspect.signature(type(model).forward).parameters
    tokenizer.model_input_names = [n for n in tokenizer.model_input_names if n in accepted]
    return tokenizer


def token_limit(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> int:
    """The most tokens one text may have: the tokenizer's limit, and the positions the model
    has (RoBERTa-style families spend ``pad_token_id + 1`` of them before the first token)."""
    positions = config.max_position_embeddings
    family = config_family(config)
    if family.positions_from_padding:
        padding = family.padding_idx if family.padding_idx is not None else config.pad_token_id
        positions -= (padding or 0) + 1
    return min(tokenizer.model_max_length, positions)


def head_modules(names: Iterable[str]) -> list[str]:
    """The top-level modules holding a head's tensors (PEFT's ``modules_to_save``)."""
    return sorted({name.split(".", 1)[0] for name in names})


class _GivenOutput(torch.nn.Module):
    """Stands in for a classifier's backbone: returns the output it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.output: object = None

    def forward(self, *_args: object, **_kwargs: object) -> object:
        return self.output


def config_from_dict(values: dict) -> PretrainedConfig:
    """A config from a ``config.json`` mapping (its ``model_type`` picks the class)."""
    return CONFIG_MAPPING[config_family(values).model_type].from_dict(values)


@functools.lru_cache(maxsize=64)
def _classifier_without_backbone(settings: str, class_name: str) -> PreTrainedModel:
    """The family's task model ``class_name`` for a config (JSON, labels left out) on the
    meta device, its backbone replaced by :class:`_GivenOutput`: built once per distinct head
    config, since building costs tens of milliseconds and a replica may hold a thousand tasks."""
    config = config_from_dict(json.loads(settings))
    family = config_family(config)
    with torch.device("meta"):  # the backbone part is never built
        model = getattr(transformers, class_name)(config)
    setattr(model, family.prefix, _GivenOutput())
    if any(True for _ in model.buffers()):
        raise FamilyError(f"{family.model_type}: a head with buffers is not supported")
    return model


def _head_settings(config: PretrainedConfig) -> str:
    """``config`` as JSON without its label names (the key of a classifier template)."""
    settings = config.to_dict()
    for key in ("id2label", "label2id", "_name_or_path", "transformers_version"):
        settings.pop(key, None)
    settings["num_labels"] = config.num_labels
    return json.dumps(settings, sort_keys=True)


class TaskHead(torch.nn.Module):
    """A task's head: the family's own task model (``model_class``; default its
    ``*ForSequenceClassification``) with its backbone replaced by the output of a backbone
    pass, so its ``forward`` (first-token or mean pooling, dense, activation, pooler, ...)
    computes the logits from the task's own tensors."""

    def __init__(
        self,
        config: PretrainedConfig,
        tensors: dict[str, torch.Tensor],
        device: torch.device,
        model_class: type | None = None,
    ) -> None:
        super().__init__()
        name = (model_class or config_family(config).classifier_class).__name__
        model = copy.deepcopy(_classifier_without_backbone(_head_settings(config), name))
        model.config = config
        model.to_empty(device=device)
        model.load_state_dict(tensors, strict=True)
        self.model = model.eval()
        self.given = getattr(model, config_family(config).prefix)
        self.labels = [config.id2label[i] for i in range(config.num_labels)]

    def forward(self, output: object, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logits for the rows of ``output`` (the backbone's output for ``batch``)."""
        self.given.output = output
        try:
            return self.model(**batch).logits
        finally:
            self.given.output = None


def task_config(artifact: Artifact, task: str) -> PretrainedConfig:
    """Task ``task``'s config: its own fine-tune's config.json when the artifact holds it,
    else the backbone's with the task's labels (artifacts written before task configs)."""
    entry = artifact.task(task)  # an unknown task fails with the list of known ones
    if entry.get("config"):
        return config_from_dict(json.loads(artifact.path(entry["config"]).read_text()))
    labels = entry["labels"]
    return AutoConfig.from_pretrained(
        artifact.backbone,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
