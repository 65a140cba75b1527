import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from freemerge.benchmarks.evaluate import task_texts
from freemerge.merging.artifact import open_artifact
from freemerge.merging.config import parse_config
from freemerge.merging.export import export_peft
from freemerge.merging.merge import run_merge
from freemerge.serving.cli import main
from freemerge.serving.runtime import MergedClassifier


@pytest.fixture(scope="module")
def lowrank_artifact(tiny_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("peft") / "art"
    experts = {"kind": "lowrank", "rank": 3}
    run_merge(
        parse_config({"zoo": str(tiny_zoo.root), "method": "free", "experts": experts}),
        out,
        show_progress=False,
    )
    return open_artifact(out)


def test_peft_adapter_gives_the_artifacts_logits(lowrank_artifact, tmp_path):
    runtime = MergedClassifier(lowrank_artifact)
    texts = task_texts("bbc_topic", "test")[0][:6]
    for task in ("bbc_topic", "debate_party"):
        out = export_peft(lowrank_artifact, task, tmp_path / task)
        labels = lowrank_artifact.tasks[task]["labels"]
        base = AutoModelForSequenceClassification.from_pretrained(
            lowrank_artifact.backbone, num_labels=len(labels)
        )
        model = PeftModel.from_pretrained(base, out).eval()
        tokenizer = AutoTokenizer.from_pretrained(lowrank_artifact.backbone)
        with torch.no_grad():
            logits = model(
                **tokenizer(
                    texts, padding=True, truncation=True, max_length=128, return_tensors="pt"
                )
            ).logits
        assert torch.allclose(logits, runtime.logits(task, texts), atol=1e-4)


def test_peft_export_refuses_sparse_experts(tiny_zoo, tmp_path):
    run_merge(
        parse_config({"zoo": str(tiny_zoo.root), "method": "free", "experts": {"kind": "sparse"}}),
        tmp_path / "sparse",
        show_progress=False,
    )
    assert (
        main(
            [
                "export",
                str(tmp_path / "sparse"),
                "--task",
                "sms_spam",
                "--format",
                "peft",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "x").exists()
