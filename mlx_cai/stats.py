"""95% intervals for evaluation metrics: Wilson score intervals for rates, seeded percentile bootstrap for means.

Pure functions (no IO). An estimate over nothing (n = 0) has value, low and high None, so JSON stays valid and
"no data" never reads as 0%.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Estimate:
    """A metric value with its 95% interval. `k` is the count of successes for rates."""

    value: float | None
    low: float | None
    high: float | None
    n: int
    k: int | None = None
    method: str = "wilson"  # "wilson" | "bootstrap" | "none" (point value only)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("value", "low", "high")}


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials. Unlike the normal approximation it stays inside
    [0, 1] and is not degenerate at k = 0 or k = n (0/10 -> [0, 0.278])."""
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    if not 0 <= k <= n:
        raise ValueError(f"k={k} is not within 0..n={n}")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At k = 0 or k = n the bound is exactly 0 or 1; set it so rounding does not show 99.99...%.
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)
    return lo, hi


def rate(k: int, n: int) -> Estimate:
    """k / n with its Wilson 95% interval."""
    if n == 0:
        return Estimate(None, None, None, 0, 0)
    lo, hi = wilson_interval(k, n)
    return Estimate(k / n, lo, hi, n, k)


def bootstrap_mean_interval(xs: Sequence[float], *, seed: int = 0, resamples: int = 2000,
                            level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample xs with replacement `resamples` times (seeded),
    take the (1-level)/2 and (1+level)/2 quantiles of the resampled means."""
    x = np.asarray(xs, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)  # (resamples,)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def mean(xs: Sequence[float], *, seed: int = 0, resamples: int = 2000) -> Estimate:
    """Mean of xs with its seeded percentile-bootstrap 95% interval."""
    if len(xs) == 0:
        return Estimate(None, None, None, 0, method="bootstrap")
    lo, hi = bootstrap_mean_interval(xs, seed=seed, resamples=resamples)
    return Estimate(float(np.mean(np.asarray(xs, dtype=np.float64))), lo, hi, len(xs), method="bootstrap")


def point(value: float, n: int) -> Estimate:
    """A value without an interval (pooled corpus statistics such as distinct-n)."""
    return Estimate(value, None, None, n, method="none")
