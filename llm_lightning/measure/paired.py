"""Two classifiers scored on the same texts, compared text by text.

Accuracies of two models measured on the same 854 test texts are not independent samples: most
texts are right (or wrong) for both, and only the texts where they disagree say which is better.
Comparing the two accuracies as if independent makes small differences look like noise and hides
real ones; pairing uses the per-text outcomes.

- `mcnemar_exact`: exact two-sided McNemar test on the discordant texts.
- `paired_bootstrap`: the accuracy difference with a percentile interval, resampling texts (the
  same resampled texts for both models).
- `agreement`: share of texts where both models predict the same label.
- `compare`: all of them from labels and the two models' predictions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# resampled indices held at once (int32): 10,000 rounds x 25,000 texts would be 1 GB in one go
_CHUNK_ELEMENTS = 4_000_000


def _as_bools(name: str, values: Sequence[bool] | np.ndarray) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {array.shape}.")
    return array.astype(bool)


def _paired(a, b, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must score the same texts: lengths {a.shape} and {b.shape} differ."
        )
    return a, b


def discordant(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> tuple[int, int]:
    """(texts only A gets right, texts only B gets right)."""
    a, b = _paired(_as_bools("a_correct", a_correct), _as_bools("b_correct", b_correct), ("a", "b"))
    return int(np.sum(a & ~b)), int(np.sum(~a & b))


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value: under "both models equally good" each of the n = b + c
    discordant texts is equally likely to favour either, so min(b, c) ~ Binomial(n, 1/2) and
    p = min(1, 2 P(X <= min(b, c))). 1.0 when no text is discordant.

    Exact in integers, then one correctly rounded division: fine for n in the tens of thousands,
    where 2^n overflows a float but not a Python int. The binomial coefficients are built one from
    the last (C(n, i+1) = C(n, i) (n - i) / (i + 1), exact): a fresh math.comb per term took
    minutes at n = 24,500.
    """
    only_a, only_b = discordant(a_correct, b_correct)
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    term = tail = 1  # C(n, 0)
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n)


def paired_bootstrap(
    a_correct: Sequence[bool],
    b_correct: Sequence[bool],
    rounds: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Accuracy of B minus accuracy of A (accuracy units, e.g. -0.0105) and its percentile interval.

    Each round draws n text indices with replacement, the same indices for both models, and takes
    the difference of the two accuracies on them; the interval is the (1 - level)/2 and
    (1 + level)/2 quantiles of the `rounds` differences. Seeded: the same inputs give the same
    interval.

    Returns:
        (diff, low, high): the difference on all texts and the interval's ends.
    """
    a, b = _paired(_as_bools("a_correct", a_correct), _as_bools("b_correct", b_correct), ("a", "b"))
    if rounds < 1 or not 0 < level < 1:
        raise ValueError(f"rounds={rounds} must be >= 1 and level={level} strictly between 0 and 1.")
    # per text +1 (only B right), -1 (only A right), 0: a resample's accuracy difference is its mean
    per_text = b.astype(np.int8) - a.astype(np.int8)
    n = per_text.size
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    diffs = np.empty(rounds)
    for start in range(0, rounds, chunk):
        size = min(chunk, rounds - start)
        idx = rng.integers(0, n, size=(size, n), dtype=np.int32)
        diffs[start : start + size] = per_text[idx].sum(axis=1, dtype=np.int64) / n
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(per_text.mean()), float(low), float(high)


def agreement(a_pred: Sequence[int], b_pred: Sequence[int]) -> float:
    """Share of texts where both models predict the same label."""
    a, b = _paired(a_pred, b_pred, ("a_pred", "b_pred"))
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"predictions must be non-empty 1-D sequences, got shape {a.shape}.")
    return float(np.mean(a == b))


def compare(
    labels: Sequence[int],
    a_pred: Sequence[int],
    b_pred: Sequence[int],
    rounds: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Model B against model A on the same texts.

    Returns:
        `acc_diff` (B - A, accuracy units) with `acc_diff_low`/`acc_diff_high` (its `level`
        paired bootstrap interval), `mcnemar_p`, `agreement`, `discordant_a_right` /
        `discordant_b_right` (texts only A / only B gets right) and `n` (texts).
    """
    target, a = _paired(labels, a_pred, ("labels", "a_pred"))
    target, b = _paired(target, b_pred, ("labels", "b_pred"))
    a_correct, b_correct = a == target, b == target
    diff, low, high = paired_bootstrap(a_correct, b_correct, rounds, seed, level)
    only_a, only_b = discordant(a_correct, b_correct)
    return {
        "acc_diff": diff,
        "acc_diff_low": low,
        "acc_diff_high": high,
        "mcnemar_p": mcnemar_exact(a_correct, b_correct),
        "agreement": agreement(a, b),
        "discordant_a_right": only_a,
        "discordant_b_right": only_b,
        "n": int(target.size),
    }
