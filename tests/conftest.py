"""Shared fixtures: the real wheel cache, and a tiny BERT built from a config (no download)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from freemerge.benchmarks.finetune import Recipe
from freemerge.benchmarks.sources import backbone_dir, default_cache_dir
from freemerge.benchmarks.zoo import Zoo, build_zoo
from freemerge.merging.config import parse_config
from freemerge.merging.merge import run_merge
from freemerge.serving.lowrank_kernel import cpu_kernel

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


@pytest.fixture(scope="session", autouse=True)
def cpu_kernel_built() -> None:
    """The fused CPU kernel compiled into the cache once, before any test starts replicas
    (on a fresh machine each of their processes would otherwise build its own)."""
    cpu_kernel()


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The user's cache: wheels are downloaded once and hash-checked on every use."""
    return default_cache_dir()


@pytest.fixture(scope="session")
def real_backbone(cache_dir: Path) -> Path:
    return backbone_dir(cache_dir)


@pytest.fixture(scope="session")
def tiny_backbone(real_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with the real tokenizer, saved as a Hugging Face directory."""
    target = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(real_backbone)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(target, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(real_backbone / name, target / name)
    return target


TINY_RECIPE = Recipe(
    epochs=2, max_train_examples=96, batch_size=16, max_length=32, learning_rate=1e-3
)


@pytest.fixture(scope="session")
def tiny_zoo(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """Three real tasks fine-tuned briefly from the tiny BERT."""
    return build_zoo(
        tmp_path_factory.mktemp("zoo") / "tiny",
        ["sms_spam", "bbc_topic", "debate_party"],
        TINY_RECIPE,
        tiny_backbone,
        show_progress=False,
    )


LINEAR_LOWRANK = {"kind": "lowrank", "rank": 4}  # the defaults: linear layers only


@pytest.fixture(scope="session")
def tiny_routed_artifact(tiny_zoo: Zoo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FREE merge of the tiny zoo: rank-4 experts on the linear layers, and a router."""
    out = tmp_path_factory.mktemp("routed") / "art"
    config = parse_config(
        {
            "zoo": str(tiny_zoo.root),
            "method": "free",
            "experts": LINEAR_LOWRANK,
            "router": {"examples_per_task": 60, "epochs": 20},
        }
    )
    run_merge(config, out, show_progress=False)
    return out


# Once in a few full runs the interpreter crashed (SIGSEGV) while finalizing, after every test
# had passed and pytest had printed its summary: native threads of Ray's in-process driver,
# torch and tokenizers tearing down in no fixed order. The results are final by then, so the
# run ends with pytest's own exit status without that finalization. Ray is already shut down
# by the fixtures that started it (`live_server`).
_EXIT_STATUS: list[int] = []


@pytest.fixture(scope="session")
def kinds(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny models of every task kind and their artifact (tests/tiny_kinds.py)."""
    from tiny_kinds import make_kinds_artifact

    return make_kinds_artifact(tmp_path_factory.mktemp("kinds"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _EXIT_STATUS:
        import os
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
