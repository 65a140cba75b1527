"""``freemerge bench load``'s results written: JSON, markdown and plots of a whole run, or
the costs alone (``--costs-only``)."""

from __future__ import annotations

import time
from pathlib import Path

from freemerge.benchmarks.costs import costs
from freemerge.benchmarks.load import LoadPlan, contender_texts, run_load_bench
from freemerge.benchmarks.load_plots import load_plots
from freemerge.benchmarks.load_report import costs_markdown, load_markdown
from freemerge.benchmarks.machine import describe_machine
from freemerge.merging.artifact import open_artifact


def write_load_results(
    artifact: Path, zoo: Path, plan: LoadPlan, out: Path, command: str, quick: bool
) -> str:
    """Run the bench; write JSON, markdown and plots under ``out``; the markdown."""
    from freemerge.merging.files import write_json_atomically, write_text_atomically

    result = run_load_bench(artifact, zoo, plan)
    name = "load_quick" if quick else "load"
    write_json_atomically(out / f"{name}.json", result)
    markdown = load_markdown(result, command)
    write_text_atomically(out / f"{name}.md", markdown)
    load_plots(result, out, prefix=f"{name}_")
    return markdown


def write_cost_results(artifact: Path, out: Path, command: str) -> str:
    """``bench load --costs-only``: the costs alone (expert apply, row adapters, router) of
    ``artifact``, written to ``out/costs.{json,md}``; the markdown."""
    from freemerge.merging.files import write_json_atomically, write_text_atomically

    start = time.perf_counter()
    tasks = list(open_artifact(artifact, verify=False).tasks)
    result = {
        "machine": describe_machine(),
        "artifact": str(artifact),
        "costs": costs(artifact, contender_texts(tasks)[tasks[0]]),
        "wall_seconds": round(time.perf_counter() - start),
    }
    markdown = costs_markdown(result, command)
    write_json_atomically(out / "costs.json", result)
    write_text_atomically(out / "costs.md", markdown)
    return markdown
