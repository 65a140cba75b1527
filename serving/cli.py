"""The ``freemerge`` command: offline subcommands from :mod:`merging.cli`, serving ones here."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from merging.atomic import write_json_atomically
from merging.cli import add_artifact_commands, add_bench_commands, add_zoo_commands
from merging.datasets import UnknownTaskError
from merging.runtime import MIXING_MODES
from merging.sources import SourceError, default_cache_dir
from merging.zoo import ZooError, cached_zoo
from serving.bench_autoscale import autoscale_plot, run_autoscale_bench
from serving.bench_load import LoadPlan, load_markdown, load_plots, run_load_bench
from serving.demo import cached_artifact, run_demo
from serving.local import serve_until_signalled

# Errors that a user's input can cause: reported as one line, without a traceback.
USER_ERRORS = (SourceError, UnknownTaskError, ZooError, FileNotFoundError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freemerge",
        description="Merge fine-tuned models into one FREE-merged backbone and serve it.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_zoo_commands(commands)
    add_artifact_commands(commands)
    add_load_bench(add_bench_commands(commands))
    serve = commands.add_parser("serve", help="serve an artifact over HTTP on a local Ray")
    serve.add_argument("artifact", type=Path)
    _add_serving_options(serve)
    serve.set_defaults(handler=lambda args: _serve(args, {"artifact": str(args.artifact)}))
    separate = commands.add_parser(
        "serve-separate", help="serve the zoo's N fine-tuned models separately (the baseline)"
    )
    separate.add_argument("zoo", type=Path, help="a zoo folder (see `freemerge zoo path`)")
    separate.add_argument("--tasks", nargs="+", default=None, help="default: every zoo task")
    separate.add_argument(
        "--models-per-replica",
        type=int,
        default=None,
        help="serve through Ray Serve model multiplexing with at most this many models per "
        "replica, loaded on demand (default: every model loaded in each replica)",
    )
    _add_serving_options(separate)
    separate.set_defaults(
        handler=lambda args: _serve(
            args,
            {
                "zoo": str(args.zoo),
                "tasks": args.tasks,
                "models_per_replica": args.models_per_replica,
            },
        )
    )
    demo = commands.add_parser("demo", help="zoo, merge and classify end to end")
    demo.add_argument("--config", type=Path, default=Path("configs/free.yaml"))
    demo.add_argument("--cache-dir", type=Path, default=None)
    demo.set_defaults(handler=lambda args: run_demo(args.config, args.cache_dir))
    return parser


def _add_serving_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--metrics-port", type=int, default=8080, help="Ray's Prometheus metrics export port"
    )
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-items", type=int, default=64, help="texts per request at most")
    parser.add_argument("--max-chars", type=int, default=10_000, help="characters per text at most")
    parser.add_argument("--mixing", choices=MIXING_MODES, default="argmax")
    parser.add_argument(
        "--expert-cache-size",
        type=int,
        default=8,
        help="experts kept on the GPU at once (least recently used out first)",
    )
    parser.add_argument(
        "--pass-overhead-tokens",
        type=int,
        default=None,
        help="fixed cost of one forward pass in tokens, for cutting batches into passes by "
        "length (default: 64 on the CPU, 4096 on a GPU; 0 cuts at every length)",
    )


def _serve(args: argparse.Namespace, source: dict) -> int:
    options = {
        **source,
        "device": args.device,
        "replicas": args.replicas,
        "cpus_per_replica": args.cpus_per_replica,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_ms / 1000,
        "max_items": args.max_items,
        "max_chars": args.max_chars,
        "mixing": args.mixing,
        "expert_cache_size": args.expert_cache_size,
        "pass_overhead_tokens": args.pass_overhead_tokens,
    }
    return serve_until_signalled(options, args.host, args.port, args.metrics_port)


def _bench_load(args: argparse.Namespace) -> int:
    cache_dir = args.cache_dir or default_cache_dir()
    zoo = args.zoo or cached_zoo(cache_dir=cache_dir).root
    artifact = args.artifact or cached_artifact(Path("configs/free.yaml"), cache_dir)
    plan = LoadPlan.quick() if args.quick else LoadPlan()
    result = run_load_bench(artifact, zoo, plan)
    command = "freemerge " + shlex.join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    name = "load_quick" if args.quick else "load"
    write_json_atomically(args.out / f"{name}.json", result)
    markdown = load_markdown(result, command)
    (args.out / f"{name}.md").write_text(markdown)
    load_plots(result, args.out, prefix=f"{name}_")
    print(markdown)
    return 0


def _bench_autoscale(args: argparse.Namespace) -> int:
    cache_dir = args.cache_dir or default_cache_dir()
    artifact = args.artifact or cached_artifact(Path("configs/free.yaml"), cache_dir)
    new_artifact = args.new_artifact or cached_artifact(Path("configs/free_sparse.yaml"), cache_dir)
    result = run_autoscale_bench(artifact, new_artifact, load_seconds=args.load_seconds)
    result["command"] = "freemerge " + shlex.join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(args.out / "autoscale.json", result)
    autoscale_plot(result, args.out / "autoscale_timeline.png")
    scale, update = result["scale"], result["rolling_update"]
    print(
        f"max replicas under load: {scale['max_replicas_seen']}; back to one after: "
        f"{scale['back_to_one']}; answers: {scale['answers']}"
    )
    print(
        f"rolling update: answers {update['answers']}; last answer from the new version: "
        f"{update['last_version'] == update['new_version']}"
    )
    return 0


def _add_bench_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--artifact",
        type=Path,
        default=None,
        help="default: configs/free.yaml merged over the cached zoo",
    )
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))


def add_load_bench(kinds: argparse._SubParsersAction) -> None:
    load = kinds.add_parser("load", help="load test: merged server against separate models")
    _add_bench_options(load)
    load.add_argument("--zoo", type=Path, default=None, help="default: the cached zoo")
    load.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    load.set_defaults(handler=_bench_load)
    scale = kinds.add_parser("autoscale", help="autoscaling 1->2->1 and a rolling update, locally")
    _add_bench_options(scale)
    scale.add_argument(
        "--new-artifact",
        type=Path,
        default=None,
        help="the version rolled out (default: configs/free_sparse.yaml merged)",
    )
    scale.add_argument("--load-seconds", type=float, default=40.0)
    scale.set_defaults(handler=_bench_autoscale)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as err:
        print(f"freemerge: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
