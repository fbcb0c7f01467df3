"""Specification of lrs.audit: exact binomial bounds, the epsilon lower bound,
and canary audits that stay below the claim and catch broken mechanisms."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from lrs import audit
from lrs.studies import privacy_audit as experiment

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
    config = audit.AuditConfig(level="fit", epsilon=0.5, trials=200, num_iters=2)
    honest = audit.audit_attackers(config, problem)
    assert set(honest) == {"final", "transcript"}
    for observe, result in honest.items():
        assert result.observe == observe and result.dtype == "float64"
        assert not result.flagged and result.bound.epsilon <= 0.5
    broken = audit.audit(dataclasses.replace(config, fault="no_clipping"), problem)
    assert broken.observe == "final"
    assert broken.flagged and broken.bound.epsilon > 0.5
    assert broken.epsilon_claimed == pytest.approx(honest["final"].epsilon_claimed)


def test_transcript_attacker_is_tighter_than_the_final_u_attacker():
    # Same runs for both attackers, and the compiled program of the test above
    # (epsilon is traced; batches of 200 runs).
    config = audit.AuditConfig(
        level="fit", epsilon=8.0, trials=600, num_iters=2, batch_trials=200
    )
    found = audit.audit_attackers(config, audit.AuditProblem(t=20))
    final, whole = found["final"], found["transcript"]
    assert not whole.flagged and whole.bound.epsilon <= whole.epsilon_claimed
    # The final U forgets most of the canary's pushes (bound 0 here); the
    # likelihood ratio of every release adds them up.
    assert whole.bound.epsilon > max(final.bound.epsilon, 0.1)


def test_key_reuse_is_flagged_with_few_trials():
    # One key for every run on D and on D' (the old default key(0)): the noise
    # cancels and the canary's effect alone separates the two data sets.
    config = audit.AuditConfig(level="step", epsilon=1.0, trials=200, fault="key_reuse")
    result = audit.audit(config, audit.AuditProblem(t=20))
    assert result.flagged and result.bound.epsilon > 3 * result.epsilon_claimed
    assert result.fault == "key_reuse"


def test_overflow_canary_in_float32_gives_finite_scores_and_is_not_flagged():
    problem = audit.AuditProblem(t=20, canary="overflow", dtype="float32")
    n = audit.neighbouring_datasets(problem, jax.random.key(0))
    assert n.data_out.X.dtype == np.float32
    # D holds D''s slot user times 1e20: its statistics overflow float32.
    X_in, y_in = np.asarray(n.data_in.X[-1]), np.asarray(n.data_in.y[-1])
    X_out, y_out = np.asarray(n.data_out.X[-1]), np.asarray(n.data_out.y[-1])
    np.testing.assert_allclose(X_out, 1e20 * X_in, rtol=1e-6)
    np.testing.assert_allclose(y_out, 1e20 * y_in, rtol=1e-6)
    with np.errstate(all="ignore"):
        assert not np.all(np.isfinite(X_out.T @ y_out))
    # Before the fix the fit raised (or gave NaN) on D only: non-finite scores
    # make audit() raise FitError. Now both sides fit, and the bound holds.
    step = audit.audit(
        audit.AuditConfig(level="step", epsilon=4.0, trials=2_000), problem
    )
    assert step.dtype == "float32" and not step.flagged
    # The scaled user contributes nothing: D' differs by one clipped user.
    assert step.sensitivity_used == pytest.approx(1.0, abs=0.05)
    fit = audit.audit_attackers(
        audit.AuditConfig(level="fit", epsilon=4.0, trials=200), problem
    )
    assert not any(r.flagged for r in fit.values())


def test_float32_step_audit_matches_float64():
    config = audit.AuditConfig(level="step", epsilon=4.0, trials=2_000)
    single = audit.audit(config, audit.AuditProblem(t=20, dtype="float32"))
    double = audit.audit(config, audit.AuditProblem(t=20))
    assert single.dtype == "float32" and not single.flagged
    assert single.sensitivity_used == pytest.approx(double.sensitivity_used, rel=1e-3)
    assert abs(single.bound.epsilon - double.bound.epsilon) < 0.5


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
        (dict(level="fit", observe="all"), "observe"),
        (dict(level="step", observe="transcript"), "observe"),
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
        (dict(canary="overflow", m=5), "m >= d"),
        (dict(dtype="float16"), "dtype"),
        (dict(dtype=np.float32), "dtype"),
        (dict(overflow_scale=0.0), "overflow_scale"),
        (dict(overflow_scale=float("inf")), "overflow_scale"),
        (dict(overflow_scale=True), "overflow_scale"),
        (dict(overflow_scale="1e20"), "overflow_scale"),
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


def _fake_results(flag_honest: bool, flag_broken: bool, flag_reuse=True) -> dict:
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

    honest = 1.5 if flag_honest else 0.5
    rows = [
        row("step, crafted canary", 1.0, honest, None, flag_honest),
        row("fit, crafted canary", 1.0, 0.1, None, False),
        row("fit, crafted canary, transcript attacker", 1.0, 0.3, None, False),
        row("step, crafted, BROKEN: half noise", 4.0, 5.0, "half_noise", flag_broken),
        row("step, crafted, BROKEN: one key reused", 1.0, 7.0, "key_reuse", flag_reuse),
    ]
    return dict(rows=rows, seconds=3.0, setting=dict(delta=1e-5))


def test_summary_states_the_verdict_and_plot_draws(tmp_path):
    good = experiment.summary(_fake_results(False, True))
    assert "broken control is flagged" in good and "| step, crafted canary |" in good
    bad = experiment.summary(_fake_results(True, True))
    assert "UNEXPECTED" in bad
    missed = experiment.summary(_fake_results(False, False))
    assert "UNEXPECTED" in missed
    reused = experiment.summary(_fake_results(False, True, flag_reuse=False))
    assert "UNEXPECTED" in reused
    experiment._plot(_fake_results(False, True), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert experiment._finite({"a": [float("inf"), 1.0]}) == {"a": [None, 1.0]}


def test_experiment_table_has_the_new_rows():
    kinds = [kind for kind, _, _ in experiment._jobs(experiment.Setting())]
    assert "step, crafted, BROKEN: one key reused" in kinds
    assert "fit, overflow canary (1e20 user), float32" in kinds
    assert "step, crafted canary, float32" in kinds
    quick = {kind: (c, p) for kind, c, p in experiment._jobs(experiment.QUICK)}
    config, problem = quick["step, overflow canary (1e20 user), float32"]
    assert problem.dtype == "float32" and problem.canary == "overflow"
    assert quick["step, crafted, BROKEN: one key reused"][0].fault == "key_reuse"


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
        float32_levels=("step",),
        float32_trials=20_000,
    )
    results = experiment.run(tmp_path, setting=setting)
    saved = json.loads((tmp_path / "privacy_audit.json").read_text())
    assert (tmp_path / "privacy_audit.png").stat().st_size > 0
    kinds = [row["kind"] for row in saved["rows"]]
    assert kinds.count("step, crafted canary") == 2 and len(kinds) == 13
    assert kinds.count("fit, crafted canary, transcript attacker") == 2
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


def test_an_audit_whose_canary_makes_no_difference_is_refused():
    """A canary that overflows float32 makes D and D' equal: the audit would
    report 'not flagged' having tested nothing."""
    problem = audit.AuditProblem(
        d=6, r=1, k=1, m=8, t=10, canary_scale=1e300, dtype="float32"
    )
    with pytest.raises(ValueError, match="no difference"):
        audit.audit(audit.AuditConfig(trials=20), problem)
    with pytest.raises(ValueError, match="key"):
        audit.audit(audit.AuditConfig(trials=20), key=0)
