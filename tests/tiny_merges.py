"""Merges of the tiny zoo that tests build for themselves."""

from freemerge.merging.config import parse_config
from freemerge.merging.merge import run_merge

LINEAR_LOWRANK = {"kind": "lowrank", "rank": 4}  # as conftest's tiny_routed_artifact
# The router kind that reads the embeddings alone fits in a fraction of a second; the n-gram
# kinds take minutes here on a loaded machine. A refit reuses the artifact's own settings.
QUICK_ROUTER = {"kind": "embeddings", "examples_per_task": 30, "epochs": 10}


def merged(zoo, out, experts, models=None, router=None):
    """FREE over ``zoo`` (its ``models``, default all) with ``experts`` and ``router``."""
    raw = {"zoo": str(zoo.root), "method": "free", "experts": experts, "router": router}
    if models is not None:
        raw["models"] = models
    run_merge(parse_config(raw), out, show_progress=False)
    return out
