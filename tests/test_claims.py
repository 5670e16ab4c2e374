"""Intervals and verdicts of the demo's claims table, against published values and by simulation."""

import numpy as np
import pytest

from transformers_bard.demo.claims import paired_difference_interval, verdict, wilson_interval


def _table(a, b, c, d):
    """Per-row correctness of two models from a 2 x 2 table: a both right, b first only, c second only, d neither."""
    first = [True] * a + [True] * b + [False] * c + [False] * d
    second = [True] * a + [False] * b + [True] * c + [False] * d
    return first, second


@pytest.mark.parametrize(
    "successes, total, expected",
    [
        # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3 (Wilson).
        (81, 263, (0.2553, 0.3662)),
        (15, 148, (0.0624, 0.1605)),
        (0, 20, (0.0, 0.1611)),
        (1, 29, (0.0061, 0.1718)),
        # All right: the upper limit is 1 and the lower one is not (a Wald interval would give [1, 1]).
        (10, 10, (0.7225, 1.0)),
    ],
)
def test_wilson_interval_published_values(successes, total, expected):
    lo, hi = wilson_interval(successes, total)
    assert lo == pytest.approx(expected[0], abs=5e-5)
    assert hi == pytest.approx(expected[1], abs=5e-5)


def test_wilson_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for successes, total in [(0, 7), (3, 7), (99, 100), (400, 400), (250, 401)]:
        reference = stats.binomtest(successes, total).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(successes, total) == pytest.approx((reference.low, reference.high), abs=1e-9)


def test_wilson_interval_bad_input():
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="total"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(True, 4)


def test_paired_interval_published_value():
    # Newcombe (1998), "Improved confidence intervals for the difference between binomial proportions based on paired
    # data", Table II, example (a): a = 36, b = 12, c = 2, d = 0; method 10 gives +0.0569 to +0.3404.
    result = paired_difference_interval(*_table(36, 12, 2, 0))
    assert result["difference"] == pytest.approx(0.2)
    assert result["ci95"] == pytest.approx([0.0569, 0.3404], abs=5e-5)
    assert (result["first_only"], result["second_only"], result["num_samples"]) == (12, 2, 50)


def test_paired_interval_is_antisymmetric_and_uses_the_pairing():
    first, second = _table(30, 9, 3, 8)
    forward = paired_difference_interval(first, second)
    backward = paired_difference_interval(second, first)
    assert backward["ci95"] == pytest.approx([-forward["ci95"][1], -forward["ci95"][0]])
    # The same marginal accuracies with the rows shuffled independently (no pairing left) give a wider interval:
    # agreement between the two models is information.
    rng = np.random.default_rng(0)
    unpaired = paired_difference_interval(list(rng.permutation(first)), list(rng.permutation(second)))
    assert unpaired["difference"] == pytest.approx(forward["difference"])
    width = forward["ci95"][1] - forward["ci95"][0]
    assert unpaired["ci95"][1] - unpaired["ci95"][0] > width


def test_paired_interval_identical_models():
    # Same answers everywhere: the difference is 0 and its interval contains 0 (it does not collapse to a point).
    result = paired_difference_interval(*_table(97, 0, 0, 3))
    lo, hi = result["ci95"]
    assert result["difference"] == 0.0 and lo < 0.0 < hi and hi - lo < 0.08


def test_paired_interval_coverage_by_simulation():
    # 95% intervals should cover the true difference about 95% of the time. Correlated pairs: model 2 is right with
    # p2 = 0.9, model 1 copies it 80% of the time and is otherwise right with probability 0.95.
    rng = np.random.default_rng(1234)
    n, trials, covered = 100, 1000, 0
    true_p1 = 0.8 * 0.9 + 0.2 * 0.95
    for _ in range(trials):
        second = rng.random(n) < 0.9
        copy = rng.random(n) < 0.8
        first = np.where(copy, second, rng.random(n) < 0.95)
        lo, hi = paired_difference_interval(first.tolist(), second.tolist())["ci95"]
        covered += lo <= true_p1 - 0.9 <= hi
    assert 0.925 <= covered / trials <= 0.985


def test_paired_interval_bad_input():
    with pytest.raises(ValueError, match="same non-empty"):
        paired_difference_interval([True], [True, False])
    with pytest.raises(ValueError, match="same non-empty"):
        paired_difference_interval([], [])


@pytest.mark.parametrize(
    "ci95, margin, expected",
    [
        ([0.01, 0.2], 0.0, "holds"),
        ([-0.2, -0.01], 0.0, "does not hold"),
        ([-0.05, 0.1], 0.0, "cannot tell"),
        ([0.0, 0.1], 0.0, "cannot tell"),  # the interval touches 0: no evidence of a gain
        # non-inferiority: at most 0.02 worse
        ([-0.015, 0.01], 0.02, "holds"),
        ([-0.08, -0.03], 0.02, "does not hold"),
        ([-0.03, 0.01], 0.02, "cannot tell"),
    ],
)
def test_verdict(ci95, margin, expected):
    assert verdict(ci95, margin) == expected


def test_verdict_bad_input():
    with pytest.raises(ValueError, match="ci95"):
        verdict([0.2, 0.1])
    with pytest.raises(ValueError, match="margin"):
        verdict([0.1, 0.2], margin=-0.1)


def test_paired_mean_difference_by_hand_and_pairing():
    """Differences 1, 2, 3: mean 2, s = 1, half-width 1.96 / sqrt(3). Pairing matters: the same two columns with a
    constant difference have s = 0 (a point interval), shuffled they do not."""
    from transformers_bard.demo.claims import Z95, paired_mean_difference_interval

    out = paired_mean_difference_interval([3, 5, 7], [2, 3, 4])
    assert out["difference"] == pytest.approx(2.0) and out["sd"] == pytest.approx(1.0)
    assert out["ci95"] == pytest.approx([2 - Z95 / 3**0.5, 2 + Z95 / 3**0.5])
    assert paired_mean_difference_interval([5, 6, 7, 8], [4, 5, 6, 7])["ci95"] == pytest.approx([1.0, 1.0])
    assert paired_mean_difference_interval([5, 6, 7, 8], [7, 4, 6, 5])["sd"] > 1.0
    with pytest.raises(ValueError, match="same rows"):
        paired_mean_difference_interval([1, 2], [1])


def test_paired_mean_difference_coverage_by_simulation():
    """Rows with a true mean difference of 0.5 forwards: the 95% interval covers it in about 95% of 2000 draws of 400
    rows (normal approximation; the counts are skewed like forwards per answer)."""
    import random

    from transformers_bard.demo.claims import paired_mean_difference_interval

    rng = random.Random(0)
    covered = 0
    for _ in range(2000):
        second = [rng.choice([1, 2, 2, 3, 6]) for _ in range(400)]
        first = [value + (1 if rng.random() < 0.5 else 0) for value in second]
        lo, hi = paired_mean_difference_interval(first, second)["ci95"]
        covered += lo <= 0.5 <= hi
    assert 0.93 <= covered / 2000 <= 0.97
