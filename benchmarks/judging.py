"""Figures measured in interleaved rounds, and targets judged on them; shared by every bench.

A bench measures in rounds (every contender once per round, the rounds one after the other) so
that the machine's drift hits every contender alike. A figure is reported per round and as the
median and the range (min..max) over the rounds, and a target is met only when the whole range
clears its threshold: a median that clears it while one round does not is not enough.
"""

from __future__ import annotations

import numpy as np

MIN_ROUNDS = 3  # a target's values from fewer rounds are reported, but not judged met or not


def spread(values: list[float]) -> dict:
    """Median and range (min..max) of per-round values, and the values themselves."""
    values = [float(v) for v in values]
    if not values:
        return {"per_round": [], "median": None, "min": None, "max": None}
    return {
        "per_round": values,
        "median": float(np.median(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
    }


def clears(spread_: dict, threshold: float, higher_is_better: bool, inclusive: bool = True) -> bool:
    """Whether the whole range of a :func:`spread` clears ``threshold``: its min ``>=`` the
    threshold where higher is better, its max ``<=`` where lower is (``>`` and ``<`` with
    ``inclusive=False``)."""
    if higher_is_better:
        low = spread_["min"]
        return bool(low >= threshold if inclusive else low > threshold)
    high = spread_["max"]
    return bool(high <= threshold if inclusive else high < threshold)


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, nan where the denominator is 0 (nothing measured)."""
    return numerator / denominator if denominator else float("nan")


def ratio_target(
    name: str,
    per_round_ratios: list[float],
    threshold: float,
    higher_is_better: bool,
    *,
    inclusive: bool = True,
    unit: str = "x",
    detail: str = "",
) -> dict:
    """One row of a targets table: the per-round values' :func:`spread`, and ``met``: whether
    the whole range :func:`clears` ``threshold``. ``met`` is None, not judged, from fewer than
    :data:`MIN_ROUNDS` rounds or when a round measured nothing (a value that is nan or
    infinite). ``unit``: "x" or "%" (how a report prints the values)."""
    row = {
        "target": name,
        "threshold": threshold,
        "higher_is_better": higher_is_better,
        "inclusive": inclusive,
        "unit": unit,
        "detail": detail,
        "rounds": len(per_round_ratios),
        **spread(per_round_ratios),
        "met": None,
    }
    if row["rounds"] < MIN_ROUNDS or not all(np.isfinite(row["per_round"])):
        return row
    row["met"] = clears(row, threshold, higher_is_better, inclusive)
    return row


def runs_by_round(runs: list[dict], **fields: object) -> dict[int, dict]:
    """Of the runs whose fields equal ``fields``, the first of each round, by round number."""
    found: dict[int, dict] = {}
    for run in runs:
        if all(run.get(key) == value for key, value in fields.items()):
            found.setdefault(run["round"], run)
    return dict(sorted(found.items()))
