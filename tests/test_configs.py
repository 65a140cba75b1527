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
    # tasks of other kinds take richer experts (benchmarks/results/kinds.md)
    assert config.experts.by_kind == {
        "embedding": {"vectors": "full"},
        "token_classification": {"rank": 32, "vectors": "full"},
    }
    assert config.experts.make("embedding").settings["vectors"] == "full"
    assert config.experts.make("single_label_classification").settings == {
        "kind": "lowrank",
        "rank": "8",
        "vectors": "skip",
        "skip": r"embeddings\.",
        "dtype": "float16",
    }
    assert config.router is not None


@pytest.mark.parametrize(
    ("by_kind", "message"),
    [
        ({"ner": {"rank": 4}}, "'ner' is not a task kind; kinds: single_label_classification"),
        ({"embedding": {"colour": 1}}, "experts.by_kind.embedding: 'colour' is not a setting"),
        ({"embedding": "full"}, "experts.by_kind.embedding must be a mapping"),
        (["embedding"], "experts.by_kind must be a mapping"),
    ],
)
def test_expert_settings_by_kind_are_checked(tiny_zoo, by_kind, message):
    from freemerge.merging.config import ConfigError, parse_config

    raw = {"zoo": str(tiny_zoo.root), "experts": {"kind": "lowrank", "by_kind": by_kind}}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)
