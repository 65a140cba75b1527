import json

from freemerge.benchmarks.quality import GRIDS, QualityGrid, quality_markdown
from freemerge.serving.cli import main

QUICK = QualityGrid(
    scalings=[0.5],
    ties_scalings=[1.0],
    ratios=[0.7],
    cutoffs=[0.05],
    densities=[0.01],
    ranks=[2],
    rank=2,
    router={"examples_per_task": 40, "epochs": 10},
    refit_examples=64,
)


def test_bench_quality_runs_end_to_end_and_writes_its_tables(tiny_zoo, tmp_path, monkeypatch):
    """The whole quality table on a tiny zoo, through the CLI (one run: each takes a minute on
    2 cores): every method's row over every task, the ablations, and the markdown."""
    monkeypatch.setitem(GRIDS, "quick", lambda: QUICK)  # a grid the CLI offers
    command = ["bench", "quality", "--zoo", str(tiny_zoo.root), "--out", str(tmp_path)]
    assert main([*command, "--grid", "quick"]) == 0
    result = json.loads((tmp_path / "merge_quality.json").read_text())
    assert result["grid"] == "quick"
    names = [row["name"] for row in result["rows"]]
    assert names[0] == "individual fine-tuned models"
    assert any(name.endswith(", routed") for name in names)
    assert "TIES" in names and "FR (radial filter)" in names
    for row in result["rows"]:
        assert set(row["test"]) == set(tiny_zoo.tasks)
        assert all(0 <= v <= 1 for v in row["test"].values())
    individual = result["rows"][0]
    assert abs(individual["normalised_mean"] - 1.0) < 1e-9
    lowrank = next(r for r in result["rows"] if r["name"].startswith("FREE, low-rank"))
    assert 0 < lowrank["extra_bytes_pct"] < 10
    assert set(result["ablations"]) == {
        "filter ratio (FR, reference)",
        "sparse density (FREE)",
        "rank (FREE, low-rank)",
    }
    markdown = (tmp_path / "merge_quality.md").read_text()
    assert markdown.startswith("# Merge quality")
    assert "| individual fine-tuned models |" in markdown and "## Ablations" in markdown
    command = markdown.rsplit("Command: `", 1)[1].split("`")[0]
    assert quality_markdown(result, command) == markdown  # the same table from the JSON
