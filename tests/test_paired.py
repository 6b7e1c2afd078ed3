"""Paired comparison of two classifiers on the same texts (llm_lightning.measure.paired), against
hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm_lightning.measure.paired import agreement, compare, mcnemar_exact, paired_bootstrap

# Ten texts: 0-2 both right, 3 both wrong (the same wrong label), 4 only A right, 5-9 only B right.
LABELS = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
A_PRED = [0, 1, 0, 0, 0, 0, 1, 0, 1, 0]
B_PRED = [0, 1, 0, 0, 1, 1, 0, 1, 0, 1]


def outcomes(only_a: int, only_b: int, both: int = 0, neither: int = 0) -> tuple[list[bool], list[bool]]:
    """Per-text correctness of A and B with the given counts of each kind of text."""
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    return a, b


def test_compare_on_the_fixed_example_matches_the_hand_computation():
    got = compare(LABELS, A_PRED, B_PRED, rounds=2000)
    # acc A = 4/10 (texts 0, 1, 2, 4), acc B = 8/10 (texts 0-2, 5-9): B - A = 0.4
    assert got["acc_diff"] == pytest.approx(0.4)
    assert got["discordant_a_right"] == 1 and got["discordant_b_right"] == 5 and got["n"] == 10
    # discordant n = 1 + 5 = 6, min = 1: p = 2 (C(6,0) + C(6,1)) / 2^6 = 2 (1 + 6) / 64 = 0.21875
    assert got["mcnemar_p"] == pytest.approx(0.21875, abs=1e-15)
    # identical predictions on texts 0-3 (text 3: both say 0): 4/10
    assert got["agreement"] == pytest.approx(0.4)
    assert got["acc_diff_low"] <= 0.4 <= got["acc_diff_high"]


@pytest.mark.parametrize(
    ("only_a", "only_b", "expected"),
    [
        (1, 5, 2 * (1 + 6) / 2**6),  # 0.21875
        (5, 1, 2 * (1 + 6) / 2**6),  # symmetric in A and B
        (0, 7, 2 * 1 / 2**7),  # 0.015625: all 7 discordant texts favour B
        (2, 8, 2 * (1 + 10 + 45) / 2**10),  # 0.109375
        (3, 3, 1.0),  # 2 (1 + 6 + 15 + 20) / 64 = 84/64 > 1, capped
        (0, 0, 1.0),  # nothing discordant: no evidence either way
    ],
)
def test_mcnemar_exact_by_hand(only_a, only_b, expected):
    a, b = outcomes(only_a, only_b, both=4, neither=2)  # concordant texts do not count
    assert mcnemar_exact(a, b) == pytest.approx(expected, abs=1e-15)


def test_mcnemar_exact_at_twenty_five_thousand_texts():
    """2^24,500 overflows a float: the exact integer sum must still give the binomial tail, here
    against a log-space sum of the same terms."""
    only_a, only_b = 12_000, 12_500
    a, b = outcomes(only_a, only_b, both=500)
    n, k = only_a + only_b, min(only_a, only_b)
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
        for i in range(k + 1)
    ]
    top = max(log_terms)
    reference = 2 * math.exp(top) * math.fsum(math.exp(t - top) for t in log_terms)
    p = mcnemar_exact(a, b)
    assert p == pytest.approx(reference, rel=1e-8)
    assert 1e-3 < p < 2e-3  # a 500-text gap out of 24,500 discordant: significant, not absurdly so


def test_bootstrap_of_identical_models_is_zero():
    a, _ = outcomes(0, 0, both=30, neither=10)
    assert paired_bootstrap(a, a, rounds=500) == (0.0, 0.0, 0.0)


def test_bootstrap_interval_excludes_zero_for_a_clear_gain_and_matches_the_normal_width():
    # 200 texts: B alone right on 30, A alone on 2: diff = 28/200 = 0.14. Per text the difference
    # is +1, -1 or 0, variance 32/200 - 0.14^2 = 0.1404; sd of the mean sqrt(0.1404/200) = 0.0265,
    # so the 95% interval is about 0.14 -+ 1.96 * 0.0265 = [0.088, 0.192].
    a, b = outcomes(2, 30, both=150, neither=18)
    diff, low, high = paired_bootstrap(a, b, rounds=10_000, seed=1)
    assert diff == pytest.approx(0.14)
    assert low > 0
    assert low == pytest.approx(0.088, abs=0.01) and high == pytest.approx(0.192, abs=0.01)


def test_bootstrap_interval_holds_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(7)
    a, b = rng.random(854) < 0.86, rng.random(854) < 0.85
    diff, low, high = paired_bootstrap(a, b, rounds=3000, seed=5)
    assert diff == pytest.approx(b.mean() - a.mean())
    assert low < diff < high
    assert paired_bootstrap(a, b, rounds=3000, seed=5) == (diff, low, high)
    assert paired_bootstrap(a, b, rounds=3000, seed=6) != (diff, low, high)
    # the same resampled texts for both: swapping A and B mirrors the interval exactly
    swapped = paired_bootstrap(b, a, rounds=3000, seed=5)
    assert swapped == pytest.approx((-diff, -high, -low))


def test_bootstrap_in_chunks_covers_every_round():
    """More rounds than one chunk of resampled indices holds (4M / 25,000 texts = 160 rounds):
    an interval from unfilled rounds would be garbage."""
    a, b = outcomes(1000, 1300, both=21_000, neither=1700)  # 25,000 texts, diff +300/25,000 = 0.012
    diff, low, high = paired_bootstrap(a, b, rounds=400, seed=0)
    # sd sqrt((2300/25,000 - 0.012^2) / 25,000) = 0.0019: the interval is 0.012 -+ 0.0038
    assert diff == pytest.approx(0.012)
    assert low == pytest.approx(0.0082, abs=0.0012) and high == pytest.approx(0.0158, abs=0.0012)


def test_agreement_counts_identical_predictions_not_identical_correctness():
    # text 1: both wrong, with different labels: correctness agrees, predictions do not
    assert agreement([0, 2, 1, 1], [0, 0, 1, 2]) == pytest.approx(0.5)
    got = compare([0, 1, 1, 1], [0, 2, 1, 1], [0, 0, 1, 2], rounds=100)
    assert got["agreement"] == pytest.approx(0.5) and got["discordant_a_right"] == 1


def test_texts_that_do_not_pair_are_an_error():
    with pytest.raises(ValueError, match=r"same texts: lengths \(10,\) and \(9,\) differ"):
        compare(LABELS, A_PRED, B_PRED[:9])
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap([], [])
