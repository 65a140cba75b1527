"""The targets of ``freemerge bench load``, judged on a result's rounds.

A server target's ratio is taken per round, the contenders of the same round paired (merged
round k against separate round k), and judged as a :func:`judging.ratio_target
<freemerge.benchmarks.judging.ratio_target>`; the expert-apply target reads the costs'
per-round shares.
"""

from __future__ import annotations

import numpy as np

from freemerge.benchmarks.judging import ratio, ratio_target, runs_by_round
from freemerge.benchmarks.load import closed_loop
from freemerge.benchmarks.memory import replica_weights
from freemerge.benchmarks.tables import with_unit


def targets(result: dict) -> list[dict]:
    """The targets, each a :func:`ratio_target` row from the rounds of ``result``."""
    by_key = {contender["key"]: contender for contender in result["contenders"]}
    merged, rounds = by_key["merged"], result["plan"]["rounds"]
    uniform = closed_loop(result["plan"]["mix_concurrency"], "uniform")
    return [
        _memory_target(merged, by_key["floor"]),
        _throughput_target(
            "throughput >= the all-loaded separate models (uniform mix)",
            _paired(merged, by_key["separate"], uniform, rounds),
            1.0,
        ),
        _throughput_target(
            "throughput >= 3x the thrashing multiplexed setup (uniform mix)",
            _paired(merged, by_key["multiplexed"], uniform, rounds),
            3.0,
        ),
        _p50_target(_paired(merged, by_key["floor"], closed_loop(1, "identical"), rounds)),
        apply_target(result["costs"]["batch_1"]),
    ]


def _paired(a: dict, b: dict, scenario: dict, rounds: int) -> list[tuple[dict, dict]]:
    """(a's run, b's run) of ``scenario`` per round, for the rounds where both have one."""
    first, second = runs_by_round(a["runs"], **scenario), runs_by_round(b["runs"], **scenario)
    return [(first[k], second[k]) for k in range(1, rounds + 1) if k in first and k in second]


def _memory_target(merged: dict, floor: dict) -> dict:
    pairs = list(zip(merged["memory_rounds"], floor["memory_rounds"], strict=False))
    resident = [ratio(m["process_resident_bytes"], f["process_resident_bytes"]) for m, f in pairs]
    return ratio_target(
        "replica memory for all tasks <= 1.15x one model (weights)",
        [ratio(replica_weights(m), f["backbone_bytes"]) for m, f in pairs],
        1.15,
        higher_is_better=False,
        detail=f"resident memory {_median(resident, '.2f')}x",
    )


def _throughput_target(name: str, pairs: list[tuple[dict, dict]], threshold: float) -> dict:
    detail = (
        f"{_median([a['throughput_rps'] for a, _ in pairs], '.1f')} vs "
        f"{_median([b['throughput_rps'] for _, b in pairs], '.1f')} req/s"
    )
    loads = sum(b["server"]["model_loads"] for _, b in pairs)
    if loads:
        detail += f"; {loads} model loads in {sum(b['requests'] for _, b in pairs)} requests"
    return ratio_target(
        name,
        [ratio(a["throughput_rps"], b["throughput_rps"]) for a, b in pairs],
        threshold,
        higher_is_better=True,
        detail=detail,
    )


def _p50_target(pairs: list[tuple[dict, dict]]) -> dict:
    return ratio_target(
        "tagged p50 within 1.10x of one plain model (concurrency 1)",
        [ratio(a["p50_ms"], b["p50_ms"]) for a, b in pairs],
        1.10,
        higher_is_better=False,
        detail=f"{_median([a['p50_ms'] for a, _ in pairs], '.1f')} vs "
        f"{_median([b['p50_ms'] for _, b in pairs], '.1f')} ms",
    )


def apply_target(batch_1: dict) -> dict:
    """Row adapters where the server uses them (their extra over a plain forward), else the
    expert applied in place and restored; read from the costs, as the costs table is."""
    in_place = batch_1["apply_share_of_forward"]
    if "row_adapter_share_of_forward" in batch_1:
        shares = batch_1["row_adapter_share_of_forward"]["per_round"]
        detail = (
            "row adapters (the served path); in place + restore (sparse path): "
            f"{with_unit(in_place['median'], '%')}"
        )
    else:
        shares, detail = in_place["per_round"], "in place + restore"
    return ratio_target(
        "expert apply (+ restore) < 5% of a batch-1 forward",
        shares,
        0.05,
        higher_is_better=False,
        inclusive=False,
        unit="%",
        detail=detail,
    )


def _median(values: list[float], spec: str) -> str:
    return format(float(np.median(values)), spec) if values else "-"
