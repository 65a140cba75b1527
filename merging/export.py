"""``freemerge export``: one task as a standalone Hugging Face model, or as a PEFT LoRA adapter.

``--format hf`` writes backbone + expert + head as one ``*ForSequenceClassification``
directory. ``--format peft`` writes a low-rank expert as a LoRA adapter (``lora_A`` = A,
``lora_B`` = B, ``lora_alpha`` = r so the scaling is 1) with the head in ``modules_to_save``;
``peft.PeftModel.from_pretrained`` loads it onto the artifact's backbone, so multi-LoRA servers
(vLLM, LoRAX) can serve our experts too.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from freemerge.merging.artifact import Artifact, staged_directory
from freemerge.merging.experts import LowRankExpert, load_expert


def label_settings(labels: list[str]) -> dict:
    """A classifier config's label fields for ``labels``."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def export_task(artifact: Artifact, task: str, out: Path, overwrite: bool = False) -> Path:
    """Write backbone + task's expert + task's head (tokenizer included) to ``out``: the
    expert is applied to the weights in place, as :meth:`Expert.applied` defines it."""
    entry = artifact.task(task)  # an unknown task fails with the list of known ones
    config = AutoConfig.from_pretrained(artifact.backbone, **label_settings(entry["labels"]))
    model = AutoModelForSequenceClassification.from_config(config)
    config.architectures = [type(model).__name__]
    backbone = AutoModel.from_pretrained(artifact.backbone)
    expert = load_expert(artifact.path(entry["expert"])) if entry.get("expert") else None
    applied = expert.applied(dict(backbone.named_parameters())) if expert else nullcontext()
    with torch.no_grad():
        with applied:  # load_state_dict copies, so the export keeps theta_m + e_t
            model.base_model.load_state_dict(backbone.state_dict())
        head = load_file(str(artifact.path(entry["head"])))
        model.classifier.weight.copy_(head["classifier.weight"])
        model.classifier.bias.copy_(head["classifier.bias"])
    with staged_directory(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(artifact.backbone).save_pretrained(tmp)
    return Path(out)


def export_peft(artifact: Artifact, task: str, out: Path, overwrite: bool = False) -> Path:
    """Write task ``task``'s low-rank expert and head as a PEFT LoRA adapter directory."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("--format peft needs the peft package: pip install peft") from None
    entry = artifact.task(task)  # an unknown task fails with the list of known ones
    expert = load_expert(artifact.path(entry["expert"])) if entry.get("expert") else None
    if not isinstance(expert, LowRankExpert) or expert.full:
        raise ValueError(
            f"task {task!r} has no low-rank expert on linear layers only (kind "
            f"{getattr(expert, 'kind', None)!r}); PEFT LoRA export needs `kind: lowrank` with "
            "`vectors: skip` and the embeddings skipped"
        )
    model = AutoModelForSequenceClassification.from_pretrained(
        artifact.backbone, **label_settings(entry["labels"])
    )
    targets = sorted(name.removesuffix(".weight") for name in expert.factors)
    config = LoraConfig(
        r=expert.rank,
        lora_alpha=expert.rank,
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    head = load_file(str(artifact.path(entry["head"])))
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            target = name.split(f"{model.base_model_prefix}.", 1)[-1]
            if target in targets and hasattr(module, "lora_A"):
                b, a = expert.factors[f"{target}.weight"]
                module.lora_A["default"].weight.copy_(a)
                module.lora_B["default"].weight.copy_(b)
        saved = peft_model.base_model.model.classifier.modules_to_save["default"]
        saved.weight.copy_(head["classifier.weight"])
        saved.bias.copy_(head["classifier.bias"])
    peft_model.peft_config["default"].base_model_name_or_path = str(artifact.backbone.resolve())
    with staged_directory(out, overwrite) as tmp:
        peft_model.save_pretrained(tmp)
    return Path(out)
