"""Small statistics for the evaluation and the calibration (no SciPy needed).

* :func:`t_interval`: the mean of per-sample scores with its two-sided Student-t confidence
  interval, ``mean +- t_{n-1, (1+level)/2} * sd / sqrt(n)`` (sd with ``n - 1``);
* :func:`paired_gain`: the mean and standard error of the per-sample differences of two
  configurations scored on the same samples (the calibration's acceptance rule);
* :func:`t_quantile`: the Student-t quantile, by bisection on the CDF written with the
  regularised incomplete beta function (Lentz's continued fraction);
* :func:`cluster_paired_gain`, :func:`cluster_bootstrap`: the same for clustered samples (the
  needles of one multi-needle context): a cluster-robust standard error, and a bootstrap interval
  that resamples whole contexts.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Sequence, Tuple

__all__ = ["t_quantile", "t_interval", "paired_gain", "mean_se", "Interval", "cluster_mean", "cluster_paired_gain",
           "cluster_bootstrap"]


class Interval(NamedTuple):
    mean: float
    low: float   # nan when n < 2
    high: float  # nan when n < 2
    n: int


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``0 < p < 1``, ``df > 0``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_se(values: Sequence[float]) -> Tuple[float, float]:
    """(mean, standard error of the mean); the error is nan for fewer than 2 values."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("no values")
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and two-sided ``level`` Student-t interval over the samples (nan bounds for n < 2)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    m, se = mean_se(values)
    n = len(values)
    if n < 2:
        return Interval(m, float("nan"), float("nan"), n)
    half = t_quantile(0.5 + level / 2.0, n - 1) * se
    return Interval(m, m - half, m + half, n)


def paired_gain(candidate: Sequence[float], incumbent: Sequence[float]) -> Tuple[float, float]:
    """(mean, standard error) of ``candidate[i] - incumbent[i]`` over the same samples."""
    if len(candidate) != len(incumbent) or not candidate:
        raise ValueError(f"paired scores need the same non-zero number of samples, got {len(candidate)} "
                         f"and {len(incumbent)}")
    return mean_se([float(c) - float(b) for c, b in zip(candidate, incumbent)])


def _flat(values) -> List[float]:
    return [float(x) for v in values for x in (v if isinstance(v, (list, tuple)) else [v])]


def cluster_mean(values: Sequence) -> float:
    """Mean over every item of ``values``, an item being a float or a list of floats (one cluster)."""
    xs = _flat(values)
    if not xs:
        raise ValueError("no values")
    return sum(xs) / len(xs)


def cluster_paired_gain(candidate: Sequence, incumbent: Sequence) -> Tuple[float, float]:
    """(mean, standard error) of the paired differences when the samples come in clusters (the
    needles of one context are not independent): ``candidate[c]`` and ``incumbent[c]`` are the
    lists of scores of cluster ``c`` (plain floats are clusters of one, which gives
    :func:`paired_gain`). The mean is over all items; the error is the cluster-robust one,
    ``sqrt(C / (C - 1) * sum_c (sum_j (d_cj - mean))^2) / N`` (nan for fewer than 2 clusters)."""
    if len(candidate) != len(incumbent) or not candidate:
        raise ValueError(f"paired scores need the same non-zero number of clusters, got {len(candidate)} "
                         f"and {len(incumbent)}")
    diffs = []
    for c, b in zip(candidate, incumbent):
        c = list(c) if isinstance(c, (list, tuple)) else [c]
        b = list(b) if isinstance(b, (list, tuple)) else [b]
        if len(c) != len(b) or not c:
            raise ValueError(f"a cluster has {len(c)} candidate and {len(b)} incumbent scores")
        diffs.append([float(x) - float(y) for x, y in zip(c, b)])
    n = sum(len(d) for d in diffs)
    m = sum(map(sum, diffs)) / n
    k = len(diffs)
    if k < 2:
        return m, float("nan")
    ss = sum(sum(x - m for x in d) ** 2 for d in diffs)
    return m, math.sqrt(k / (k - 1) * ss) / n


def cluster_bootstrap(values: Sequence[Sequence[float]], level: float = 0.95, reps: int = 2000,
                      seed: int = 0) -> Interval:
    """Mean over all items and a percentile bootstrap interval that resamples whole clusters
    (contexts), ``values[c]`` being the scores of cluster ``c``. Nan bounds for fewer than 3
    clusters: two clusters give a bootstrap distribution of three values, an interval far too
    narrow to report."""
    import random

    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    clusters = [[float(x) for x in (v if isinstance(v, (list, tuple)) else [v])] for v in values]
    m = cluster_mean(clusters)
    n = sum(map(len, clusters))
    if len(clusters) < 3:
        return Interval(m, float("nan"), float("nan"), n)
    rng = random.Random(seed)
    sums = [(sum(c), len(c)) for c in clusters]
    stats = []
    for _ in range(reps):
        pick = [sums[rng.randrange(len(sums))] for _ in sums]
        stats.append(sum(s for s, _ in pick) / sum(k for _, k in pick))
    stats.sort()
    lo = stats[int(math.floor((1 - level) / 2 * (reps - 1)))]
    hi = stats[int(math.ceil((1 + level) / 2 * (reps - 1)))]
    return Interval(m, lo, hi, n)
