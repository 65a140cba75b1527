"""``freemerge bench revision``: the engine's tagged forward in this tree against another git
revision's, on the same artifact and texts, in interleaved rounds.

Each round runs the revision, then this tree (A B, ``rounds`` times), each side in a fresh
process that imports the engine from its own checkout (the revision's: a detached ``git
worktree``, removed after). Per side and round: the median seconds of ``repeats`` calls of
``MergedClassifier.classify_rows`` for one tagged text (batch 1) and for 16 tagged texts of
mixed tasks (batch 16), at most 128 tokens each, after a warm-up. Reported per round as this
tree's time over the revision's, then median and range: a change is "no slower" when the range
holds 1.
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from freemerge.benchmarks.judging import spread
from freemerge.benchmarks.tables import markdown_table, median_and_range

BATCHES = {"batch 1": 1, "batch 16": 16}
MAX_TOKENS = 128


def _import_from(root: Path) -> None:
    """Make ``freemerge.merging`` and ``freemerge.serving`` (and their submodules) come from
    the checkout at ``root`` (any of them imported already is dropped first)."""
    for loaded in [
        m for m in sys.modules if m.startswith(("freemerge.merging", "freemerge.serving"))
    ]:
        del sys.modules[loaded]
    for name in ("merging", "serving"):
        spec = importlib.util.spec_from_file_location(
            f"freemerge.{name}",
            root / name / "__init__.py",
            submodule_search_locations=[str(root / name)],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)


def tree_costs(
    root: str | None, artifact: str, texts: list[str], tasks: list[str], repeats: int
) -> dict[str, float]:
    """Seconds per call (median of ``repeats``) per batch size, with the engine of the
    checkout at ``root`` (None: this tree). Runs in a fresh process."""
    if root is not None:
        _import_from(Path(root))
    from freemerge.merging.artifact import open_artifact
    from freemerge.serving.runtime import MergedClassifier

    model = MergedClassifier(open_artifact(Path(artifact)))
    costs = {}
    for label, size in BATCHES.items():
        rows, row_tasks = texts[:size], tasks[:size]
        for _ in range(3):
            model.classify_rows(rows, row_tasks, max_length=MAX_TOKENS)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.classify_rows(rows, row_tasks, max_length=MAX_TOKENS)
            seconds.append(time.perf_counter() - start)
        costs[label] = statistics.median(seconds)
    return costs


@contextmanager
def worktree(revision: str) -> Iterator[Path]:
    """A detached checkout of ``revision`` in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="freemerge-revision-") as scratch:
        path = Path(scratch) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--quiet", str(path), revision], check=True
        )
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], check=False)


def run_revision_bench(
    artifact: Path, revision: str, texts: list[str], tasks: list[str], rounds: int, repeats: int
) -> dict:
    """``rounds`` interleaved rounds of the revision and this tree; the JSON-able result."""
    from freemerge.benchmarks.machine import describe_machine
    from freemerge.benchmarks.spawn import run_in_child

    commit = subprocess.run(
        ["git", "rev-parse", revision], capture_output=True, text=True, check=True
    ).stdout.strip()
    per_round = []
    with worktree(commit) as old:
        for _ in range(rounds):
            sides = {}
            for side, root in (("revision", str(old)), ("this tree", None)):
                sides[side] = run_in_child(
                    tree_costs, root, str(artifact), texts, tasks, repeats, timeout=1800
                )
            per_round.append(sides)
    ratios = {
        label: [r["this tree"][label] / r["revision"][label] for r in per_round]
        for label in BATCHES
    }
    return {
        "machine": describe_machine(),
        "revision": commit,
        "artifact": str(artifact),
        "repeats": repeats,
        "rounds": per_round,
        "ratios": ratios,
    }


def revision_markdown(result: dict, command: str) -> str:
    """The report: per batch size, the seconds per side and round and the ratios."""
    from freemerge.benchmarks.machine import machine_line

    rows = []
    for label, ratios in result["ratios"].items():
        old = ", ".join(f"{1000 * r['revision'][label]:.1f}" for r in result["rounds"])
        new = ", ".join(f"{1000 * r['this tree'][label]:.1f}" for r in result["rounds"])
        each = ", ".join(f"{x:.3f}" for x in ratios)
        rows.append([f"tagged, {label}", old, new, each, median_and_range(spread(ratios), ".3f")])
    header = [
        "forward",
        "revision (ms, per round)",
        "this tree (ms, per round)",
        "this tree / revision per round",
        "median (range)",
    ]
    lines = markdown_table(header, rows)
    return (
        "# This tree against another revision\n\n"
        f"The engine's tagged forward (`MergedClassifier.classify_rows`, at most {MAX_TOKENS} "
        f"tokens a text; median of {result['repeats']} calls after a warm-up), this tree "
        f"against `{result['revision'][:12]}`, on `{result['artifact']}`; each side in a fresh "
        "process, the revision first in every round.\n\n"
        + "\n".join(lines)
        + f"\n\nMachine: {machine_line(result['machine'])}.\n\nCommand: `{command}`\n"
    )
