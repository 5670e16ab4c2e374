"""Confidence intervals and verdicts for the demo's accuracy table and the paper's claims.

Every accuracy is an exact-match proportion over the same test rows, so two models are compared on paired data: row i
is scored by both. The functions here are pure (lists of booleans in, numbers out) and small enough to check by hand.

- `wilson_interval`: the Wilson score interval of one proportion (Wilson 1927; method 3 of Newcombe 1998, "Two-sided
  confidence intervals for the single proportion"). Unlike the normal (Wald) interval it stays inside [0, 1] and does
  not collapse to a point at 0 or 1 correct, which matters here: a good model scores 100/100 on a question type.
- `paired_difference_interval`: the difference of two paired proportions with Newcombe's hybrid score interval
  (method 10 of Newcombe 1998, "Improving the confidence intervals for the difference between binomial proportions
  based on paired data", Statistics in Medicine 17:2635). It combines the two Wilson intervals with the phi
  correlation of the 2 x 2 table of agreements, so identical answers on most rows narrow the interval as they should.
- `paired_mean_difference_interval`: the mean of per-row differences of a count (e.g. verified forwards per answer,
  where every verified model gives the AR source's answer, so exact match cannot separate them) with the normal
  interval of that mean (mean +- z sd / sqrt(n)); fine at the demo's 400 rows.
- `verdict`: `holds` / `does not hold` / `cannot tell` from that interval and a margin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["Z95", "paired_difference_interval", "paired_mean_difference_interval", "verdict", "wilson_interval"]

# Two-sided 95% standard normal quantile.
Z95 = 1.959963984540054


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")


def wilson_interval(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval `(lo, hi)` of a proportion `successes / total` (95% by default).

    With p = k / n: centre `(p + z^2 / 2n) / (1 + z^2 / n)`, half-width `z sqrt(p (1 - p) / n + z^2 / 4n^2) /
    (1 + z^2 / n)`. Example: 0 of 20 gives (0, 0.1611).
    """
    _check_count("successes", successes)
    _check_count("total", total)
    if total == 0 or successes > total:
        raise ValueError(f"Need 0 <= successes <= total and total >= 1, got successes={successes}, total={total}.")
    p, n = successes / total, total
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # Clamp rounding at the ends: at k = 0 (k = n) the lower (upper) limit is exactly 0 (1).
    return (0.0 if successes == 0 else max(0.0, centre - half), 1.0 if successes == total else min(1.0, centre + half))


def paired_difference_interval(first: Sequence[bool], second: Sequence[bool], z: float = Z95) -> dict:
    """The difference `accuracy(first) - accuracy(second)` over the same rows, with Newcombe's hybrid score interval.

    Args:
        first, second: per-row correctness of the two models, row i of both on the same test sample.

    Returns:
        `{"difference", "ci95": [lo, hi], "first_only": b, "second_only": c, "num_samples": n}` where b (c) counts
        the rows only the first (second) model got right. With the 2 x 2 table a (both right), b, c, d (both wrong),
        p1 = (a + b) / n, p2 = (a + c) / n, Wilson intervals (l1, u1) and (l2, u2), and phi = (ad - bc) /
        sqrt((a + b)(c + d)(a + c)(b + d)) (0 when a margin is empty):
        lo = (p1 - p2) - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2),
        hi = (p1 - p2) + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2).
    """
    if len(first) != len(second) or not first:
        raise ValueError(
            f"`first` and `second` must score the same non-empty list of rows, got {len(first)} and {len(second)} rows."
        )
    n = len(first)
    a = sum(1 for x, y in zip(first, second) if x and y)
    b = sum(1 for x, y in zip(first, second) if x and not y)
    c = sum(1 for x, y in zip(first, second) if y and not x)
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(margins) if margins > 0 else 0.0
    # max(0, .): the radicands are sums of squares minus a cross term bounded by them; guard rounding only.
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    epsilon = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    difference = p1 - p2
    return {
        "difference": difference,
        "ci95": [max(-1.0, difference - delta), min(1.0, difference + epsilon)],
        "first_only": b,
        "second_only": c,
        "num_samples": n,
    }


def paired_mean_difference_interval(first: Sequence[float], second: Sequence[float], z: float = Z95) -> dict:
    """The mean of `first[i] - second[i]` over the same rows, with the normal interval `mean +- z s / sqrt(n)` (s: the
    sample standard deviation of the differences, n - 1 in its denominator).

    Returns `{"difference", "ci95": [lo, hi], "num_samples": n, "sd": s}`. Example: differences 1, 2, 3 give mean 2,
    s = 1, interval 2 -+ 1.96 / sqrt(3).
    """
    if len(first) != len(second) or len(first) < 2:
        raise ValueError(
            f"`first` and `second` must give the same rows, at least 2, got {len(first)} and {len(second)} rows."
        )
    differences = [float(x) - float(y) for x, y in zip(first, second)]
    n = len(differences)
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = z * sd / math.sqrt(n)
    return {"difference": mean, "ci95": [mean - half, mean + half], "num_samples": n, "sd": sd}


def verdict(ci95: Sequence[float], margin: float = 0.0) -> str:
    """`holds` when the whole interval of `first - second` lies above `-margin`, `does not hold` when it lies below,
    `cannot tell` when it straddles `-margin`.

    margin 0 judges "first beats second" (the interval must exclude 0 on the positive side). A positive margin judges
    "first is at most `margin` worse" (non-inferiority): e.g. keeping 98% of an accuracy A is margin 0.02 A.
    """
    lo, hi = ci95
    if not lo <= hi or margin < 0:
        raise ValueError(f"`ci95` must be [lo, hi] with lo <= hi and `margin` >= 0, got {ci95!r} and {margin!r}.")
    if lo > -margin:
        return "holds"
    if hi < -margin:
        return "does not hold"
    return "cannot tell"
