"""The merged model at inference: one backbone, per-task experts and heads.

A task's answer comes from its head, run by the family's own class of the task's kind
(:class:`freemerge.merging.families.TaskHead`; an embedding task pools instead:
:mod:`freemerge.merging.kinds`), on the output of the backbone with the task's expert applied:
what that class computes in eval mode. The runtime applies an expert in one of
three ways, chosen per pass by :meth:`MergedClassifier.classify_rows`:

- row adapters (low-rank experts on linear layers, biases and LayerNorms kept whole or not;
  the default artifact): each row's task adapter runs beside the base layers
  (:mod:`freemerge.serving.adapters`), so rows of any tasks share one pass (where the family
  allows: a layer that also runs on an input shared by the whole batch keeps one task per
  pass) and the weights are never written;
- in place (sparse experts, an artifact built without row adapters, or a one-task pass of at
  least ``merge_above_tokens`` padded tokens, where merging costs less than row adapters): a
  pass holds one task, whose expert is written into the weights and restored bitwise after;
- a softmax mixture (``mixing="softmax"``, untagged rows): each row runs alone with the
  router-weighted sum of all experts applied in place.

Row adapters and the in-place expert compute the same model up to float rounding (tested);
``freemerge export`` writes the in-place form.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from itertools import groupby

import torch
from safetensors.torch import load_file
from transformers import BatchEncoding, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from freemerge.merging.artifact import Artifact
from freemerge.merging.batching import PassPlan, Tokenized, outputs_in_passes
from freemerge.merging.families import (
    config_family,
    layer_matrices,
    load_backbone,
    load_tokenizer,
    task_config,
    token_limit,
)
from freemerge.merging.kind_rules import DEFAULT_OPTIONS
from freemerge.merging.kinds import TaskRunner, task_runner
from freemerge.serving.adapters import (
    RowTasks,
    install_row_adapters,
    row_adapter_weights,
    rows_assigned,
)
from freemerge.serving.expert_store import ExpertStore
from freemerge.serving.requests import Prediction, StageTimings
from freemerge.serving.router import Route, Router, RouterMissingError
from freemerge.serving.settings import MIXING_MODES, ServingOptions


def _files(artifact: Artifact, prefix: str) -> dict[str, str]:
    """The manifest's hashes of the files whose names start with ``prefix``."""
    files = artifact.manifest.get("files", {})
    return {name: digest for name, digest in files.items() if name.startswith(prefix)}


def _same_file(old: Artifact, new: Artifact, task: str, key: str) -> bool:
    """Whether ``task``'s ``key`` file (head or config) is the same name and hash in both, or
    absent from both."""
    if task not in old.tasks:
        return False
    name = old.tasks[task].get(key)
    if name != new.tasks[task].get(key):
        return False
    return name is None or old.manifest["files"].get(name) == new.manifest["files"].get(name)


def load_head(
    artifact: Artifact, task: str, device: torch.device, tokenizer: PreTrainedTokenizerBase
) -> TaskRunner:
    """Task ``task``'s head (by its kind), built from its own config (artifacts written before
    task configs: the backbone's, with the task's labels)."""
    entry = artifact.task(task)
    head = entry.get("head") and load_file(str(artifact.path(entry["head"])))
    return task_runner(entry, task_config(artifact, task), head, device, tokenizer)


def _rows_of(output: ModelOutput, part: slice) -> ModelOutput:
    """The rows ``part`` of a backbone output (views: nothing is copied)."""
    return type(output)(**{k: v[part] for k, v in output.items() if isinstance(v, torch.Tensor)})


class MergedClassifier:
    """Backbone loaded once; :meth:`classify_rows` answers texts, each with its own task."""

    def __init__(
        self,
        artifact: Artifact,
        device: str | torch.device = "cpu",
        host_expert_bytes: int = ServingOptions.host_expert_bytes,
        device_expert_bytes: int = ServingOptions.device_expert_bytes,
        row_adapters: bool = True,
        pass_overhead_tokens: int | None = None,
        max_batch_tokens: int | None = None,
        merge_above_tokens: int | None = ServingOptions.merge_above_tokens,
    ) -> None:
        self.artifact = artifact
        # a one-task pass this large runs with its expert merged into the weights (None: never)
        self.merge_above_tokens = merge_above_tokens
        self.device = torch.device(device)
        self.budgets = (host_expert_bytes, device_expert_bytes)
        # how batches are cut into forward passes: by length, within a token budget
        self.plan = PassPlan.for_device(self.device, pass_overhead_tokens, max_batch_tokens)
        self.backbone = load_backbone(artifact.backbone, self.device)
        self.tokenizer = load_tokenizer(artifact.backbone, self.backbone)
        self.parameters = dict(self.backbone.named_parameters())
        self.max_length = token_limit(self.tokenizer, self.backbone.config)
        self.mixed_task_passes = config_family(self.backbone.config).mixed_task_passes
        self.layer_matrices = layer_matrices(self.backbone)  # before row adapters wrap them
        self.heads = {
            task: load_head(artifact, task, self.device, self.tokenizer) for task in artifact.tasks
        }
        dtype = next(iter(self.parameters.values())).dtype
        self.store = ExpertStore(
            artifact, self.device, dtype, host_expert_bytes, device_expert_bytes
        )
        # Low-rank experts (linear layers, biases, LayerNorms): run per row beside the layers.
        self.row_adapters: RowTasks | None = None
        weights = row_adapter_weights(self.store.layouts.values(), self.backbone)
        if row_adapters and self.store.files and weights is not None:
            self.row_adapters = install_row_adapters(self.backbone, weights)
        self.router = self._load_router()
        self.damaged: str | None = None  # set if restoring the merged weights ever failed

    def _load_router(self) -> Router | None:
        if not self.artifact.manifest.get("router"):
            return None
        return Router(self.artifact.root, self.device, self.store.load_all, self.layer_matrices)

    def updated(self, artifact: Artifact) -> MergedClassifier:
        """This model moved to ``artifact``, another version of its artifact. When the backbone's
        files hash as this one's, the loaded backbone (with its row adapters), tokenizer and
        settings are kept, and only the heads, experts and router whose files changed are
        loaded; otherwise everything is loaded afresh. This model is left as it was, so
        batches already running on it finish on its version."""
        if _files(artifact, "backbone/") != _files(self.artifact, "backbone/"):
            host, device = self.budgets
            return MergedClassifier(
                artifact,
                self.device,
                host,
                device,
                self.row_adapters is not None,
                self.plan.overhead,
                self.plan.max_tokens,
                self.merge_above_tokens,
            )
        new = copy.copy(self)
        new.artifact = artifact
        new.heads = {
            task: self.heads[task]
            if all(_same_file(self.artifact, artifact, task, key) for key in ("head", "config"))
            else load_head(artifact, task, self.device, self.tokenizer)
            for task in artifact.tasks
        }
        new.store = self.store.moved_to(artifact)
        if self.row_adapters is not None:
            weights = row_adapter_weights(new.store.layouts.values(), self.backbone)
            if weights is None:
                raise ValueError("the new version's experts cannot run as row adapters")
            install_row_adapters(self.backbone, weights, self.row_adapters)
        same_router = _files(artifact, "router") == _files(self.artifact, "router")
        new.router = self.router if same_router else new._load_router()
        return new

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def labels(self, task: str) -> list[str]:
        return self.artifact.task(task)["labels"]

    def expert_bytes(self) -> int:
        """Bytes of every copy of an expert held in memory: host and device tiers."""
        return self.store.held_bytes()

    @contextmanager
    def expert_applied(self, task: str | None) -> Iterator[None]:
        """The backbone holds theta_m + e_task inside the block and exactly theta_m after it
        (``task=None`` leaves it as it is)."""
        expert = None
        if task is not None:
            self.artifact.task(task)  # an unknown task fails with the list of known ones
            expert = self.store.get(task)
        with self._restore_watched(expert.applied(self.parameters) if expert else nullcontext()):
            yield

    @contextmanager
    def mixture_applied(self, weights: dict[str, float]) -> Iterator[None]:
        """The backbone holds theta_m + sum_t w_t e_t inside the block (softmax routing)."""
        experts = [(self.store.get(t), w) for t, w in weights.items() if self.store.has_expert(t)]
        if not experts:
            yield
            return
        mixed = type(experts[0][0]).mix([e for e, _ in experts], [w for _, w in experts])
        with self._restore_watched(mixed.applied(self.parameters)):
            yield

    @contextmanager
    def _restore_watched(self, applied: AbstractContextManager) -> Iterator[None]:
        """``applied``, recording in :attr:`damaged` an error raised while it restores the
        weights (the block's own errors pass through unrecorded)."""
        block_error: BaseException | None = None
        try:
            with applied:
                try:
                    yield
                except BaseException as err:
                    block_error = err
                    raise
        except BaseException as err:
            if err is not block_error:
                self.damaged = f"restoring the merged weights failed ({type(err).__name__})"
            raise

    def route(
        self, texts: list[str], candidates: list[list[str] | None] | None = None
    ) -> list[Route]:
        """The router's task per text (among the row's candidates, when given), in one router
        pass for all texts."""
        if self.router is None:
            raise RouterMissingError(
                "this artifact has no router, so a task is required; "
                f"tasks: {', '.join(self.tasks)}"
            )
        return self.router.routes(self.backbone, self.tokenizer, texts, self.plan, candidates)

    @torch.no_grad()
    def classify_rows(
        self,
        texts: list[str | tuple[str, str]],
        tasks: list[str | None],
        mixing: str = "argmax",
        max_length: int | None = None,
        timings: StageTimings | None = None,
        routes: dict[int, Route] | None = None,
        options: list[dict] | None = None,
    ) -> list[Prediction]:
        """Answer each text (or pair) with its own task, by the task's kind, with its row's
        ``options`` (threshold, aggregation, normalize; default :data:`DEFAULT_OPTIONS`);
        rows whose task is None take their route from ``routes`` (by row) or are routed first
        (one router pass for all of them), then every row runs in the passes :meth:`_passes`
        plans, where each task's head reads its rows of the backbone's output."""
        if mixing not in MIXING_MODES:
            raise ValueError(f"unknown mixing {mixing!r}; allowed: {', '.join(MIXING_MODES)}")
        timings = timings if timings is not None else StageTimings()
        for task in set(tasks) - {None}:
            self.artifact.task(task)  # unknown tasks fail before any work
        chosen, confidence, mixtures = self._routed(texts, tasks, mixing, timings, routes)
        runners = [self.heads[task] for task in chosen]
        prepared = [runner.prepared(text) for runner, text in zip(runners, texts, strict=True)]
        outputs, tokens = self._logit_rows(prepared, chosen, mixtures, max_length, timings)
        options = options or [DEFAULT_OPTIONS] * len(texts)
        return [
            Prediction(
                task=chosen[i],
                routed=i in confidence,
                router_confidence=confidence.get(i),
                truncated=tokens.truncated[i],
                kind=runner.kind,
                tokens=tokens.lengths[i],
                **runner.answer(outputs[i], prepared[i], tokens.encoding.encodings[i], options[i]),
            )
            for i, runner in enumerate(runners)
        ]

    @torch.no_grad()
    def logits(self, task: str, texts: list[str]) -> torch.Tensor:
        """Sequence task ``task``'s logits for every text (on the CPU)."""
        return torch.stack(self.outputs(texts, [task] * len(texts))[0])

    @torch.no_grad()
    def outputs(
        self, texts: list[str | tuple[str, str]], tasks: list[str]
    ) -> tuple[list[torch.Tensor], Tokenized]:
        """Each text's output with its task (on the CPU), as its head gives it: logits (a
        token task's, per token), an embedding task's pooled vector (not normalized); and
        the texts as tokenized."""
        for task in set(tasks):
            self.artifact.task(task)  # an unknown task fails with the list of known ones
        prepared = [self.heads[t].prepared(text) for t, text in zip(tasks, texts, strict=True)]
        return self._logit_rows(prepared, tasks, {}, None, StageTimings())

    def _logit_rows(
        self,
        texts: list[str],
        chosen: list[str],
        mixtures: dict[int, dict[str, float]],
        max_length: int | None,
        timings: StageTimings,
    ) -> tuple[list[torch.Tensor], Tokenized]:
        """Each text's logits with its task (on the CPU) through the one loop, in the passes
        :meth:`_passes` plans; and the tokenized texts."""
        limit = min(max_length or self.max_length, self.max_length)
        limits = [self.heads[task].token_limit(limit) for task in chosen]
        tokens = Tokenized(self.tokenizer, texts, limits)

        def forward(rows: list[int], batch: BatchEncoding) -> list[torch.Tensor]:
            weights = mixtures.get(rows[0]) if len(rows) == 1 else None
            return self.logits_pass([chosen[i] for i in rows], weights, batch, timings)

        passes = self._passes(chosen, set(mixtures), tokens.lengths)
        return outputs_in_passes(tokens, passes, self.device, forward), tokens

    def classify(
        self, texts: list[str], task: str | None = None, mixing: str = "argmax"
    ) -> list[Prediction]:
        """Every text with ``task``, or with the router's task per text when None."""
        return self.classify_rows(texts, [task] * len(texts), mixing)

    def _routed(
        self,
        texts: list[str],
        tasks: list[str | None],
        mixing: str,
        timings: StageTimings,
        routes: dict[int, Route] | None,
    ) -> tuple[list[str], dict[int, float], dict[int, dict[str, float]]]:
        """Each row's task (routed rows: the router's top task), the router's confidence per
        routed row, and with softmax mixing each routed row's mixture weights (the
        probabilities of the tasks it was routed among)."""
        routes = dict(routes or {})
        unrouted = [i for i, task in enumerate(tasks) if task is None and i not in routes]
        if unrouted:
            start = time.perf_counter()
            routes.update(zip(unrouted, self.route([texts[i] for i in unrouted]), strict=True))
            timings.add("route", time.perf_counter() - start)
        chosen = list(tasks)
        confidence: dict[int, float] = {}
        mixtures: dict[int, dict[str, float]] = {}
        for row, task in enumerate(tasks):
            if task is None:
                chosen[row] = routes[row].task
                confidence[row] = routes[row].confidence
                if mixing == "softmax":
                    mixtures[row] = routes[row].probabilities
        return chosen, confidence, mixtures

    def _passes(self, chosen: list[str], mixed: set[int], lengths: list[int]) -> list[list[int]]:
        """Rows per forward pass, cut by token length within the token budget (:attr:`plan`).
        With row adapters any tasks share a pass, their rows put next to each other, where the
        family allows it; otherwise each pass holds one task. A softmax-mixed row is a pass of
        its own."""
        order = {task: k for k, task in enumerate(dict.fromkeys(chosen))}
        plain = [i for i in range(len(chosen)) if i not in mixed]
        groups = (
            [plain]
            if self.row_adapters is not None and self.mixed_task_passes
            else [[i for i in plain if chosen[i] == task] for task in order]
        )
        passes = []
        for group in groups:
            for cut in self.plan.passes([lengths[i] for i in group]):
                passes.append(sorted((group[k] for k in cut), key=lambda i: (order[chosen[i]], i)))
        return passes + [[row] for row in sorted(mixed)]

    def _merge_pays(self, row_tasks: list[str], batch: BatchEncoding) -> bool:
        """Whether this pass runs faster with its one task's expert merged into the weights
        (and restored after) than with row adapters: their cost grows with the tokens, the
        merge's does not."""
        limit = self.merge_above_tokens
        one_task = row_tasks.count(row_tasks[0]) == len(row_tasks)
        return limit is not None and one_task and batch["input_ids"].numel() >= limit

    def logits_pass(
        self,
        row_tasks: list[str],
        weights: dict[str, float] | None,
        batch: BatchEncoding,
        timings: StageTimings,
    ) -> list[torch.Tensor]:
        """Each row's logits (on the CPU) from one pass, stages timed: the backbone with a
        weighted mix of experts (``weights``), with per-row adapters (any tasks), or with the
        one task's expert applied in place (sparse experts; or a one-task pass of
        ``merge_above_tokens`` padded tokens or more); then each run of rows of one task
        through that task's head."""
        start = time.perf_counter()
        if weights:
            context = self.mixture_applied(weights)
        elif self.row_adapters is not None and not self._merge_pays(row_tasks, batch):
            experts = {task: self.store.get(task) for task in dict.fromkeys(row_tasks)}
            context = rows_assigned(self.row_adapters, row_tasks, experts)
        else:
            context = self.expert_applied(row_tasks[0])
        with context:
            applied = time.perf_counter()
            output = self.backbone(**batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            forwarded = time.perf_counter()
        unapplied = time.perf_counter()
        logits: list[torch.Tensor] = []
        start_row = 0
        for task, run in groupby(row_tasks):
            part = slice(start_row, start_row + len(list(run)))
            rows = {key: value[part] for key, value in batch.items()}
            logits.extend(self.heads[task].rows(_rows_of(output, part), rows))
            start_row = part.stop
        timings.add("forward", (forwarded - applied) + (time.perf_counter() - unapplied))
        timings.add("expert_apply", (applied - start) + (unapplied - forwarded))
        return logits
