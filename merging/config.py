"""The merge config (YAML, in the spirit of mergekit's): every key has a documented default.

```yaml
zoo: full               # optional: a zoo by name (built under the cache) or path; then
                        #   base_model defaults to its base and models to all its tasks
base_model: PATH        # Hugging Face model directory of the pretrained model
models:                 # fine-tuned directories of the same architecture
  - {name: sms_spam, path: PATH}       # with a zoo, `- sms_spam` alone is enough
method: free            # a registered merge method: average | task_arithmetic | ties | fr | free
parameters: {}          # the method's own parameters; names and defaults are its signature's
                        #   (`freemerge methods` lists them)
experts:                # optional for any method; `free` always builds experts
  kind: lowrank         # lowrank (rank, vectors, skip) | sparse (density, granularity, rescale)
router:                 # optional: fit a task router (an artifact without one has none)
  kind: ngrams+embeddings # a '+'-joined set of ngrams, embeddings, layers, experts
  data: {sms_spam: zoo, other_task: texts.jsonl}   # default: `zoo` for every zoo task
  examples_per_task: 2000 # and buckets, ngram_dim, hidden, epochs, learning_rate, ...
                          #   (merging/router_config.py: RouterConfig)
```
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from freemerge.merging.experts import DEFAULT_EXPERT_KIND, Expert, expert_settings, make_expert
from freemerge.merging.kind_rules import TASK_KINDS
from freemerge.merging.methods import MergeMethod, get_method, resolve_parameters
from freemerge.merging.router_config import RouterConfig
from freemerge.merging.zoo_folder import Zoo, ZooError, open_zoo

TOP_KEYS = ("zoo", "base_model", "models", "method", "parameters", "experts", "router")
DEFAULT_METHOD = "free"


class ConfigError(ValueError):
    """A merge config that names an unknown key or value, or a missing path."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    path: Path


@dataclass(frozen=True)
class ExpertConfig:
    """An expert kind and its settings (defaults from the kind's constructor); ``by_kind``:
    settings that tasks of a task kind take over these (``embedding: {vectors: full}``)."""

    kind: str = DEFAULT_EXPERT_KIND
    settings: dict = field(default_factory=dict)
    by_kind: dict = field(default_factory=dict)

    def make(self, task_kind: str | None = None) -> Expert:
        """A new expert for a task of ``task_kind``."""
        return make_expert(self.kind, **{**self.settings, **self.by_kind.get(task_kind, {})})


@dataclass(frozen=True)
class MergeConfig:
    base_model: Path
    models: list[ModelRef]
    method: str = DEFAULT_METHOD
    parameters: dict = field(default_factory=dict)  # every parameter of the method, resolved
    experts: ExpertConfig | None = None
    router: RouterConfig | None = None

    def to_dict(self) -> dict:
        """The resolved config, defaults filled in (recorded in the artifact's manifest)."""
        return {
            "base_model": str(self.base_model),
            "models": [{"name": m.name, "path": str(m.path)} for m in self.models],
            "method": self.method,
            "parameters": {
                k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                for k, v in self.parameters.items()
            },
            "experts": self.experts and dataclasses.asdict(self.experts),
            "router": self.router and dataclasses.asdict(self.router),
        }


def _check_keys(block: object, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(block, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(block).__name__}")
    unknown = sorted(set(block) - set(allowed))
    if unknown:
        hint = " (experts is a top-level block)" if unknown[0] == "experts" else ""
        raise ConfigError(
            f"unknown key {unknown[0]!r} in {where}{hint}; allowed: {', '.join(allowed)}"
        )


def parse_config(
    raw: dict, relative_to: Path | None = None, zoo: str | Path | None = None
) -> MergeConfig:
    """Validate a config mapping; relative paths resolve against ``relative_to``; ``zoo``
    (a name or path) replaces the config's own ``zoo``."""
    _check_keys(raw, TOP_KEYS, "the config")
    root = relative_to or Path.cwd()

    def resolve(path: str | Path) -> Path:
        path = Path(path).expanduser()
        return path if path.is_absolute() else root / path

    opened = _open_zoo(zoo if zoo is not None else raw.get("zoo"))
    base, models = _models(raw, opened, resolve)
    method_name = raw.get("method", DEFAULT_METHOD)
    try:
        method = get_method(method_name)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    parameters = _parameters(method, raw.get("parameters") or {})
    experts = None
    if method.experts or raw.get("experts") is not None:
        experts = _expert_config(raw.get("experts") or {})
    return MergeConfig(
        base_model=base,
        models=models,
        method=method_name,
        parameters=parameters,
        experts=experts,
        router=_router_config(raw, models, opened, resolve),
    )


def _parameters(method: MergeMethod, given: object) -> dict:
    """The method's parameters resolved, and tried once on a 2 x 2 tensor so that values out
    of range (a density of 2, say) fail here rather than halfway through a merge."""
    if not isinstance(given, dict):
        raise ConfigError(f"parameters must be a mapping, got {type(given).__name__}")
    if "experts" in given:
        raise ConfigError("parameters: experts is a top-level block of the config, not a parameter")
    try:
        parameters = resolve_parameters(method, given)
        method(torch.zeros(2, 2), [torch.ones(2, 2)], name="", stats={}, **parameters)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"parameters: {err}") from None
    return parameters


def _open_zoo(zoo: str | Path | None) -> Zoo | None:
    if zoo is None:
        return None
    try:
        return open_zoo(zoo)
    except ZooError as err:
        raise ConfigError(str(err)) from None


def _models(
    raw: dict, zoo: Zoo | None, resolve: Callable[[str | Path], Path]
) -> tuple[Path, list[ModelRef]]:
    """The base model and the fine-tuned models (names alone pick zoo tasks)."""
    base = resolve(raw["base_model"]) if raw.get("base_model") else zoo and zoo.base
    if base is None:
        raise ConfigError("the config needs base_model (or zoo)")
    zoo_models = {name: task.path for name, task in zoo.tasks.items()} if zoo else {}
    entries = raw.get("models", list(zoo_models))
    if not entries:
        raise ConfigError("the config needs models: a list of {name, path} (or a zoo)")
    models = []
    for entry in entries:
        if isinstance(entry, str):
            if entry not in zoo_models:
                known = ", ".join(zoo_models) or "none (no zoo given)"
                raise ConfigError(
                    f"model {entry!r} has no path and is not a zoo task; zoo tasks: {known}"
                )
            entry = {"name": entry, "path": zoo_models[entry]}
        _check_keys(entry, ("name", "path"), "a models entry")
        if "name" not in entry or "path" not in entry:
            raise ConfigError(f"models entry {entry} needs both name and path")
        models.append(ModelRef(str(entry["name"]), resolve(entry["path"])))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names must be unique, got {names}")
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_.-]+", n)]
    if bad:
        raise ConfigError(f"model name {bad[0]!r} may hold only letters, digits, '_', '.', '-'")
    return base, models


def _expert_config(block: object) -> ExpertConfig:
    """Validate an experts block by building one empty expert of its kind."""
    if not isinstance(block, dict):
        raise ConfigError(f"experts must be a mapping, got {type(block).__name__}")
    settings = dict(block)
    kind = settings.pop("kind", DEFAULT_EXPERT_KIND)
    by_kind = settings.pop("by_kind", None) or {}
    if not isinstance(by_kind, dict):
        raise ConfigError(f"experts.by_kind must be a mapping, got {type(by_kind).__name__}")
    unknown = sorted(set(by_kind) - set(TASK_KINDS))
    if unknown:
        raise ConfigError(
            f"experts.by_kind: {unknown[0]!r} is not a task kind; kinds: {', '.join(TASK_KINDS)}"
        )
    for task_kind, override in {None: {}, **by_kind}.items():
        where = f"experts.by_kind.{task_kind}" if task_kind else "experts"
        if not isinstance(override, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(override).__name__}")
        try:
            make_expert(kind, **{**settings, **override})
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{where}: {err}") from None
    return ExpertConfig(kind, {**expert_settings(kind), **settings}, by_kind)


def _router_config(
    raw: dict, models: list[ModelRef], zoo: Zoo | None, resolve: Callable[[str | Path], Path]
) -> RouterConfig | None:
    """The router block: each model's texts come from its zoo task or a JSONL file."""
    if raw.get("router") is None:
        return None
    block = dict(raw["router"] or {})
    _check_keys(block, tuple(f.name for f in dataclasses.fields(RouterConfig)), "router")
    data = dict(block.pop("data", None) or {})
    unknown = sorted(set(data) - {m.name for m in models})
    if unknown:
        raise ConfigError(f"router.data names {unknown[0]!r}, which is not one of the models")
    zoo_tasks = zoo.tasks if zoo else {}
    for model in models:
        source = data.setdefault(model.name, "zoo" if model.name in zoo_tasks else None)
        if source is None:
            raise ConfigError(
                f"router.data has no examples for model {model.name!r}: give `zoo` (a zoo task "
                'of that name) or the path of a JSONL file with one {"text": ...} a line'
            )
        if source == "zoo" and model.name not in zoo_tasks:
            raise ConfigError(f"router.data: {model.name!r} is not a task of the config's zoo")
        path = zoo_tasks[model.name].texts if source == "zoo" else resolve(source)
        if not path.is_file():
            raise ConfigError(f"router.data: file {path} for {model.name!r} does not exist")
        data[model.name] = str(path)
    try:
        return RouterConfig(**block, data=data)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"router: {err}") from None


def load_config(path: Path, zoo: str | Path | None = None) -> MergeConfig:
    """Read and validate a YAML merge config; paths in it are relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    return parse_config(raw, relative_to=path.parent, zoo=zoo)
