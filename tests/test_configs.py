"""The shipped configs parse (over a zoo) and say what the README says they do."""

from pathlib import Path

import pytest

from freemerge.merging.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_parse(name, tiny_zoo):
    config = load_config(CONFIGS / name, zoo=tiny_zoo.root)
    assert [m.name for m in config.models] == list(tiny_zoo.tasks)


def test_the_recommended_config_is_fr_with_rank_8_linear_experts_and_a_router(tiny_zoo):
    config = load_config(CONFIGS / "free.yaml", zoo=tiny_zoo.root)
    assert config.method == "free" and config.parameters["scaling"] == 0.5
    assert config.parameters["filter"].mode == "reference"
    assert config.parameters["filter"].ratio == 0.5
    assert config.experts.kind == "lowrank"
    assert config.experts.settings == {
        "rank": 8,
        "vectors": "skip",
        "skip": r"embeddings\.",
        "dtype": "float16",
    }
    assert config.router is not None
