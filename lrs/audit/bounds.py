"""Lower bounds on epsilon from a distinguishing test, with exact binomial
(Clopper-Pearson) confidence.

An (epsilon, delta)-DP mechanism M and any test "score(M(D)) >= threshold"
satisfy, for neighbouring D' (the canary in) and D (out),

    TPR <= e^eps FPR + delta      and      1 - FPR <= e^eps (1 - TPR) + delta,

with TPR = P[score(M(D')) >= threshold] and FPR = P[score(M(D)) >= threshold].
A one-sided lower confidence bound on TPR and an upper one on FPR, each at
level (1 - confidence) / 2, turn these into a lower bound on epsilon that holds
with probability at least ``confidence`` -- provided the threshold was chosen
on trials not used for the bound. :func:`epsilon_lower_bound` chooses it on a
``selection_fraction`` of the trials and bounds on the rest.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.stats

ALTERNATIVES = ("two-sided", "lower", "upper")

#: Level of the one-sided Clopper-Pearson bounds with which the threshold is
#: chosen on the selection trials. Stricter than the reporting level, it
#: prefers thresholds with enough counts to hold up on fresh trials (a far-tail
#: threshold chosen on few counts regresses on the evaluation half). Any level
#: keeps the bound valid: the evaluation trials are fresh.
SELECTION_LEVEL = 0.99999


def _check_confidence(confidence) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, int | float):
        raise ValueError(f"confidence must be a number in (0, 1); got {confidence!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1); got {confidence!r}")
    return float(confidence)


def _check_counts(successes, trials):
    successes = np.asarray(successes)
    trials = np.asarray(trials)
    for name, value in (("successes", successes), ("trials", trials)):
        if not np.issubdtype(value.dtype, np.integer):
            raise ValueError(f"{name} must be integers; got dtype {value.dtype}")
    if np.any(trials < 1):
        raise ValueError(f"trials must be >= 1; got {trials.min()}")
    if np.any(successes < 0) or np.any(successes > trials):
        raise ValueError("successes must lie in [0, trials]")
    return successes, trials


def clopper_pearson(
    successes, trials, confidence: float = 0.95, *, alternative="two-sided"
):
    """Exact binomial confidence interval ``(low, high)`` for a success rate.

    ``alternative='two-sided'`` puts (1 - confidence) / 2 in each tail;
    ``'lower'`` gives a one-sided lower bound (``high = 1``) and ``'upper'`` a
    one-sided upper bound (``low = 0``), each at level ``confidence``. The ends
    are quantiles of Beta distributions: ``low = Beta(k, n - k + 1).ppf(a)``
    (0 at k = 0) and ``high = Beta(k + 1, n - k).ppf(1 - a)`` (1 at k = n).

    Args:
      successes: ``k``, integers in ``[0, trials]`` (any shape).
      trials: ``n >= 1``, broadcastable against ``successes``.
      confidence: in (0, 1).

    Returns:
      ``(low, high)``, float arrays of the broadcast shape (floats for scalars).

    Example:
        >>> low, high = clopper_pearson(50, 100)
        >>> round(low, 3), round(high, 3)
        (0.398, 0.602)
        >>> clopper_pearson(0, 100, alternative="upper")[1] < 0.03
        True
    """
    confidence = _check_confidence(confidence)
    if alternative not in ALTERNATIVES:
        raise ValueError(
            f"alternative must be one of {ALTERNATIVES}; got {alternative!r}"
        )
    k, n = _check_counts(successes, trials)
    k, n = np.broadcast_arrays(k, n)
    tail = (1 - confidence) / 2 if alternative == "two-sided" else 1 - confidence
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(k > 0, scipy.stats.beta.ppf(tail, k, n - k + 1), 0.0)
        high = np.where(k < n, scipy.stats.beta.ppf(1 - tail, k + 1, n - k), 1.0)
    if alternative == "lower":
        high = np.ones_like(high)
    elif alternative == "upper":
        low = np.zeros_like(low)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def _epsilon_from_rates(tpr_low, fpr_high, delta):
    """``max(log((TPR-delta)/FPR), log((1-FPR-delta)/(1-TPR)))`` at the bounds, >= 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        forward = np.where(
            tpr_low > delta,
            np.log(np.maximum(tpr_low - delta, 1e-300)) - np.log(fpr_high),
            -np.inf,
        )
        tnr_low, fnr_high = 1 - fpr_high, 1 - tpr_low
        backward = np.where(
            tnr_low > delta,
            np.log(np.maximum(tnr_low - delta, 1e-300)) - np.log(fnr_high),
            -np.inf,
        )
    both = np.maximum(forward, backward)
    return np.maximum(
        np.nan_to_num(both, nan=0.0, posinf=np.inf), 0.0
    ), forward >= backward


def _counts_above(scores_in, scores_out, thresholds):
    """True and false positives of "score >= threshold" for each threshold."""
    sorted_in, sorted_out = np.sort(scores_in), np.sort(scores_out)
    tp = sorted_in.size - np.searchsorted(sorted_in, thresholds, side="left")
    fp = sorted_out.size - np.searchsorted(sorted_out, thresholds, side="left")
    return tp, fp


@dataclasses.dataclass(frozen=True)
class EpsilonBound:
    """A lower bound on epsilon and the test behind it.

    ``epsilon`` holds with probability at least ``confidence``. The test says
    "canary in" when the score is at least ``threshold``; it was chosen on
    ``selection_trials`` trials (per side) and evaluated on the others: of
    ``positives`` runs with the canary in, ``true_positives`` said "in"; of
    ``negatives`` runs without, ``false_positives`` did. ``tpr_low`` and
    ``fpr_high`` are the one-sided Clopper-Pearson bounds at level
    (1 - confidence) / 2 each; ``estimate`` is the same formula at the observed
    rates (no confidence; can exceed the truth).
    """

    epsilon: float
    estimate: float
    threshold: float
    direction: str  # 'TPR/FPR' or 'TNR/FNR': which inequality gave the bound
    true_positives: int
    positives: int
    false_positives: int
    negatives: int
    tpr_low: float
    fpr_high: float
    selection_trials: int
    confidence: float
    delta: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_scores(name, scores) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size < 2:
        raise ValueError(
            f"{name} must be a 1-D array of at least 2 scores; got shape {scores.shape}"
        )
    if not np.all(np.isfinite(scores)):
        bad = int(np.sum(~np.isfinite(scores)))
        raise ValueError(f"{name} has {bad} non-finite scores")
    return scores


def epsilon_lower_bound(
    scores_in,
    scores_out,
    delta: float,
    *,
    confidence: float = 0.95,
    selection_fraction: float = 0.5,
) -> EpsilonBound:
    """Lower bound on epsilon from scores of runs with and without the canary.

    The first ``selection_fraction`` of each score array chooses the threshold
    that maximizes a conservative version of the bound on those trials
    (:data:`SELECTION_LEVEL`); the rest gives the bound. The
    trials must be independent and identically distributed per side (their
    order carries no information).

    Args:
      scores_in: ``(n_in,)`` scores of runs on D' (canary in); higher means
        "in".
      scores_out: ``(n_out,)`` scores of runs on D (canary out).
      delta: the delta of the claim, in [0, 1).
      confidence: probability that the bound holds, in (0, 1).
      selection_fraction: in (0, 1).

    Returns:
      An :class:`EpsilonBound`.
    """
    confidence = _check_confidence(confidence)
    if (
        isinstance(delta, bool)
        or not isinstance(delta, int | float)
        or not 0 <= delta < 1
    ):
        raise ValueError(f"delta must be a number in [0, 1); got {delta!r}")
    if (
        not isinstance(selection_fraction, int | float)
        or not 0 < selection_fraction < 1
    ):
        raise ValueError(
            f"selection_fraction must lie in (0, 1); got {selection_fraction!r}"
        )
    scores_in = _check_scores("scores_in", scores_in)
    scores_out = _check_scores("scores_out", scores_out)
    split_in = min(
        max(1, math.floor(selection_fraction * scores_in.size)), scores_in.size - 1
    )
    split_out = min(
        max(1, math.floor(selection_fraction * scores_out.size)), scores_out.size - 1
    )
    select_in, eval_in = scores_in[:split_in], scores_in[split_in:]
    select_out, eval_out = scores_out[:split_out], scores_out[split_out:]
    one_tail = 1 - (1 - confidence) / 2

    def bounds(tp, fp, n_in, n_out, level=one_tail):
        tpr_low = clopper_pearson(tp, n_in, level, alternative="lower")[0]
        fpr_high = clopper_pearson(fp, n_out, level, alternative="upper")[1]
        return tpr_low, fpr_high

    candidates = np.unique(np.concatenate([select_in, select_out]))
    tp, fp = _counts_above(select_in, select_out, candidates)
    selection = bounds(tp, fp, split_in, split_out, SELECTION_LEVEL)
    eps, _ = _epsilon_from_rates(*selection, delta)
    threshold = float(candidates[int(np.argmax(eps))])

    tp, fp = _counts_above(eval_in, eval_out, np.array([threshold]))
    n_in, n_out = eval_in.size, eval_out.size
    tpr_low, fpr_high = bounds(tp, fp, n_in, n_out)
    epsilon, forward = _epsilon_from_rates(tpr_low, fpr_high, delta)
    estimate, _ = _epsilon_from_rates(tp / n_in, np.maximum(fp / n_out, 0), delta)
    return EpsilonBound(
        epsilon=float(epsilon[0]),
        estimate=float(estimate[0]),
        threshold=threshold,
        direction="TPR/FPR" if forward[0] else "TNR/FNR",
        true_positives=int(tp[0]),
        positives=n_in,
        false_positives=int(fp[0]),
        negatives=n_out,
        tpr_low=float(tpr_low[0]),
        fpr_high=float(fpr_high[0]),
        selection_trials=split_in,
        confidence=confidence,
        delta=float(delta),
    )
