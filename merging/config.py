"""The merge config (YAML, in the spirit of mergekit's): every key has a documented default.

```yaml
zoo: default            # optional: a zoo folder, or `default` for the cached default zoo;
                        #   then base_model defaults to its base and models to all its tasks
base_model: PATH        # Hugging Face model directory of the pretrained model
models:                 # fine-tuned directories of the same architecture
  - {name: sms_spam, path: PATH}       # with a zoo, `- sms_spam` alone is enough
method: free            # average | task_arithmetic | ties | fr | free
parameters:
  scaling: 0.3          # lambda; default 0.3 (task_arithmetic, fr, free), 1.0 (ties)
  other_scaling: null   # lambda for the unfiltered shared tensors in fr/free (default: scaling)
  task_weights: uniform # uniform | energy: w_t = E(tau_t) / sum_s E(tau_s), E = sum of squares
  magnitude_alignment: false   # fr/free: rescale each filtered sum to the unfiltered sum's norm
  filter: {mode: reference, ratio: 0.7, cutoff: 0.05, targets: REGEX}   # fr and free
  experts: {kind: sparse, density: 0.01, granularity: tensor, rescale: 1.0}  # free, or any
  # or experts: {kind: lowrank, rank: 8, vectors: full, skip: word_embeddings}
  ties: {density: 0.2}  # ties
router:                 # optional: train a task router (an artifact without one has none)
  data: {sms_spam: zoo, other_task: texts.jsonl}   # default: `zoo` for every zoo task
  examples_per_task: 500  # from the train split (zoo) or the file, a seeded draw
  hidden: 256           # and epochs, learning_rate, weight_decay, batch_size, max_length, seed
```
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from merging.datasets import TASKS
from merging.experts import Expert, expert_settings, make_expert
from merging.filters import HighPass
from merging.router import RouterConfig
from merging.zoo import cached_zoo, open_zoo

METHODS = ("average", "task_arithmetic", "ties", "fr", "free")
DEFAULT_SCALING = {"average": 1.0, "task_arithmetic": 0.3, "ties": 1.0, "fr": 0.3, "free": 0.3}
TASK_WEIGHTS = ("uniform", "energy")
# The 2-D matrices of the transformer layers: attention projections and the feed-forward pair.
DEFAULT_FILTER_TARGETS = (
    r"^encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)\.weight$"
)


class ConfigError(ValueError):
    """A merge config that names an unknown key or value, or a missing path."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    path: Path


@dataclass(frozen=True)
class FilterConfig:
    mode: str = "reference"
    ratio: float = 0.7
    cutoff: float = 0.05
    targets: str = DEFAULT_FILTER_TARGETS

    def high_pass(self) -> HighPass:
        return HighPass(self.mode, self.ratio, self.cutoff)


@dataclass(frozen=True)
class ExpertConfig:
    """An expert kind and its settings (defaults from the kind's constructor)."""

    kind: str = "sparse"
    settings: dict = field(default_factory=dict)

    def make(self) -> Expert:
        return make_expert(self.kind, **self.settings)


@dataclass(frozen=True)
class TiesConfig:
    density: float = 0.2


@dataclass(frozen=True)
class MergeConfig:
    base_model: Path
    models: list[ModelRef]
    method: str = "free"
    scaling: float | None = None
    other_scaling: float | None = None
    task_weights: str = "uniform"
    magnitude_alignment: bool = False
    filter: FilterConfig = field(default_factory=FilterConfig)
    experts: ExpertConfig | None = None
    ties: TiesConfig = field(default_factory=TiesConfig)
    router: RouterConfig | None = None

    @property
    def lam(self) -> float:
        return DEFAULT_SCALING[self.method] if self.scaling is None else self.scaling

    @property
    def lam_other(self) -> float:
        return self.lam if self.other_scaling is None else self.other_scaling

    def to_dict(self) -> dict:
        """The resolved config, defaults filled in (recorded in the artifact's manifest)."""
        record = dataclasses.asdict(self)
        record["base_model"] = str(self.base_model)
        record["models"] = [{"name": m.name, "path": str(m.path)} for m in self.models]
        record["scaling"] = self.lam
        record["other_scaling"] = self.lam_other
        return record


def _check_keys(block: dict, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(block, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(block).__name__}")
    unknown = sorted(set(block) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; allowed: {', '.join(allowed)}")


def _block(cls: type, raw: dict | None, where: str) -> object:
    raw = raw or {}
    _check_keys(raw, tuple(f.name for f in dataclasses.fields(cls)), where)
    return cls(**raw)


def _resolve_zoo(raw: dict) -> tuple[Path | None, dict[str, Path]]:
    if raw.get("zoo") is None:
        return None, {}
    zoo = cached_zoo() if raw["zoo"] == "default" else open_zoo(Path(raw["zoo"]))
    return zoo.base, {name: task.path for name, task in zoo.tasks.items()}


def parse_config(raw: dict, relative_to: Path | None = None) -> MergeConfig:
    """Validate a config mapping; relative paths resolve against ``relative_to``."""
    _check_keys(
        raw, ("zoo", "base_model", "models", "method", "parameters", "router"), "the config"
    )
    zoo_base, zoo_models = _resolve_zoo(raw)
    root = relative_to or Path.cwd()

    def resolve(path: str | Path) -> Path:
        path = Path(path).expanduser()
        return path if path.is_absolute() else root / path

    base = resolve(raw["base_model"]) if raw.get("base_model") else zoo_base
    if base is None:
        raise ConfigError("the config needs base_model (or zoo)")
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
    method = raw.get("method", "free")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    params = raw.get("parameters") or {}
    allowed = (
        "scaling",
        "other_scaling",
        "task_weights",
        "magnitude_alignment",
        "filter",
        "experts",
        "ties",
    )
    _check_keys(params, allowed, "parameters")
    filter_config = _block(FilterConfig, params.get("filter"), "parameters.filter")
    filter_config.high_pass()  # validates mode, ratio, cutoff
    try:
        re.compile(filter_config.targets)
    except re.error as err:
        raise ConfigError(f"parameters.filter.targets is not a valid regex: {err}") from None
    experts = None
    if method == "free" or params.get("experts") is not None:
        experts = _expert_config(params.get("experts") or {})
    ties = _block(TiesConfig, params.get("ties"), "parameters.ties")
    if not 0 < ties.density <= 1:
        raise ConfigError(f"parameters.ties.density must be in (0, 1], got {ties.density}")
    task_weights = params.get("task_weights", "uniform")
    if task_weights not in TASK_WEIGHTS:
        raise ConfigError(
            f"unknown task_weights {task_weights!r}; allowed: {', '.join(TASK_WEIGHTS)}"
        )
    router = _router_config(raw, models, zoo_models, resolve)
    return MergeConfig(
        router=router,
        base_model=base,
        models=models,
        method=method,
        scaling=params.get("scaling"),
        other_scaling=params.get("other_scaling"),
        task_weights=task_weights,
        magnitude_alignment=bool(params.get("magnitude_alignment", False)),
        filter=filter_config,
        experts=experts,
        ties=ties,
    )


def _expert_config(block: dict) -> ExpertConfig:
    """Validate an experts block by building one empty expert of its kind."""
    if not isinstance(block, dict):
        raise ConfigError(f"parameters.experts must be a mapping, got {type(block).__name__}")
    settings = dict(block)
    kind = settings.pop("kind", "sparse")
    try:
        make_expert(kind, **settings)
    except ValueError as err:
        raise ConfigError(f"parameters.experts: {err}") from None
    return ExpertConfig(kind, {**expert_settings(kind), **settings})


def _router_config(
    raw: dict,
    models: list[ModelRef],
    zoo_models: dict[str, Path],
    resolve: Callable[[str | Path], Path],
) -> RouterConfig | None:
    """The router block: each model's examples come from its zoo task or a JSONL file."""
    if raw.get("router") is None:
        return None
    block = dict(raw["router"] or {})
    router = _block(RouterConfig, block, "router")
    data = dict(block.get("data") or {})
    unknown = sorted(set(data) - {m.name for m in models})
    if unknown:
        raise ConfigError(f"router.data names {unknown[0]!r}, which is not one of the models")
    for model in models:
        source = data.setdefault(model.name, "zoo" if model.name in zoo_models else None)
        if source is None:
            raise ConfigError(
                f"router.data has no examples for model {model.name!r}: give `zoo` (a zoo task "
                'of that name) or the path of a JSONL file with one {"text": ...} a line'
            )
        if source == "zoo":
            if model.name not in TASKS:
                raise ConfigError(
                    f"router.data: {model.name!r} is not a zoo task; zoo tasks: {', '.join(TASKS)}"
                )
        else:
            path = resolve(source)
            if not path.is_file():
                raise ConfigError(f"router.data: file {path} for {model.name!r} does not exist")
            data[model.name] = str(path)
    if router.examples_per_task < 1:
        raise ConfigError(f"router.examples_per_task must be >= 1, got {router.examples_per_task}")
    return dataclasses.replace(router, data=data)


def load_config(path: Path) -> MergeConfig:
    """Read and validate a YAML merge config; paths in it are relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    return parse_config(raw, relative_to=path.parent)
