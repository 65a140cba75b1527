import json

from freemerge.benchmarks.quality import GRIDS, QualityGrid, quality_markdown, run_quality
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


def test_quality_table_runs_end_to_end_on_a_tiny_zoo(tiny_zoo, monkeypatch):
    monkeypatch.setitem(GRIDS, "tiny", lambda: QUICK)
    result = run_quality(tiny_zoo, "tiny", show_progress=False)
    assert result["grid"] == "tiny"
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
    markdown = quality_markdown(json.loads(json.dumps(result)), "freemerge bench quality")
    assert "| individual fine-tuned models |" in markdown and "## Ablations" in markdown


def test_bench_quality_cli_writes_json_and_markdown(tiny_zoo, tmp_path, monkeypatch):
    monkeypatch.setitem(GRIDS, "quick", lambda: QUICK)
    assert (
        main(
            [
                "bench",
                "quality",
                "--zoo",
                str(tiny_zoo.root),
                "--out",
                str(tmp_path),
                "--grid",
                "quick",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "merge_quality.json").read_text())["rows"]
    assert (tmp_path / "merge_quality.md").read_text().startswith("# Merge quality")
