"""``freemerge export``: one task as a standalone Hugging Face model, or as a PEFT LoRA adapter.

``--format hf`` writes backbone + expert + head as one ``*ForSequenceClassification``
directory of the artifact's family. ``--format peft`` writes a low-rank expert as a LoRA
adapter (``lora_A`` = A, ``lora_B`` = B, ``lora_alpha`` = r so the scaling is 1) with the
head's modules in ``modules_to_save``;
``peft.PeftModel.from_pretrained`` loads it onto the artifact's backbone, so multi-LoRA servers
(vLLM, LoRAX) can serve our experts too.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, PretrainedConfig

from freemerge.merging.artifact import Artifact, staged_directory
from freemerge.merging.experts import LowRankExpert, load_expert
from freemerge.merging.families import config_family, head_modules, load_backbone, task_config
from freemerge.merging.kind_rules import SEQUENCE_KINDS


def label_settings(labels: list[str]) -> dict:
    """A classifier config's label fields for ``labels``."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def _task_parts(artifact: Artifact, task: str) -> tuple[PretrainedConfig, dict[str, torch.Tensor]]:
    """Task ``task``'s config (labels set, architectures its classifier) and head tensors."""
    entry = artifact.task(task)  # an unknown task fails with the list of known ones
    kind = entry.get("task_kind", SEQUENCE_KINDS[0])
    if kind not in SEQUENCE_KINDS:
        raise ValueError(f"task {task!r} is a {kind} task; export writes sequence tasks only")
    config = task_config(artifact, task)
    config.update(label_settings(entry["labels"]))
    config.architectures = [config_family(config).classifier_class.__name__]
    return config, load_file(str(artifact.path(entry["head"])))


def export_task(artifact: Artifact, task: str, out: Path, overwrite: bool = False) -> Path:
    """Write backbone + task's expert + task's head (tokenizer included) to ``out``, as the
    family's ``*ForSequenceClassification``: the expert is applied to the weights in place, as
    :meth:`Expert.applied` defines it."""
    entry = artifact.task(task)
    config, head = _task_parts(artifact, task)
    model = config_family(config).classifier_class(config)
    backbone = load_backbone(artifact.backbone)
    expert = load_expert(artifact.path(entry["expert"])) if entry.get("expert") else None
    applied = expert.applied(dict(backbone.named_parameters())) if expert else nullcontext()
    prefix = model.base_model_prefix
    with torch.no_grad(), applied:  # load_state_dict copies, so the export keeps theta_m + e_t
        weights = {f"{prefix}.{name}": t for name, t in backbone.state_dict().items()}
        model.load_state_dict({**weights, **head}, strict=True)
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
    config, head = _task_parts(artifact, task)
    family = config_family(config)
    model = family.classifier_class(config)
    model.base_model.load_state_dict(load_backbone(artifact.backbone).state_dict(), strict=True)
    targets = sorted(name.removesuffix(".weight") for name in expert.factors)
    saved_modules = head_modules(head)
    rank = max(a.shape[0] for _, a in expert.factors.values())  # a narrow matrix's may be less
    lora = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=list(saved_modules),  # PEFT adds its own names to the list it gets
        task_type="SEQ_CLS",
        bias="none",
    )
    peft_model = get_peft_model(model, lora)
    _copy_lora(peft_model, family.prefix, expert, targets, saved_modules, head)
    peft_model.peft_config["default"].base_model_name_or_path = str(artifact.backbone.resolve())
    with staged_directory(out, overwrite) as tmp:
        peft_model.save_pretrained(tmp)
    return Path(out)


def _copy_lora(
    peft_model: torch.nn.Module,
    prefix: str,
    expert: LowRankExpert,
    targets: list[str],
    saved_modules: list[str],
    head: dict[str, torch.Tensor],
) -> None:
    """The expert's factors into the LoRA layers (zero-padded to the adapter's rank), the
    head into ``modules_to_save``."""
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            target = name.split(f"{prefix}.", 1)[-1]
            if target in targets and hasattr(module, "lora_A"):
                b, a = expert.factors[f"{target}.weight"]
                module.lora_A["default"].weight.zero_()[: a.shape[0]].copy_(a)
                module.lora_B["default"].weight.zero_()[:, : b.shape[1]].copy_(b)
        for module_name in saved_modules:
            saved = getattr(inner, module_name).modules_to_save["default"]
            part = {
                n.split(".", 1)[1]: t for n, t in head.items() if n.split(".", 1)[0] == module_name
            }
            saved.load_state_dict(part, strict=True)
