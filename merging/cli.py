"""``freemerge`` subcommands of the offline half: ``zoo``, ``merge``, ``verify``, ``export``."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from merging.artifact import open_artifact, verify_artifact
from merging.atomic import write_json_atomically
from merging.config import load_config
from merging.datasets import TASKS
from merging.evaluate import SPLITS, evaluate_artifact
from merging.export import EXPORT_FORMATS, export_peft, export_task
from merging.finetune import Recipe
from merging.merge import run_merge
from merging.quality import QualityGrid, quality_markdown, run_quality
from merging.runtime import MIXING_MODES, MergedClassifier
from merging.zoo import (
    build_zoo,
    cached_zoo,
    open_zoo,
    zoo_report,
    zoo_table,
)


def _recipe_from(args: argparse.Namespace) -> Recipe:
    overrides = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(Recipe)
        if getattr(args, field.name, None) is not None
    }
    return Recipe(**overrides)


def _zoo_build(args: argparse.Namespace) -> int:
    zoo = build_zoo(args.tasks, _recipe_from(args), args.cache_dir, force=args.force)
    print(f"zoo: {zoo.root}\n")
    print(zoo_table(zoo))
    if args.report:
        command = "freemerge " + shlex.join(sys.argv[1:])
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(zoo_report(zoo, command))
        print(f"\nreport written to {args.report}")
    return 0


def _zoo_show(args: argparse.Namespace) -> int:
    zoo = cached_zoo(_recipe_from(args), args.cache_dir)
    print(f"zoo: {zoo.root}\n")
    print(zoo_table(zoo))
    return 0


def _zoo_path(args: argparse.Namespace) -> int:
    print(cached_zoo(_recipe_from(args), args.cache_dir).root)
    return 0


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    defaults = Recipe()
    group = parser.add_argument_group("recipe (a changed recipe is a different zoo)")
    for field in dataclasses.fields(Recipe):
        group.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(getattr(defaults, field.name)),
            default=None,
            help=f"default {getattr(defaults, field.name)}",
        )


def add_zoo_commands(subparsers: argparse._SubParsersAction) -> None:
    zoo = subparsers.add_parser("zoo", help="the task zoo: fine-tuned models from public data")
    verbs = zoo.add_subparsers(dest="zoo_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache folder (default $FREEMERGE_CACHE or ~/.cache/freemerge)",
    )
    _add_recipe_options(common)

    build = verbs.add_parser("build", parents=[common], help="fine-tune the tasks not cached yet")
    build.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        metavar="TASK",
        help=f"tasks to build (default all: {', '.join(TASKS)})",
    )
    build.add_argument("--force", action="store_true", help="rebuild tasks even if cached")
    build.add_argument(
        "--report", type=Path, default=None, help="also write the markdown report to this file"
    )
    build.set_defaults(handler=_zoo_build)

    show = verbs.add_parser("show", parents=[common], help="print the cached zoo's table")
    show.set_defaults(handler=_zoo_show)
    path = verbs.add_parser("path", parents=[common], help="print the cached zoo's folder")
    path.set_defaults(handler=_zoo_path)


def _merge(args: argparse.Namespace) -> int:
    summary = run_merge(load_config(args.config), args.out, overwrite=args.overwrite)
    mib = 2**20
    print(f"artifact written to {summary.out}")
    print(f"merge wall time {summary.wall_seconds:.1f} s, ", end="")
    print(f"peak resident memory {summary.peak_rss_mib:.0f} MiB")
    print(f"backbone {summary.backbone_bytes / mib:.1f} MiB")
    for task, size in summary.expert_bytes.items():
        share = 100 * size / summary.backbone_bytes
        print(f"  expert {task}: {size / mib:.2f} MiB ({share:.2f}% of the backbone)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    problems = verify_artifact(args.artifact)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{args.artifact}: FAILED ({len(problems)} problems)")
        return 1
    artifact = open_artifact(args.artifact, verify=False)
    print(
        f"{args.artifact}: OK, {len(artifact.manifest['files'])} files, version {artifact.version}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    write = export_peft if args.format == "peft" else export_task
    out = write(open_artifact(args.artifact), args.task, args.out, overwrite=args.overwrite)
    print(f"task {args.task} exported ({args.format}) to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    model = MergedClassifier(open_artifact(args.artifact))
    result = evaluate_artifact(model, args.split, mixing=args.mixing)
    routed = "routed_accuracy" in result["mean"]
    routed_columns = (" routed accuracy | routing accuracy |", "---|---|") if routed else ("", "")
    print(f"| task | accuracy (true task) |{routed_columns[0]}\n|---|---|{routed_columns[1]}")
    for task, scores in [*result["tasks"].items(), ("mean", result["mean"])]:
        extra = (
            f" {scores['routed_accuracy']:.4f} | {scores['routing_accuracy']:.4f} |"
            if routed
            else ""
        )
        print(f"| {task} | {scores['accuracy']:.4f} |{extra}")
    if routed:
        print(
            f"router + routed forward: {1000 * result['routed_seconds_per_text']:.2f} ms per text"
        )
    if args.out:
        write_json_atomically(args.out, result)
        print(f"written to {args.out}")
    return 0


def _bench_quality(args: argparse.Namespace) -> int:
    zoo = open_zoo(args.zoo) if args.zoo else cached_zoo(cache_dir=args.cache_dir)
    grid = QualityGrid()
    if args.quick:
        grid = QualityGrid(
            scalings=[0.5],
            ties_scalings=[1.0],
            ratios=[0.7],
            cutoffs=[0.05],
            densities=[0.01],
            ranks=[4],
            router={"examples_per_task": 100},
            refit_examples=200,
        )
    result = run_quality(zoo, grid)
    command = "freemerge " + shlex.join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(args.out / "merge_quality.json", result)
    markdown = quality_markdown(result, command)
    (args.out / "merge_quality.md").write_text(markdown)
    print(markdown)
    return 0


def add_bench_commands(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add ``bench`` with ``quality``; returns its subcommands so upper layers can add more."""
    bench = subparsers.add_parser("bench", help="benchmarks: quality table")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    quality = kinds.add_parser("quality", help="the merge quality table on the zoo")
    quality.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: cached)")
    quality.add_argument("--cache-dir", type=Path, default=None)
    quality.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    quality.add_argument("--quick", action="store_true", help="one candidate per row")
    quality.set_defaults(handler=_bench_quality)
    return kinds


def add_artifact_commands(subparsers: argparse._SubParsersAction) -> None:
    merge = subparsers.add_parser("merge", help="merge fine-tuned models into an artifact")
    merge.add_argument("config", type=Path, help="merge config (YAML)")
    merge.add_argument("--out", type=Path, required=True, help="artifact folder to write")
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    merge.set_defaults(handler=_merge)

    verify = subparsers.add_parser("verify", help="check every file hash of an artifact")
    verify.add_argument("artifact", type=Path)
    verify.set_defaults(handler=_verify)

    evaluate = subparsers.add_parser("eval", help="accuracy per task, true task and routed")
    evaluate.add_argument("artifact", type=Path)
    evaluate.add_argument("--split", choices=SPLITS, default="test")
    evaluate.add_argument(
        "--mixing",
        choices=MIXING_MODES,
        default="argmax",
        help="routed inputs: the top task's expert, or a softmax mix of all",
    )
    evaluate.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    evaluate.set_defaults(handler=_eval)

    export = subparsers.add_parser("export", help="write one task as a standalone HF model")
    export.add_argument("artifact", type=Path)
    export.add_argument("--task", required=True)
    export.add_argument("--out", type=Path, required=True)
    export.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="hf",
        help="hf: a standalone model; peft: a LoRA adapter (low-rank experts)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.set_defaults(handler=_export)
