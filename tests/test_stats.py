"""Wilson and bootstrap intervals against hand-computed values."""

import math

import pytest

from mlx_cai import stats

approx = pytest.approx


def wilson_by_hand(k, n, z=1.959963984540054):
    # The textbook formula, written out separately from the implementation.
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return c - h, c + h


def test_wilson_half():
    # 5/10: published value [0.2366, 0.7634]
    lo, hi = stats.wilson_interval(5, 10)
    assert (lo, hi) == (approx(0.23659, abs=1e-5), approx(0.76341, abs=1e-5))


def test_wilson_zero_successes_is_not_degenerate():
    # 0/10: upper bound z^2 / (n + z^2) = 3.8415 / 13.8415
    lo, hi = stats.wilson_interval(0, 10)
    assert lo == 0.0
    assert hi == approx(3.841459 / 13.841459, abs=1e-6)


def test_wilson_all_successes_mirrors_zero():
    lo, hi = stats.wilson_interval(10, 10)
    assert hi == 1.0
    assert lo == approx(1 - 3.841459 / 13.841459, abs=1e-6)


@pytest.mark.parametrize("k,n,expect", [(1, 4, (0.04559, 0.69936)), (81, 263, None), (3, 138, None)])
def test_wilson_matches_formula(k, n, expect):
    lo, hi = stats.wilson_interval(k, n)
    assert (lo, hi) == (approx(wilson_by_hand(k, n)[0]), approx(wilson_by_hand(k, n)[1]))
    if expect:
        assert (lo, hi) == (approx(expect[0], abs=1e-5), approx(expect[1], abs=1e-5))
    assert lo <= k / n <= hi


def test_wilson_rejects_bad_counts():
    with pytest.raises(ValueError):
        stats.wilson_interval(5, 4)
    with pytest.raises(ValueError):
        stats.wilson_interval(0, 0)


def test_rate_estimate_and_empty():
    e = stats.rate(3, 12)
    assert e.value == 0.25 and e.k == 3 and e.n == 12 and e.method == "wilson"
    assert e.to_dict()["low"] == approx(stats.wilson_interval(3, 12)[0])
    empty = stats.rate(0, 0)
    assert empty.value is None and empty.low is None and empty.n == 0  # no data is not 0%


def test_bootstrap_constant_sample_has_zero_width():
    assert stats.bootstrap_mean_interval([3.0, 3.0, 3.0]) == (3.0, 3.0)


def test_bootstrap_two_points():
    # Means of 2 draws from {0, 1}: 0 w.p. 1/4, 0.5 w.p. 1/2, 1 w.p. 1/4, so the 2.5% and 97.5% points are 0 and 1.
    assert stats.bootstrap_mean_interval([0.0, 1.0], resamples=4000, seed=1) == (0.0, 1.0)


def test_bootstrap_matches_normal_approximation_for_large_sample():
    xs = list(range(100))  # mean 49.5, sd 28.866 -> standard error 2.887 -> 95% half-width 5.66
    lo, hi = stats.bootstrap_mean_interval(xs, seed=0, resamples=4000)
    assert lo == approx(49.5 - 5.66, abs=0.6)
    assert hi == approx(49.5 + 5.66, abs=0.6)


def test_bootstrap_is_seeded():
    xs = [0.1, 0.5, 0.2, 0.9, 0.4, 0.3]
    assert stats.bootstrap_mean_interval(xs, seed=7) == stats.bootstrap_mean_interval(xs, seed=7)
    assert stats.bootstrap_mean_interval(xs, seed=7) != stats.bootstrap_mean_interval(xs, seed=8)


def test_mean_estimate():
    e = stats.mean([1.0, 2.0, 3.0, 6.0], seed=0)
    assert e.value == 3.0 and e.n == 4 and e.method == "bootstrap"
    assert 1.0 <= e.low <= 3.0 <= e.high <= 6.0
    assert stats.mean([]).value is None
