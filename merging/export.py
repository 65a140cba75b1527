"""``freemerge export``: one task as a standalone Hugging Face sequence-classification model."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification

from merging.artifact import Artifact, staged_directory
from merging.runtime import MergedClassifier


def export_task(artifact: Artifact, task: str, out: Path, overwrite: bool = False) -> Path:
    """Write backbone + task's expert + task's head (tokenizer included) to ``out``."""
    labels = artifact.task(task)["labels"]
    runtime = MergedClassifier(artifact, row_adapters=False)  # plain layers to copy from
    config = AutoConfig.from_pretrained(
        artifact.backbone,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model = AutoModelForSequenceClassification.from_config(config)
    config.architectures = [type(model).__name__]
    with runtime.expert_applied(task):
        model.base_model.load_state_dict(runtime.backbone.state_dict())
    head = load_file(str(artifact.path(artifact.task(task)["head"])))
    model.classifier.load_state_dict(
        {"weight": head["classifier.weight"], "bias": head["classifier.bias"]}
    )
    with staged_directory(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        runtime.tokenizer.save_pretrained(tmp)
    return Path(out)
