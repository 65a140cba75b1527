"""``freemerge`` subcommands of the offline half: ``merge``, ``verify``, ``export``,
``methods``, ``router fit``, ``add-task``, ``remove-task``. Registered through the
``freemerge.commands`` entry point; handlers import the heavy modules (torch, transformers)
only when they run."""

from __future__ import annotations

import argparse
from pathlib import Path

MIB = 2**20


def _merge(args: argparse.Namespace) -> int:
    from freemerge.merging.config import load_config
    from freemerge.merging.merge import run_merge

    summary = run_merge(load_config(args.config, zoo=args.zoo), args.out, overwrite=args.overwrite)
    print(f"artifact written to {summary.out}")
    print(f"merge wall time {summary.wall_seconds:.1f} s, ", end="")
    print(f"peak resident memory {summary.peak_rss_mib:.0f} MiB")
    print(f"backbone {summary.backbone_bytes / MIB:.1f} MiB")
    for task, size in summary.expert_bytes.items():
        share = 100 * size / summary.backbone_bytes
        print(f"  expert {task}: {size / MIB:.2f} MiB ({share:.2f}% of the backbone)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from freemerge.merging.artifact import open_artifact, verify_artifact
    from freemerge.merging.files import stale_partials

    for stale in stale_partials(args.artifact):
        print(f"note: {stale} is left over from a killed merge; the next merge here cleans it up")
    problems = verify_artifact(args.artifact)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{args.artifact}: FAILED ({len(problems)} problems)")
        return 1
    artifact = open_artifact(args.artifact, verify=False)
    files = len(artifact.manifest["files"])
    print(f"{args.artifact}: OK, {files} files, version {artifact.version}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from freemerge.merging.artifact import open_artifact
    from freemerge.merging.export import export_peft, export_task

    write = export_peft if args.format == "peft" else export_task
    out = write(open_artifact(args.artifact), args.task, args.out, overwrite=args.overwrite)
    print(f"task {args.task} exported ({args.format}) to {out}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from freemerge.merging.methods import METHODS

    for method in METHODS.values():
        params = ", ".join(f"{k}={v!r}" for k, v in method.parameters.items()) or "no parameters"
        experts = "; builds one expert per task" if method.experts else ""
        summary = (method.function.__doc__ or "").strip().splitlines()[0]
        print(f"{method.name}: {params}{experts}\n    {summary}")
    return 0


def _router_fit(args: argparse.Namespace) -> int:
    from freemerge.merging.artifact import ArtifactError, read_manifest
    from freemerge.merging.refit import refit_router, router_data
    from freemerge.merging.router_config import RouterConfig

    given = {}
    for item in args.data:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise ArtifactError(f"--data {item!r}: expected TASK=FILE.jsonl")
        given[task] = path
    data = router_data(read_manifest(args.artifact)[0], given)
    config = RouterConfig(
        kind=args.kind, examples_per_task=args.examples_per_task, seed=args.seed, data=data
    )
    metrics, version = refit_router(args.artifact, config, args.out)
    accuracy, error = metrics["held_out_accuracy"], metrics["held_out_ece"]
    print(f"router ({config.kind}) fitted on {metrics['examples']} texts: held-out accuracy ")
    print(f"{accuracy:.4f}, calibration error {error:.4f}")
    print(f"artifact {args.out or args.artifact}: version {version}")
    return 0


def _print_edit(
    args: argparse.Namespace, tasks: list[str], router: dict | None, version: str
) -> None:
    if router:
        print(f"router fitted again over {len(tasks)} tasks: held-out accuracy ", end="")
        print(f"{router['held_out_accuracy']:.4f}, calibration error {router['held_out_ece']:.4f}")
    print(f"artifact {args.out or args.artifact}: tasks {', '.join(tasks)}")
    print(f"version {version}")


def _add_task(args: argparse.Namespace) -> int:
    from freemerge.merging.task_edit import add_task

    done = add_task(args.artifact, args.name, args.model, args.router_data, args.out)
    print(f"task {args.name} added: relative distance from the merged backbone ", end="")
    print(f"{done.distance:.4f}, expert {done.expert_bytes / MIB:.2f} MiB")
    if args.router_data is not None and done.router is None:
        print("note: the artifact has no router; --router-data was not used")
    _print_edit(args, done.tasks, done.router, done.version)
    return 0


def _remove_task(args: argparse.Namespace) -> int:
    from freemerge.merging.task_edit import remove_task

    done = remove_task(args.artifact, args.name, args.out)
    print(f"task {args.name} removed")
    _print_edit(args, done.tasks, done.router, done.version)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``merge``, ``verify``, ``export``, ``methods``, ``router fit``, ``add-task`` and
    ``remove-task`` to the ``freemerge`` parser."""
    merge = commands.add_parser("merge", help="merge fine-tuned models into an artifact")
    merge.add_argument("config", type=Path, help="merge config (YAML; see configs/)")
    merge.add_argument("--out", type=Path, required=True, help="artifact folder to write")
    merge.add_argument(
        "--zoo",
        default=None,
        help="a zoo by name (demo, full) or path, instead of the config's `zoo` "
        "(default: the config's)",
    )
    merge.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (default: refuse)"
    )
    merge.set_defaults(handler=_merge)

    verify = commands.add_parser("verify", help="check every file hash of an artifact")
    verify.add_argument("artifact", type=Path, help="artifact folder (manifest.json inside)")
    verify.set_defaults(handler=_verify)

    export = commands.add_parser("export", help="write one task as a standalone model")
    export.add_argument("artifact", type=Path, help="artifact folder")
    export.add_argument("--task", required=True, help="the task to export")
    export.add_argument("--out", type=Path, required=True, help="folder to write")
    export.add_argument(
        "--format",
        choices=("hf", "peft"),
        default="hf",
        help="hf: a standalone Hugging Face model; peft: a PEFT LoRA adapter (low-rank "
        "experts on linear layers only) (default: hf)",
    )
    export.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (default: refuse)"
    )
    export.set_defaults(handler=_export)

    methods = commands.add_parser("methods", help="list the merge methods and their parameters")
    methods.set_defaults(handler=_methods)
    _register_router(commands)
    _register_task_edits(commands)


def _register_router(commands: argparse._SubParsersAction) -> None:
    """``freemerge router fit``."""
    from freemerge.merging.router_config import ROUTER_KINDS, RouterConfig

    router = commands.add_parser("router", help="the task router of an artifact")
    actions = router.add_subparsers(dest="router_command", required=True, metavar="ACTION")
    fit = actions.add_parser(
        "fit",
        help="fit a new router for an artifact without re-merging; writes a new artifact version",
    )
    fit.add_argument("artifact", type=Path, help="artifact folder")
    fit.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="TASK=FILE.jsonl",
        help='texts of one task (JSONL lines of {"text": ...}); repeatable (default: the '
        "files the artifact's router was fitted on)",
    )
    fit.add_argument(
        "--kind",
        default=RouterConfig.kind,
        help=f"router kind: one of {', '.join(ROUTER_KINDS)}, or any '+'-joined set of "
        f"ngrams, layers and experts (default: {RouterConfig.kind})",
    )
    fit.add_argument(
        "--examples-per-task",
        type=int,
        default=RouterConfig.examples_per_task,
        help=f"texts drawn per task (default: {RouterConfig.examples_per_task})",
    )
    fit.add_argument("--seed", type=int, default=0, help="seed of the draw and fit (default: 0)")
    _out_argument(fit)
    fit.set_defaults(handler=_router_fit)


def _out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the new artifact here (must not exist) (default: replace the artifact in "
        "one step)",
    )


def _register_task_edits(commands: argparse._SubParsersAction) -> None:
    """``freemerge add-task`` and ``freemerge remove-task``."""
    add = commands.add_parser(
        "add-task",
        help="add a task to an artifact without re-merging (its expert against the merged "
        "backbone; the router fitted again); writes a new artifact version",
    )
    add.add_argument("artifact", type=Path, help="artifact folder")
    add.add_argument(
        "--name",
        required=True,
        help="the new task's name: 1 to 64 letters, digits, '.', '_', '-', starting with a "
        "letter or digit",
    )
    add.add_argument(
        "--model",
        type=Path,
        required=True,
        help="the task's model folder: a *ForSequenceClassification (safetensors) fine-tuned "
        "from the artifact's base model",
    )
    add.add_argument(
        "--router-data",
        type=Path,
        default=None,
        metavar="FILE.jsonl",
        help='the task\'s texts (JSONL lines of {"text": ...}) for the router; needed when '
        "the artifact has one (default: none)",
    )
    _out_argument(add)
    add.set_defaults(handler=_add_task)

    remove = commands.add_parser(
        "remove-task",
        help="remove a task (head and expert) from an artifact without re-merging (the router "
        "fitted again); writes a new artifact version",
    )
    remove.add_argument("artifact", type=Path, help="artifact folder")
    remove.add_argument("--name", required=True, help="the task to remove")
    _out_argument(remove)
    remove.set_defaults(handler=_remove_task)
