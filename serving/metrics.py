"""Prometheus metrics of a replica, exported through Ray's metrics port.

Ray prefixes every name with ``ray_``; the README lists each metric with its meaning.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray.serve.metrics import Counter, Gauge, Histogram

from freemerge.serving.requests import Prediction, StageTimings

if TYPE_CHECKING:
    from freemerge.serving.expert_store import TierCounts

logger = logging.getLogger(__name__)

LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
# Every size up to 8 its own bucket (a CPU's batches at moderate load are that small), then
# doubling with a midpoint: the median batch is exact where it matters most.
BATCH_BOUNDARIES = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512, 1024]
CONFIDENCE_BOUNDARIES = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
TIER_COUNTERS = {
    "hits": "Expert lookups a tier answered",
    "misses": "Expert lookups a tier did not hold",
    "evictions": "Experts a tier let go to stay within its byte budget",
}
# name, description, tags: counted by the fronts and by Ray's proxy (its refusals)
REQUESTS_TOTAL = {
    "name": "freemerge_requests_total",
    "description": "Requests answered, by task, status and route (a route template)",
    "tag_keys": ("task", "status", "route"),
}
MEMORY_GAUGES = (
    "process_resident_bytes",
    "device_allocated_bytes",
    "backbone_bytes",
    "resident_expert_bytes",
)


class ServerMetrics:
    """The replica's metrics; one instance per replica."""

    def __init__(self) -> None:
        self.requests = Counter(**REQUESTS_TOTAL)
        self.latency = Histogram(
            "freemerge_request_latency_seconds",
            "Request latency in the replica",
            LATENCY_BOUNDARIES,
            tag_keys=("task",),
        )
        self.stage = Histogram(
            "freemerge_stage_latency_seconds",
            "Seconds per stage",
            LATENCY_BOUNDARIES,
            tag_keys=("stage",),
        )
        self.batch_size = Histogram("freemerge_batch_size", "Texts per batch", BATCH_BOUNDARIES)
        self.tier_counters = {
            name: Counter(f"freemerge_expert_{name}_total", text, tag_keys=("tier",))
            for name, text in TIER_COUNTERS.items()
        }
        self.tier_bytes = Gauge(
            "freemerge_expert_tier_bytes", "Bytes of experts held per tier", tag_keys=("tier",)
        )
        self.fetch = Histogram(
            "freemerge_expert_fetch_seconds",
            "Seconds to fetch an expert from a tier (disk: into host memory; host: onto the "
            "device)",
            LATENCY_BOUNDARIES,
            tag_keys=("tier",),
        )
        self.routed = Counter("freemerge_routed_total", "Texts routed per task", tag_keys=("task",))
        self.tokens = Counter(
            "freemerge_tokens_total", "Tokens run per task kind", tag_keys=("kind",)
        )
        self.confidence = Histogram(
            "freemerge_router_confidence", "Router top probability", CONFIDENCE_BOUNDARIES
        )
        self.model_loads = Counter(
            "freemerge_model_loads_total",
            "Separate models loaded by a multiplexed replica",
            tag_keys=("task",),
        )
        self.model_load = Histogram(
            "freemerge_model_load_seconds", "Seconds to load one separate model", LATENCY_BOUNDARIES
        )
        self.memory = {
            name: Gauge(f"freemerge_{name}", name.replace("_", " ")) for name in MEMORY_GAUGES
        }
        self._tiers_seen: dict[str, TierCounts] = {}

    def request(
        self, task: str | None, status: int, seconds: float | None = None, route: str = "other"
    ) -> None:
        tag = task or "routed"
        self.requests.inc(tags={"task": tag, "status": str(status), "route": route})
        if seconds is not None:
            self.latency.observe(seconds, tags={"task": tag})

    def model_loaded(self, task: str, seconds: float) -> None:
        self.model_loads.inc(tags={"task": task})
        self.model_load.observe(seconds)

    def batch(
        self,
        queue_seconds: list[float],
        timings: StageTimings,
        answers: list[list[Prediction] | Exception],
    ) -> None:
        for seconds in queue_seconds:
            self.stage.observe(seconds, tags={"stage": "queue"})
        for stage, seconds in timings.seconds.items():
            self.stage.observe(seconds, tags={"stage": stage})
        answered = [a for a in answers if not isinstance(a, Exception)]  # not: 422s, failures
        self.batch_size.observe(sum(len(a) for a in answered))
        for prediction in (p for request in answered for p in request):
            if prediction.kind is not None:
                self.tokens.inc(prediction.tokens, tags={"kind": prediction.kind})
            if prediction.routed:
                self.routed.inc(tags={"task": prediction.task})
                self.confidence.observe(prediction.router_confidence)

    def experts(self, tiers: dict[str, TierCounts], fetches: list[tuple[str, float]]) -> None:
        """Tier counters advance by what each tier counted since the last call; its bytes and
        the fetches' seconds are recorded."""
        for tier, counts in tiers.items():
            seen = self._tiers_seen.get(tier)
            for name, counter in self.tier_counters.items():
                grown = getattr(counts, name) - (getattr(seen, name) if seen else 0)
                if grown > 0:
                    counter.inc(grown, tags={"tier": tier})
            self.tier_bytes.set(counts.bytes, tags={"tier": tier})
        self._tiers_seen = dict(tiers)
        for tier, seconds in fetches:
            self.fetch.observe(seconds, tags={"tier": tier})

    def set_memory(self, figures: dict[str, int]) -> None:
        for name, gauge in self.memory.items():
            gauge.set(figures[name])

    def refresh_memory_every(self, seconds: float, read: Callable[[], dict[str, int]]) -> None:
        """Re-set the memory gauges from ``read()`` every ``seconds`` on a daemon thread: Ray
        drops a gauge from its export some seconds after its last set, idle or not.
        """

        def loop() -> None:
            while True:
                try:
                    self.set_memory(read())
                except Exception:  # a failed read must not stop the gauges for good
                    logger.exception("reading the memory figures failed; trying again")
                time.sleep(seconds)

        threading.Thread(target=loop, name="freemerge-memory-gauges", daemon=True).start()


def scrape(url: str, timeout: float = 10.0) -> dict[str, Metric]:
    """Metric families on a Prometheus text endpoint, by name (counters without ``_total``)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def scrape_until(
    url: str, done: Callable[[dict[str, Metric]], bool], wait_s: float, every_s: float = 0.5
) -> dict[str, Metric]:
    """Scrape ``url`` until ``done(families)`` or ``wait_s`` have passed; the last scrape.
    (Ray exports metrics every few seconds, so what a request changed shows up late.)"""
    deadline = time.time() + wait_s
    families = scrape(url)
    while not done(families) and time.time() < deadline:
        time.sleep(every_s)
        families = scrape(url)
    return families


def counter_total(families: dict[str, Metric], name: str) -> float:
    """A counter's value summed over replicas and labels (0 while it is not exported)."""
    family = families.get(name)
    return sum(s.value for s in family.samples if s.name.endswith("_total")) if family else 0.0


def bucket_counts(family: Metric, **labels: str) -> dict[float, float]:
    """Cumulative observations per bucket upper bound of a histogram, summed over replicas
    and over the labels not given."""
    buckets: dict[float, float] = {}
    for sample in family.samples:
        if sample.name.endswith("_bucket") and all(
            sample.labels.get(k) == v for k, v in labels.items()
        ):
            bound = float(sample.labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def quantile_of_buckets(buckets: dict[float, float], quantile: float) -> float | None:
    """The upper bound of the bucket holding ``quantile`` of the observations, as
    Prometheus' histogram_quantile would estimate it without interpolation."""
    if not buckets or max(buckets.values()) == 0:
        return None
    total = buckets[max(buckets)]
    return next(bound for bound in sorted(buckets) if buckets[bound] >= quantile * total)


def histogram_quantile(family: Metric, quantile: float, **labels: str) -> float | None:
    """:func:`quantile_of_buckets` of a histogram family (summed over replicas)."""
    return quantile_of_buckets(bucket_counts(family, **labels), quantile)
