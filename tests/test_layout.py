"""The layout the README promises: imports only point down, and the CLI starts light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each folder may import of the project (its own modules always).
ALLOWED = {
    "merging": {"merging"},
    "serving": {"merging", "serving"},
    "benchmarks": {"merging", "serving", "benchmarks"},
}
TRAINING = {"freemerge.merging.router_training"}  # offline only: never in a replica


def project_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("freemerge")}


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_only_point_down(folder):
    for path in sorted((ROOT / folder).glob("*.py")):
        for name in project_imports(path):
            layer = name.split(".")[1]
            assert layer in ALLOWED[folder], f"{path.name} imports {name}"
            if folder == "serving":
                assert name not in TRAINING, f"{path.name} imports training code {name}"


def test_the_cli_imports_nothing_heavy_before_a_subcommand_runs():
    code = (
        "import sys; from freemerge.serving.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_every_cli_option_has_help():
    from freemerge.serving.cli import build_parser

    def walk(parser):
        for action in parser._actions:
            if isinstance(action.choices, dict):  # subcommands
                for sub in action.choices.values():
                    yield from walk(sub)
            elif action.dest != "help":
                yield parser.prog, action

    missing = [f"{prog} {a.option_strings}" for prog, a in walk(build_parser()) if not a.help]
    assert missing == []


def test_the_front_processes_import_no_torch():
    """A front (ClassifierServer's process imports serving.app), Ray's proxy (our middleware)
    and ``freemerge serve`` itself check requests without torch or transformers."""
    modules = ("freemerge.serving.app", "freemerge.serving.proxy", "freemerge.serving.local")
    heavy = ("torch", "transformers", "safetensors.torch")
    code = f"import sys, {', '.join(modules)}; print(sorted(set({heavy}) & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
