"""``freemerge`` subcommands of the benchmarks: ``zoo``, ``eval``, ``bench``, ``demo``.
Registered through the ``freemerge.commands`` entry point; handlers import the heavy modules
only when they run."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

RESULTS = Path("benchmarks/results")
ZOO_NAMES = (
    "demo",
    "full",
    "mpnet",
    "kinds",
)  # benchmarks.zoo.ZOOS (not imported here: it is heavy)


def _command() -> str:
    return "freemerge " + shlex.join(sys.argv[1:])


def _zoo_build(args: argparse.Namespace) -> int:
    from freemerge.benchmarks.zoo import build_named_zoo, zoo_report, zoo_table
    from freemerge.merging.files import write_text_atomically

    zoo = build_named_zoo(args.zoo, args.cache_dir, force=args.force)
    print(f"zoo: {zoo.root}\n\n{zoo_table(zoo)}")
    if args.report:
        write_text_atomically(args.report, zoo_report(zoo, _command()))
        print(f"\nreport written to {args.report}")
    return 0


def _zoo_show(args: argparse.Namespace) -> int:
    from freemerge.benchmarks.zoo import zoo_table
    from freemerge.merging.zoo_folder import open_zoo

    zoo = open_zoo(args.zoo, args.cache_dir)
    print(f"zoo: {zoo.root}\n\n{zoo_table(zoo)}")
    return 0


def _zoo_path(args: argparse.Namespace) -> int:
    from freemerge.merging.zoo_folder import open_zoo

    print(open_zoo(args.zoo, args.cache_dir).root)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from freemerge.benchmarks.evaluate import evaluate_artifact, evaluation_table
    from freemerge.merging.artifact import open_artifact
    from freemerge.merging.files import write_json_atomically
    from freemerge.serving.runtime import MergedClassifier

    result = evaluate_artifact(
        MergedClassifier(open_artifact(args.artifact)), args.split, mixing=args.mixing
    )
    print(evaluation_table(result))
    if args.out:
        write_json_atomically(args.out, result)
        print(f"written to {args.out}")
    return 0


def _written(out: Path, name: str, result: dict, markdown: str) -> int:
    """Write ``out/name.json`` and ``out/name.md``, print the markdown; exit status 0."""
    from freemerge.merging.files import write_json_atomically, write_text_atomically

    write_json_atomically(out / f"{name}.json", result)
    write_text_atomically(out / f"{name}.md", markdown)
    print(markdown)
    return 0


def _artifact(args: argparse.Namespace) -> tuple[Path, Path]:
    """The cache folder, and ``--artifact`` or else configs/free.yaml merged over ``--zoo``."""
    from freemerge.benchmarks.demo import cached_artifact
    from freemerge.merging.files import default_cache_dir

    cache_dir = args.cache_dir or default_cache_dir()
    shipped = Path("configs/free.yaml")
    return cache_dir, args.artifact or cached_artifact(shipped, cache_dir, args.zoo)


def _bench_quality(args: argparse.Namespace) -> int:
    from freemerge.benchmarks.quality import quality_markdown, run_quality
    from freemerge.merging.zoo_folder import open_zoo

    result = run_quality(open_zoo(args.zoo, args.cache_dir), args.grid)
    # the full zoo's table is merge_quality; another named zoo's, merge_quality_<zoo>
    named = args.zoo in ZOO_NAMES and args.zoo != "full"
    name = f"merge_quality_{args.zoo}" if named else "merge_quality"
    return _written(args.out, name, result, quality_markdown(result, _command()))


def _bench_revision(args: argparse.Namespace) -> int:
    from freemerge.benchmarks.evaluate import task_texts
    from freemerge.benchmarks.revision import revision_markdown, run_revision_bench
    from freemerge.merging.artifact import read_manifest

    _, artifact = _artifact(args)
    tasks = list(read_manifest(artifact)[0]["tasks"])
    texts = {task: task_texts(task, "test")[0] for task in tasks}
    order = [tasks[i % len(tasks)] for i in range(16)]
    rows = [texts[task][i // len(tasks)] for i, task in enumerate(order)]
    result = run_revision_bench(artifact, args.against, rows, order, args.rounds, args.repeats)
    return _written(args.out, "revision", result, revision_markdown(result, _command()))


def _bench_kinds(args: argparse.Namespace) -> int:
    from freemerge.benchmarks.kinds import kinds_markdown, run_kinds
    from freemerge.merging.zoo_folder import open_zoo

    result = run_kinds(open_zoo(args.zoo, args.cache_dir), args.config, args.cache_dir)
    return _written(args.out, "kinds", result, kinds_markdown(result, _command()))


def _bench_experts(args: argparse.Namespace) -> int:
    from freemerge.benchmarks.expert_precision import expert_markdown, run_expert_bench
    from freemerge.merging.zoo_folder import open_zoo

    result = run_expert_bench(open_zoo(args.zoo, args.cache_dir), args.config)
    return _written(args.out, "experts", result, expert_markdown(result, _command()))


def _bench_router(args: argparse.Namespace) -> int:
    from freemerge.benchmarks.routing import router_markdown, run_router_bench
    from freemerge.merging.zoo_folder import open_zoo

    cache_dir, artifact = _artifact(args)
    kinds = args.kinds.split(",") if args.kinds else None
    result = run_router_bench(open_zoo(args.zoo, cache_dir), artifact, kinds, args.rounds)
    return _written(args.out, "router", result, router_markdown(result, _command()))


def _bench_load(args: argparse.Namespace) -> int:
    from freemerge.benchmarks.load import LoadPlan
    from freemerge.benchmarks.load_results import write_cost_results, write_load_results
    from freemerge.merging.zoo_folder import open_zoo

    cache_dir, artifact = _artifact(args)
    if args.costs_only:
        print(write_cost_results(artifact, args.out, _command()))
        return 0
    zoo = open_zoo(args.zoo, cache_dir).root
    plan = LoadPlan.quick() if args.quick else LoadPlan()
    print(write_load_results(artifact, zoo, plan, args.out, _command(), args.quick))
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from freemerge.benchmarks.serve import run_serve_bench, serve_markdown
    from freemerge.merging.zoo_folder import open_zoo

    cache_dir, artifact = _artifact(args)
    zoo = open_zoo(args.zoo, cache_dir).root
    result = run_serve_bench(artifact, zoo, args.rounds, args.seconds)
    return _written(args.out, "serve", result, serve_markdown(result, _command()))


def _bench_scale(args: argparse.Namespace) -> int:
    from freemerge.benchmarks.scale import run_scale_bench, scale_markdown
    from freemerge.merging.zoo_folder import open_zoo

    cache_dir, artifact = _artifact(args)
    zoo = open_zoo(args.zoo, cache_dir)
    result = run_scale_bench(artifact, zoo, cache_dir, args.tasks, args.rounds)
    return _written(args.out, "scale", result, scale_markdown(result, _command()))


def _bench_autoscale(args: argparse.Namespace) -> int:
    from freemerge.benchmarks.autoscale import write_autoscale_results
    from freemerge.benchmarks.demo import cached_artifact

    cache_dir, artifact = _artifact(args)
    new_artifact = args.new_artifact or cached_artifact(
        Path("configs/free_sparse.yaml"), cache_dir, args.zoo
    )
    write_autoscale_results(artifact, new_artifact, args.load_seconds, args.out, _command())
    return 0


def _bench_faults(args: argparse.Namespace) -> int:
    from freemerge.benchmarks.faults import write_fault_results

    print(write_fault_results(_artifact(args)[1], args.out, _command(), args.full))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from freemerge.benchmarks.demo import run_demo

    return run_demo(args.config, args.cache_dir, args.zoo)


def _cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache folder for wheels, zoos and artifacts "
        "(default: $FREEMERGE_CACHE, else ~/.cache/freemerge)",
    )


def _zoo_argument(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--zoo",
        default=default,
        help=f"a zoo by name ({', '.join(ZOO_NAMES)}: built under the cache) or folder "
        f"(default: {default})",
    )


def _add_zoo_commands(commands: argparse._SubParsersAction) -> None:
    zoo = commands.add_parser("zoo", help="the task zoo: fine-tuned models from public data")
    verbs = zoo.add_subparsers(dest="zoo_command", required=True, metavar="VERB")
    build = verbs.add_parser("build", help="fine-tune the zoo's tasks that are not cached yet")
    build.add_argument(
        "--zoo",
        choices=ZOO_NAMES,
        default="full",
        help="demo: 3 tasks, a short recipe (minutes); full: 6 tasks, the full recipe "
        "(about 20 minutes on 2 cores); mpnet: demo's tasks and recipe on all-mpnet-base-v2 "
        "(MPNet, 110M parameters, 5x the others' all-MiniLM-L6-v2); kinds: full's tasks (copied "
        "from a built full zoo), a named-entity tagger and the base as an embedding task "
        "(default: full)",
    )
    build.add_argument(
        "--force", action="store_true", help="fine-tune every task again (default: reuse)"
    )
    build.add_argument(
        "--report",
        type=Path,
        default=None,
        help="also write the markdown report here (default: none)",
    )
    _cache_argument(build)
    build.set_defaults(handler=_zoo_build)
    for verb, handler, text in (
        ("show", _zoo_show, "print a built zoo's table"),
        ("path", _zoo_path, "print a built zoo's folder"),
    ):
        parser = verbs.add_parser(verb, help=text)
        _zoo_argument(parser, "full")
        _cache_argument(parser)
        parser.set_defaults(handler=handler)


def _add_bench_commands(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="benchmarks: quality, kinds, experts, router, load, serve, scale, autoscaling, "
        "faults, revision",
    )
    benches = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    # (adds the bench's own options, its handler, its default zoo, whether it takes --artifact)
    for add, handler, zoo, takes_artifact in (
        (_add_quality_bench, _bench_quality, "full", False),
        (_add_experts_bench, _bench_experts, "full", False),
        (_add_router_bench, _bench_router, "full", True),
        (_add_load_bench, _bench_load, "full", True),
        (_add_serve_bench, _bench_serve, "demo", True),
        (_add_scale_bench, _bench_scale, "full", True),
        (_add_autoscale_bench, _bench_autoscale, "full", True),
        (_add_revision_bench, _bench_revision, "full", True),
        (_add_faults_bench, _bench_faults, "full", True),
        (_add_kinds_bench, _bench_kinds, "kinds", False),
    ):
        parser = add(benches)
        _zoo_argument(parser, zoo)
        _cache_argument(parser)
        parser.add_argument(
            "--out", type=Path, default=RESULTS, help=f"results folder (default: {RESULTS})"
        )
        if takes_artifact:
            parser.add_argument(
                "--artifact",
                type=Path,
                default=None,
                help="artifact to use (default: configs/free.yaml merged over --zoo)",
            )
        parser.set_defaults(handler=handler)


def _add_quality_bench(benches: argparse._SubParsersAction) -> argparse.ArgumentParser:
    quality = benches.add_parser("quality", help="the merge quality table on a zoo")
    quality.add_argument(
        "--grid",
        choices=["full", "small", "quick"],
        default="full",
        help="candidates tried per row: full (the table's grid), small (fewer scalings, "
        "ratios and ablation values; for a backbone too large for the full grid on 2 cores), "
        "quick (one candidate per row, a smoke run) (default: full)",
    )
    return quality


def _add_experts_bench(benches: argparse._SubParsersAction) -> argparse.ArgumentParser:
    experts = benches.add_parser(
        "experts", help="expert factors in 16 or 32 bits, and the rank picked on validation"
    )
    experts.add_argument(
        "--config",
        type=Path,
        default=Path("configs/free.yaml"),
        help="the merge config whose method and parameters every row uses "
        "(default: configs/free.yaml)",
    )
    return experts


def _add_router_bench(benches: argparse._SubParsersAction) -> argparse.ArgumentParser:
    router = benches.add_parser(
        "router", help="every router kind fitted and compared; the default picked on validation"
    )
    router.add_argument(
        "--kinds",
        default=None,
        help="comma-separated router kinds (default: ngrams, embeddings, layers, experts and "
        "their combinations, as listed in merging/router_config.py)",
    )
    router.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of the cost timing (default: 3)"
    )
    return router


def _add_load_bench(benches: argparse._SubParsersAction) -> argparse.ArgumentParser:
    load = benches.add_parser("load", help="load test: merged server against separate models")
    load.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    load.add_argument(
        "--costs-only",
        action="store_true",
        help="only the costs of the expert path and the router, in one process "
        "(a few minutes) -> costs.{md,json}",
    )
    return load


def _add_serve_bench(benches: argparse._SubParsersAction) -> argparse.ArgumentParser:
    serve = benches.add_parser(
        "serve",
        help="the served rate at 1 to 64 clients and under overload against the engine's own "
        "rate, merged (also behind HAProxy) and separate models; kills of a front (behind "
        "either ingress) and a model replica",
    )
    serve.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    serve.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help="seconds per closed-loop run; the open loop at overload and the closed loop after "
        "it run twice as long (default: 10)",
    )
    return serve


def _add_scale_bench(benches: argparse._SubParsersAction) -> argparse.ArgumentParser:
    scale = benches.add_parser(
        "scale", help="a thousand tasks on one replica: memory, fetches, Zipf load, live edits"
    )
    scale.add_argument(
        "--tasks",
        type=int,
        default=1000,
        help="tasks in all: the zoo's plus synthetic ones (default: 1000)",
    )
    scale.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of the HTTP runs (default: 3)"
    )
    return scale


def _add_autoscale_bench(benches: argparse._SubParsersAction) -> argparse.ArgumentParser:
    autoscale = benches.add_parser("autoscale", help="autoscaling 1->2->1 and a rolling update")
    autoscale.add_argument(
        "--new-artifact",
        type=Path,
        default=None,
        help="the version rolled out (default: configs/free_sparse.yaml merged)",
    )
    autoscale.add_argument(
        "--load-seconds", type=float, default=40.0, help="seconds of load at least (default: 40)"
    )
    return autoscale


def _add_revision_bench(benches: argparse._SubParsersAction) -> argparse.ArgumentParser:
    revision = benches.add_parser(
        "revision",
        help="the engine's tagged batch-1 and batch-16 forward, this tree against a git revision",
    )
    revision.add_argument(
        "--against", required=True, help="the git revision to compare with (a commit or ref)"
    )
    revision.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    revision.add_argument(
        "--repeats", type=int, default=30, help="timed calls per batch size and side (default: 30)"
    )
    return revision


def _add_faults_bench(benches: argparse._SubParsersAction) -> argparse.ArgumentParser:
    faults = benches.add_parser(
        "faults", help="hostile inputs, overload, lost replicas, memory under the largest load"
    )
    faults.add_argument(
        "--full",
        action="store_true",
        help="also kill a worker node of a two-node Ray cluster started with `ray start` "
        "(default: the local scenarios only)",
    )
    return faults


def _add_kinds_bench(benches: argparse._SubParsersAction) -> argparse.ArgumentParser:
    task_kinds = benches.add_parser(
        "kinds",
        help="every task kind on real data: entity F1, embeddings against the original model, "
        "a mixed load (the `kinds` zoo)",
    )
    task_kinds.add_argument(
        "--config",
        type=Path,
        default=Path("configs/free.yaml"),
        help="the merge config (default: configs/free.yaml)",
    )
    return task_kinds


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``zoo``, ``eval``, ``bench`` and ``demo`` to the ``freemerge`` parser."""
    _add_zoo_commands(commands)
    evaluate = commands.add_parser("eval", help="accuracy per task of an artifact on a zoo split")
    evaluate.add_argument("artifact", type=Path, help="artifact folder")
    evaluate.add_argument(
        "--split", choices=("test", "validation"), default="test", help="(default: test)"
    )
    evaluate.add_argument(
        "--mixing",
        choices=("argmax", "softmax"),
        default="argmax",
        help="routed inputs: the top task's expert, or a softmax mix of all (default: argmax)",
    )
    evaluate.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    evaluate.set_defaults(handler=_eval)
    _add_bench_commands(commands)
    demo = commands.add_parser("demo", help="build the demo zoo, merge it, serve it, ask it")
    demo.add_argument(
        "--config",
        type=Path,
        default=Path("configs/free.yaml"),
        help="merge config (default: configs/free.yaml)",
    )
    _zoo_argument(demo, "demo")
    _cache_argument(demo)
    demo.set_defaults(handler=_demo)
