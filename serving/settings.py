"""Every serving option in one place, with its default and help text.

The CLI's options (``freemerge serve --help``), the Ray app's arguments
(``serve run freemerge.serving.app:build_app artifact=DIR key=value ...``),
``deploy/serve_config.yaml`` and the benchmarks all read :class:`ServingOptions`; nothing else
holds a serving default. Imports nothing heavy, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

DEVICES = ("auto", "cpu", "cuda")
MAX_ITEMS_CEILING = 4096  # the request schema's bound on texts per request; max_items below it
MAX_TASK_CHARS = 200  # longer task names are refused before lookup (and never echoed whole)
# API keys reach replicas through the environment, never through the Serve config.
API_KEYS_ENV = "FREEMERGE_API_KEYS"
MIXING_MODES = ("argmax", "softmax")
# What takes the HTTP port of a local server (`freemerge serve --ingress`): Ray's proxy (Python,
# with our middleware), or Ray Serve's HAProxy, which sends each request straight to a front
# replica serving HTTP itself.
INGRESSES = ("proxy", "haproxy")
DEFAULT_INGRESS = "proxy"
FRONT_CALLS = 2  # a front's calls out at once, at least (more when it feeds more replicas)


def _option(default: object, help: str, cli: bool = True, choices: tuple = ()) -> Any:
    return field(default=default, metadata={"help": help, "cli": cli, "choices": choices})


@dataclass(frozen=True)
class ServingOptions:
    """What one app serves and how; ``artifact`` or ``zoo`` says what."""

    artifact: str | None = _option(None, "a merged artifact folder", cli=False)
    zoo: str | None = _option(None, "a zoo folder: serve its N models separately", cli=False)
    tasks: list[str] | None = _option(None, "zoo tasks to serve (default all)", cli=False)
    models_per_replica: int | None = _option(
        None, "multiplexed zoo models a replica holds", cli=False
    )
    autoscaling: dict | None = _option(None, "Ray Serve autoscaling_config", cli=False)
    device: str = _option(
        "auto", "where the models run: auto picks cuda when a GPU is visible", choices=DEVICES
    )
    replicas: int = _option(1, "model replicas (ignored when autoscaling is set)")
    front_replicas: int | None = _option(
        None,
        "HTTP front replicas (light: no CPU reserved, no torch); one feeds several model "
        "replicas, and fewer fronts form bigger batches (ignored when autoscaling is set, "
        "which the fronts follow too) (default: as many as the model replicas)",
    )
    cpus_per_replica: float = _option(
        1.0, "CPUs Ray reserves per replica; torch uses as many threads"
    )
    max_batch_size: int = _option(16, "requests per batch at most (a front's and a model's)")
    batch_wait_timeout_s: float = _option(
        0.04,
        "seconds a front's next call waits for more requests, only while it holds fewer than "
        "its share of the most it held at once lately (an idle server sends a request at "
        "once); model replicas run the fronts' calls without waiting, except with "
        "--models-per-replica, where each request comes in a call of its own and the model "
        "replica waits instead",
    )
    batch_wait_run_share: float = _option(
        0.2,
        "where longer than --batch-wait-timeout-s, a front's next call (with "
        "--models-per-replica, a model replica's next batch) waits up to this share of the "
        "median run time of its last calls: on slower cores the answered clients take longer "
        "to come back, and waiting a share of a run costs at most that share of the rate; 0 "
        "for the fixed wait",
    )
    max_items: int = _option(64, "texts per request at most (more: 413)")
    max_chars: int = _option(10_000, "characters per text at most (more: 413)")
    max_body_bytes: int = _option(
        2 * 1024 * 1024, "request body bytes at most, refused with 413 before it is parsed"
    )
    max_batch_tokens: int | None = _option(
        None,
        "padded tokens one forward pass holds at most (rows x longest row), which bounds a "
        "replica's memory under the largest legal traffic; a longer text runs alone "
        "(default: 8192 on the CPU, 65536 on a GPU)",
    )
    max_queued_requests: int = _option(
        128,
        "model requests (the POSTs of every API) one front replica holds at once, waiting "
        "or running; more are refused at once with 503 (TEI's routes: 429) and Retry-After "
        "(by Ray's proxy, before they reach a front)",
    )
    request_timeout_s: float = _option(
        30.0,
        "seconds a model request waits for its answer before a 503; a model thread busy "
        "twice this long on one batch marks the replica unhealthy",
    )
    expect_version: str | None = _option(
        None, "refuse to start unless the artifact's version (sha256 of manifest.json) is this"
    )
    mixing: str = _option(
        "argmax",
        "untagged texts: the router's top task's expert (argmax), or the router-weighted "
        "mix of every expert (softmax, one pass per text)",
        choices=MIXING_MODES,
    )
    min_router_confidence: float = _option(
        0.0,
        "untagged texts: when the router's top probability (calibrated) is below this, the "
        "request is refused with 422 naming the top candidate tasks, so the caller can tag "
        "it; a request's own `min_confidence` overrides it; 0 routes every text",
    )
    host_expert_bytes: int = _option(
        256 * 2**20,
        "bytes of experts a replica keeps in host memory as stored (16-bit factors by "
        "default), least recently used out first; the others are read from the artifact's "
        "files when asked for",
    )
    device_expert_bytes: int = _option(
        128 * 2**20,
        "bytes of experts a replica keeps ready on its device in the backbone's dtype (on the "
        "CPU: the float32 copies the forward reads), least recently used out first",
    )
    merge_above_tokens: int | None = _option(
        2800,
        "a forward pass of one task with at least this many padded tokens runs with the task's "
        "low-rank expert merged into the weights (restored bitwise after) instead of row "
        "adapters, whose cost grows with the tokens; on 2 CPU cores with the fused kernel the "
        "two cross near 2,900 tokens (bench load --costs-only); not measured on a GPU "
        "(default: 2800; 0 or less: never merge)",
    )
    pass_overhead_tokens: int | None = _option(
        None,
        "fixed cost of one forward pass in tokens, for cutting batches into passes by length; "
        "0 cuts at every length (default: 64 on the CPU, 4096 on a GPU)",
    )
    threads: int | None = _option(
        None, "torch threads per replica (default: CPUs per replica)", cli=False
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["choices"] and value not in f.metadata["choices"]:
                allowed = ", ".join(f.metadata["choices"])
                raise ValueError(f"unknown {f.name} {value!r}; allowed: {allowed}")
        if not 0.0 <= self.batch_wait_run_share <= 1.0:
            raise ValueError(
                f"batch_wait_run_share must be in [0, 1], got {self.batch_wait_run_share}"
            )
        if not 0.0 <= self.min_router_confidence <= 1.0:
            raise ValueError(
                f"min_router_confidence must be in [0, 1], got {self.min_router_confidence}"
            )
        if self.models_per_replica is not None and (not self.zoo or self.models_per_replica < 1):
            raise ValueError(
                "models_per_replica (multiplexed separate models) needs `zoo` and a value >= 1"
            )
        for name in (
            "replicas",
            "max_items",
            "max_chars",
            "max_body_bytes",
            "max_queued_requests",
            "host_expert_bytes",
            "device_expert_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.front_replicas is not None and self.front_replicas < 1:
            raise ValueError(f"front_replicas must be >= 1, got {self.front_replicas}")
        if self.max_items > MAX_ITEMS_CEILING:
            raise ValueError(f"max_items must be <= {MAX_ITEMS_CEILING}, got {self.max_items}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, int(self.cpus_per_replica))

    @property
    def fronts(self) -> int:
        """HTTP front replicas at most: autoscaling's ``max_replicas`` when set, else the count."""
        if self.autoscaling:
            return int(self.autoscaling.get("max_replicas", self.replicas))
        return self.front_replicas or self.replicas

    @property
    def calls_per_front(self) -> int:
        """Calls a front has out to the model replicas at once: :data:`FRONT_CALLS`, or one per
        model replica it feeds where that is more (the fronts share the model replicas evenly;
        with autoscaling, or replica counts set outside these options, it cannot tell); twice
        as many while a full batch queues beyond them (see :class:`Batcher`). What queues in
        the front meanwhile goes in its next call. Measured on 2 cores, one front and
        two model replicas at 16 clients (with the batch wait before the share of the peak):
        two calls out formed batches of 5.4 texts on average, four of 4.0, at the same rate
        within the noise."""
        if self.autoscaling:
            return FRONT_CALLS
        return max(FRONT_CALLS, -(-self.replicas // self.fronts))

    @classmethod
    def from_mapping(cls, options: dict[str, Any]) -> ServingOptions:
        """From app arguments (values may be strings, as ``serve run`` passes them)."""
        hints = get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"unknown serving option {unknown[0]!r}; allowed: {', '.join(names)}")
        if not (options.get("artifact") or options.get("zoo")):
            raise ValueError(
                "the app needs `artifact` (a merged artifact) or `zoo` (separate models)"
            )
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in options.items()})


def _coerce(name: str, value: object, hint: object) -> object:
    """``value`` as the option's type: numbers from strings, lists from comma-separated text."""
    kinds = [a for a in get_args(hint) if a is not type(None)] if _is_optional(hint) else [hint]
    if value is None or not kinds:
        return value
    kind = get_origin(kinds[0]) or kinds[0]
    try:
        if kind is list and isinstance(value, str):
            return value.split(",")
        if kind in (int, float) and not isinstance(value, bool):
            return kind(value)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ValueError(f"serving option {name} must be {noun}, got {value!r}") from None
    return value


def _is_optional(hint: object) -> bool:
    return get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint)


def add_serving_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per CLI field of :class:`ServingOptions`, with its help and default."""
    hints = get_type_hints(ServingOptions)
    for f in dataclasses.fields(ServingOptions):
        if not f.metadata["cli"]:
            continue
        hint = hints[f.name]
        kind = [a for a in get_args(hint) if a is not type(None)][0] if _is_optional(hint) else hint
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=kind,
            default=f.default,
            choices=f.metadata["choices"] or None,
            help=f.metadata["help"]
            if "(default:" in f.metadata["help"]
            else f"{f.metadata['help']} (default: {f.default})",
        )


def cli_options(args: argparse.Namespace) -> dict[str, Any]:
    """The serving options in ``args`` (those :func:`add_serving_arguments` added)."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(ServingOptions)
        if f.metadata["cli"]
    }


USER_CONFIG_KEYS = ("artifact", "expect_version")


def artifact_update(config: dict | None) -> tuple[str, str | None] | None:
    """The artifact folder and expected version (sha256 of manifest.json, or 12+ of its first
    hex digits) that a deployment's ``user_config`` names; None when it names no artifact.
    ValueError for another key."""
    config = config or {}
    unknown = sorted(set(config) - set(USER_CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"unknown user_config key {unknown[0]!r}; allowed: {', '.join(USER_CONFIG_KEYS)}"
        )
    if not config.get("artifact"):
        return None
    return str(config["artifact"]), config.get("expect_version")
