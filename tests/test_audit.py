"""Specification of lrs.audit: exact binomial bounds, the epsilon lower bound,
and canary audits that stay below the claim and catch broken mechanisms."""

import json
import math

import jax
import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from lrs import audit
from lrs.audit import experiment

pytestmark = pytest.mark.usefixtures("cheap_compiles")


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon at delta of the Gaussian mechanism N(0,1) vs N(mu,1)."""
    norm = scipy.stats.norm

    def gap(eps):
        return (
            norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
        ) - delta

    return scipy.optimize.brentq(gap, 0.0, 100.0)


# ------------------------------------------------------------ Clopper-Pearson


@pytest.mark.parametrize("n", [1, 7, 100, 10_000])
@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.999])
def test_clopper_pearson_matches_scipy_beta_quantiles(n, confidence):
    k = np.unique(np.array([0, 1, n // 3, n // 2, n - 1, n]).clip(0, n))
    low, high = audit.clopper_pearson(k, n, confidence)
    tail = (1 - confidence) / 2
    for ki, lo, hi in zip(k, low, high):
        want_lo = 0.0 if ki == 0 else scipy.stats.beta.ppf(tail, ki, n - ki + 1)
        want_hi = 1.0 if ki == n else scipy.stats.beta.ppf(1 - tail, ki + 1, n - ki)
        np.testing.assert_allclose([lo, hi], [want_lo, want_hi], rtol=1e-12)


def test_clopper_pearson_ends_have_the_exact_binomial_tail_probability():
    n, k, confidence = 50, 12, 0.9
    low, high = audit.clopper_pearson(k, n, confidence)
    # P[Bin(n, low) >= k] = P[Bin(n, high) <= k] = (1 - confidence) / 2.
    assert scipy.stats.binom.sf(k - 1, n, low) == pytest.approx(0.05, rel=1e-9)
    assert scipy.stats.binom.cdf(k, n, high) == pytest.approx(0.05, rel=1e-9)
    one_low, one = audit.clopper_pearson(k, n, confidence, alternative="lower")
    assert one == 1.0 and scipy.stats.binom.sf(k - 1, n, one_low) == pytest.approx(0.1)
    zero, one_high = audit.clopper_pearson(k, n, confidence, alternative="upper")
    assert zero == 0.0 and scipy.stats.binom.cdf(k, n, one_high) == pytest.approx(0.1)


def test_clopper_pearson_covers_the_true_rate():
    rng = np.random.default_rng(0)
    p, n = 0.03, 200
    k = rng.binomial(n, p, size=4000)
    low, high = audit.clopper_pearson(k, n, 0.9)
    coverage = np.mean((low <= p) & (p <= high))
    assert coverage >= 0.9  # exact intervals are conservative


# --------------------------------------------------------- epsilon bound


def test_epsilon_lower_bound_agrees_with_jax_privacy():
    auditing = pytest.importorskip("jax_privacy.auditing")
    rng = np.random.default_rng(1)
    scores_in = rng.normal(1.0, 1.0, 4000)
    scores_out = rng.normal(0.0, 1.0, 4000)
    bound = audit.epsilon_lower_bound(scores_in, scores_out, 1e-5, confidence=0.9)
    half = bound.selection_trials
    theirs = auditing.CanaryScoreAuditor(scores_in[half:], scores_out[half:])
    want = theirs.epsilon_clopper_pearson(
        0.1,
        1e-5,
        one_sided=False,
        threshold_strategy=auditing.Explicit(bound.threshold),
    )
    assert bound.epsilon == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert bound.epsilon > 0.3  # mu = 1 is easy to see


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_epsilon_lower_bound_stays_below_the_gaussian_truth(mu):
    delta = 1e-5
    truth = gaussian_epsilon(mu, delta)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        bound = audit.epsilon_lower_bound(
            rng.normal(mu, 1, 20_000), rng.normal(0, 1, 20_000), delta
        )
        assert 0 <= bound.epsilon <= truth
    assert bound.epsilon > 0.3 * truth  # and the test has power


def test_epsilon_lower_bound_is_zero_for_identical_distributions():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(2, 5000))
    assert audit.epsilon_lower_bound(scores[0], scores[1], 1e-5).epsilon < 0.2


# ----------------------------------------------------------------- audits


def test_step_audit_of_the_real_mechanism_stays_below_its_claim():
    for eps in (1.0, 4.0):
        config = audit.AuditConfig(level="step", epsilon=eps, trials=50_000)
        result = audit.audit(config, audit.AuditProblem(t=20))
        assert result.epsilon_claimed == pytest.approx(eps, rel=1e-2)
        assert not result.flagged
        assert 0 <= result.bound.epsilon <= result.epsilon_claimed
        # The crafted canary uses (almost) all the sensitivity Lemma 1 allows.
        assert 1.9 < result.sensitivity_used <= 2 + 1e-9
    assert result.bound.epsilon > 0.3 * eps  # at epsilon = 4 the test has power


@pytest.mark.parametrize(
    "fault, epsilon, trials",
    [("half_noise", 4.0, 100_000), ("no_clipping", 1.0, 2_000)],
)
def test_step_audit_flags_a_broken_mechanism(fault, epsilon, trials):
    config = audit.AuditConfig(
        level="step", epsilon=epsilon, trials=trials, fault=fault
    )
    result = audit.audit(config, audit.AuditProblem(t=20))
    assert result.flagged and result.bound.epsilon > result.epsilon_claimed
    if fault == "no_clipping":
        assert result.sensitivity_used > 10  # the unclipped canary


def test_fit_audit_stays_below_the_claim_and_flags_skipped_clipping():
    problem = audit.AuditProblem(t=20)
    honest = audit.audit(
        audit.AuditConfig(level="fit", epsilon=0.5, trials=200, num_iters=2),
        problem,
    )
    assert not honest.flagged and honest.bound.epsilon <= 0.5
    broken = audit.audit(
        audit.AuditConfig(
            level="fit", epsilon=0.5, trials=200, num_iters=2, fault="no_clipping"
        ),
        problem,
    )
    assert broken.flagged and broken.bound.epsilon > 0.5
    assert broken.epsilon_claimed == pytest.approx(honest.epsilon_claimed)


def test_audit_is_reproducible_and_does_not_modify_its_inputs():
    problem = audit.AuditProblem(t=20, canary="ordinary")
    config = audit.AuditConfig(level="step", epsilon=2.0, trials=20_000)
    a = audit.audit(config, problem, key=jax.random.key(3))
    b = audit.audit(config, problem, key=jax.random.key(3))
    assert a.bound == b.bound
    assert problem == audit.AuditProblem(t=20, canary="ordinary")


def test_neighbouring_datasets_differ_in_one_user_only():
    n = audit.neighbouring_datasets(audit.AuditProblem(t=6), jax.random.key(0))
    same = np.all(np.asarray(n.data_out.y) == np.asarray(n.data_in.y), axis=1)
    assert same.tolist() == [True] * 6 + [False]
    np.testing.assert_allclose(n.truth_U.T @ n.direction, 0, atol=1e-12)


# ------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(trials=0), "trials"),
        (dict(trials=1), "trials"),
        (dict(trials=2.5), "trials"),
        (dict(confidence=0.0), "confidence"),
        (dict(confidence=1.0), "confidence"),
        (dict(confidence=1.5), "confidence"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(delta=0.0), "delta"),
        (dict(level="all"), "level"),
        (dict(fault="typo"), "fault"),
        (dict(num_iters=0), "num_iters"),
    ],
)
def test_bad_audit_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        audit.AuditConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(canary="loud"), "canary"),
        (dict(m=5), "m >= d"),
        (dict(r=5, k=5), "r \\+ k < d"),
        (dict(t=0), "t must"),
        (dict(canary_scale=0.0), "canary_scale"),
    ],
)
def test_bad_audit_problem_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        audit.AuditProblem(**kwargs)


def test_bad_bound_arguments_are_refused():
    good = np.arange(10.0)
    with pytest.raises(ValueError, match="confidence"):
        audit.clopper_pearson(1, 10, 1.0)
    with pytest.raises(ValueError, match="trials"):
        audit.clopper_pearson(0, 0)
    with pytest.raises(ValueError, match="successes"):
        audit.clopper_pearson(11, 10)
    with pytest.raises(ValueError, match="alternative"):
        audit.clopper_pearson(1, 10, alternative="both")
    with pytest.raises(ValueError, match="confidence"):
        audit.epsilon_lower_bound(good, good, 1e-5, confidence=0)
    with pytest.raises(ValueError, match="scores_in"):
        audit.epsilon_lower_bound(np.array([1.0, np.nan, 2.0]), good, 1e-5)
    with pytest.raises(ValueError, match="scores_out"):
        audit.epsilon_lower_bound(good, good[:1], 1e-5)
    with pytest.raises(ValueError, match="delta"):
        audit.epsilon_lower_bound(good, good, 1.0)
    with pytest.raises(ValueError, match="config"):
        audit.audit(dict(level="step"))


# ------------------------------------------------------------- experiment


def _fake_results(flag_honest: bool, flag_broken: bool) -> dict:
    def row(kind, eps, bound, fault, flagged):
        return dict(
            kind=kind,
            epsilon_claimed=eps,
            fault=fault,
            flagged=flagged,
            tightness=bound / eps,
            trials=100,
            seconds=1.0,
            bound=dict(epsilon=bound, estimate=float("inf")),
        )

    rows = [
        row(
            "step, crafted canary", 1.0, 1.5 if flag_honest else 0.5, None, flag_honest
        ),
        row("fit, crafted canary", 1.0, 0.1, None, False),
        row("step, crafted, BROKEN: half noise", 4.0, 5.0, "half_noise", flag_broken),
    ]
    return dict(rows=rows, seconds=3.0, setting=dict(delta=1e-5))


def test_summary_states_the_verdict_and_plot_draws(tmp_path):
    good = experiment.summary(_fake_results(False, True))
    assert "broken control is flagged" in good and "| step, crafted canary |" in good
    bad = experiment.summary(_fake_results(True, True))
    assert "UNEXPECTED" in bad
    missed = experiment.summary(_fake_results(False, False))
    assert "UNEXPECTED" in missed
    experiment._plot(_fake_results(False, True), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert experiment._finite({"a": [float("inf"), 1.0]}) == {"a": [None, 1.0]}


@pytest.mark.slow
def test_experiment_writes_json_plot_and_a_verdict(tmp_path):
    # Sizes shared with the tests above, so the compiled programs are reused.
    setting = experiment.Setting(
        epsilons=(1.0, 8.0),
        step_trials=20_000,
        step_users=20,
        fit_trials=200,
        fit_users=20,
        control_trials=100_000,
        control_epsilon=4.0,
    )
    results = experiment.run(tmp_path, setting=setting)
    saved = json.loads((tmp_path / "privacy_audit.json").read_text())
    assert (tmp_path / "privacy_audit.png").stat().st_size > 0
    kinds = [row["kind"] for row in saved["rows"]]
    assert kinds.count("step, crafted canary") == 2 and len(kinds) == 7
    text = experiment.summary(results)
    assert "broken control is flagged" in text, text


def test_cli_audit_refuses_a_bad_seed_and_documents_itself():
    import os
    import subprocess
    import sys

    from lrs._xla import DEADLOCK_FLAG

    env = dict(os.environ, XLA_FLAGS=DEADLOCK_FLAG, JAX_PLATFORMS="cpu")

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "lrs.cli", "audit", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    bad = run("--seed", "-1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "seed" in bad.stderr.strip().splitlines()[-1]
    helped = run("--help")
    assert helped.returncode == 0 and "Clopper-Pearson" in helped.stdout
