"""Seed statistics for the ablation report: mean ± std over seeds, and the paired difference to the baseline.

A run's score moves by several AP points with the seed alone when models train from scratch on little
data, while the paper's gains are 0.2-1.7 AP. So the report compares each ablation with the baseline on
the *same* seeds: d_s = AP(ablation, s) - AP(baseline, s), and gives mean(d) with a 95% t-interval over
the seeds, mean(d) ± t(0.975, n-1) · sd(d) / √n. Pairing removes what the two runs of one seed share (the
data order, the initialisation of the shared parts), so the interval is narrower than one built from
two independent means. An interval that contains 0 is "not significant" at the 5% level.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values and its two-sided 95% t-interval (None when n < 2)."""

    n: int
    mean: float
    low: float | None = None
    high: float | None = None

    @property
    def significant(self) -> bool | None:
        """True when the interval excludes 0; None when there is no interval."""
        if self.low is None or self.high is None:
            return None
        return self.low > 0 or self.high < 0


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def mean_interval(values: list[float]) -> Interval:
    """The mean of ``values`` with its t-interval."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(n, mean)
    half = t_quantile(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(n, mean, mean - half, mean + half)


def paired_difference(values: Mapping[int, float], baseline: Mapping[int, float]) -> Interval | None:
    """Mean of ``values[s] - baseline[s]`` over the seeds both have, with its t-interval; None if none."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return None
    return mean_interval([values[s] - baseline[s] for s in seeds])
