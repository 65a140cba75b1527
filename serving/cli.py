"""The ``freemerge`` command.

Serving's subcommands (``serve``, ``serve-separate``) are defined here; the offline ones
(merging) and the benchmarks' register themselves through the ``freemerge.commands`` entry
points of the installed package, so this module imports neither. Nothing heavy (torch,
transformers, Ray) is imported until a subcommand runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from freemerge.serving.settings import (
    API_KEYS_ENV,
    DEFAULT_INGRESS,
    INGRESSES,
    add_serving_arguments,
    cli_options,
)

# Subcommand groups in the order --help lists them (the layers, bottom up).
GROUP_ORDER = ("merging", "serving", "benchmarks")


def _local_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=8080,
        help="port of Ray's Prometheus metrics export (default: 8080)",
    )
    parser.add_argument(
        "--ingress",
        choices=INGRESSES,
        default=DEFAULT_INGRESS,
        help="what takes the HTTP port: Ray's proxy (Python), or Ray Serve's HAProxy, which "
        "sends each request straight to a front replica serving HTTP itself (less CPU per "
        "request; see the README's results); with haproxy, HAProxy's stats and Prometheus "
        "pages listen on all interfaces, as Ray binds them, on ports picked free "
        f"(default: {DEFAULT_INGRESS})",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help="require `Authorization: Bearer KEY` on every route but /healthz, /readyz and the "
        "OpenAPI page; repeat for several "
        f"keys, or list them comma-separated in ${API_KEYS_ENV}, which keeps them out of the "
        "process list (default: no key)",
    )
    add_serving_arguments(parser)


def _serve(args: argparse.Namespace, source: dict) -> int:
    from freemerge.serving.local import serve_until_signalled

    if args.api_key:  # replicas read the keys from the environment they inherit
        if any("," in key or not key.strip() for key in args.api_key):
            raise ValueError("an API key must be non-empty and hold no comma")
        given = [os.environ[API_KEYS_ENV]] if os.environ.get(API_KEYS_ENV) else []
        os.environ[API_KEYS_ENV] = ",".join(given + args.api_key)
    options = {**source, **cli_options(args)}
    return serve_until_signalled(options, args.host, args.port, args.metrics_port, args.ingress)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``serve-separate`` to the ``freemerge`` parser."""
    serve = commands.add_parser("serve", help="serve an artifact over HTTP on a local Ray")
    serve.add_argument("artifact", type=Path, help="artifact folder (from `freemerge merge`)")
    _local_arguments(serve)
    serve.set_defaults(handler=lambda args: _serve(args, {"artifact": str(args.artifact)}))

    separate = commands.add_parser(
        "serve-separate", help="serve a zoo's N fine-tuned models separately (the baseline)"
    )
    separate.add_argument("zoo", help="a zoo by name (demo, full) or folder")
    separate.add_argument(
        "--tasks", nargs="+", default=None, metavar="TASK", help="tasks to serve (default: all)"
    )
    separate.add_argument(
        "--models-per-replica",
        type=int,
        default=None,
        help="serve through Ray Serve model multiplexing with at most this many models per "
        "replica, loaded on demand (default: every model loaded in each replica)",
    )
    _local_arguments(separate)
    separate.set_defaults(handler=_serve_separate)


def _serve_separate(args: argparse.Namespace) -> int:
    from freemerge.merging.zoo_folder import zoo_path

    source = {
        "zoo": str(zoo_path(args.zoo)),
        "tasks": args.tasks,
        "models_per_replica": args.models_per_replica,
    }
    return _serve(args, source)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freemerge",
        description="Merge fine-tuned models into one FREE-merged backbone and serve it.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    found = {entry.name: entry for entry in entry_points(group="freemerge.commands")}
    for name in sorted(found, key=lambda n: (GROUP_ORDER + (n,)).index(n)):
        found[name].load()(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError) as err:  # what a user's input or files can cause
        print(f"freemerge: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
