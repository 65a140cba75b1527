"""The ``freemerge`` command: offline subcommands from :mod:`merging.cli`, serving ones here."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from merging.cli import add_artifact_commands, add_zoo_commands
from merging.datasets import UnknownTaskError
from merging.sources import SourceError
from merging.zoo import ZooError
from serving.demo import run_demo

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
    demo = commands.add_parser("demo", help="zoo, merge and classify end to end")
    demo.add_argument("--config", type=Path, default=Path("configs/free.yaml"))
    demo.add_argument("--cache-dir", type=Path, default=None)
    demo.set_defaults(handler=lambda args: run_demo(args.config, args.cache_dir))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as err:
        print(f"freemerge: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
