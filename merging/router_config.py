"""How a router is fitted: its kinds and settings, with their defaults (no torch here, so
the CLI's ``--help`` stays fast). The kinds' features: :mod:`freemerge.merging.router`."""

from __future__ import annotations

from dataclasses import dataclass

PARTS = ("ngrams", "embeddings", "layers", "experts")  # the order of a kind's features
DENSE_PARTS = ("embeddings", "layers", "experts")  # the parts that read the backbone
FORWARD_PARTS = ("layers", "experts")  # the parts that need a forward of the backbone
# The kinds the router benchmark compares (any '+'-joined set of PARTS is a kind).
ROUTER_KINDS = (
    "ngrams",
    "embeddings",
    "layers",
    "experts",
    "ngrams+embeddings",
    "ngrams+layers",
    "ngrams+experts",
)


def parse_kind(kind: str) -> tuple[str, ...]:
    """The parts of a kind, in :data:`PARTS` order; ValueError for an unknown or empty kind."""
    parts = [part.strip() for part in str(kind).split("+")]
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise ValueError(f"unknown router kind {kind!r}: a '+'-joined set of {', '.join(PARTS)}")
    return tuple(part for part in PARTS if part in parts)


DEFAULT_ROUTER_KIND = "ngrams+embeddings"  # picked on validation (benchmarks/results/router.md)


@dataclass(frozen=True)
class RouterConfig:
    """How the router is fitted; ``data`` maps each task to a JSONL file of its texts."""

    kind: str = DEFAULT_ROUTER_KIND
    examples_per_task: int = 2000
    buckets: int = 1 << 18  # n-gram hash buckets
    ngram_dim: int = 32  # n-gram embedding width
    hidden: int = 0  # 0: a linear head; else an MLP with this many hidden units
    epochs: int = 10
    learning_rate: float = 0.01
    weight_decay: float = 0.0
    batch_size: int = 32
    calibration_share: float = 0.2  # of each task's texts, held out to fit the temperature
    max_length: int = 128
    seed: int = 0
    data: dict[str, str] | None = None

    def __post_init__(self) -> None:
        parse_kind(self.kind)
        if not 0 < self.calibration_share < 1:
            raise ValueError(f"calibration_share must be in (0, 1), got {self.calibration_share}")
        for name in ("examples_per_task", "buckets", "epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"router {name} must be >= 1, got {getattr(self, name)}")
