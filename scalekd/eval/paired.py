"""Paired comparisons over seeds: two variants run on the same seeds differ by a per-seed amount, and the mean of
those differences, with a Student-t interval, says whether one is better than the other beyond seed noise."""

from __future__ import annotations

import statistics

# Two-sided 95% quantiles of Student's t by degrees of freedom (no scipy in the pinned environment); 1.96 past 30.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}


def paired_differences(ours: list[dict], theirs: list[dict], key: str = "AP_S") -> list[float]:
    """ours minus theirs on ``key``, per seed both ran and both have the metric (COCO gives none for a size no
    validation object has)."""
    by_seed = {r["seed"]: r for r in theirs}
    return [round(r[key] - by_seed[r["seed"]][key], 2) for r in ours
            if key in r and key in by_seed.get(r["seed"], {})]


def paired_interval(diffs: list[float]) -> tuple[float, float] | None:
    """95% interval of the mean of per-seed paired differences (Student's t, n - 1 degrees of freedom).

    None below two seeds: one difference says nothing about the seed-to-seed spread."""
    if len(diffs) < 2:
        return None
    mean = statistics.mean(diffs)
    half = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return mean - half, mean + half


def interval_text(diffs: list[float]) -> str:
    interval = paired_interval(diffs)
    return "-" if interval is None else f"[{interval[0]:+.2f}, {interval[1]:+.2f}]"


def interval_above(diffs: list[float], threshold: float) -> bool:
    """Whether the 95% interval lies above ``threshold`` (one seed has no interval: never)."""
    interval = paired_interval(diffs)
    return interval is not None and interval[0] > threshold
