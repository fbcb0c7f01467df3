"""Private AMHT-LRS: sensitivity, calibration, accounting, API (docs/privacy.md)."""

import dataclasses
import functools
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import pld
from scipy import stats

import lrs
from lrs import peruser, private
from lrs.private import accounting
from lrs.private import algorithm as pfit
from lrs.private import mechanism as mech

pytestmark = pytest.mark.usefixtures("cheap_compiles")

D, R, K, M, T = 12, 2, 2, 16, 40


@pytest.fixture(scope="module")
def problem():
    return lrs.synthetic.make_problem(
        jax.random.key(3), d=D, t=T, m=M, r=R, k=K, noise=0.05, dtype="float64"
    )


@pytest.fixture(scope="module")
def config():
    return lrs.AMHTConfig(rank=R, sparsity=K, num_iters=6, rescue_fraction=0.0)


def _adversaries(data, key):
    """User 0 replaced by data sets far outside the others' range."""
    X0, y0 = data.X[0], data.y[0]
    k1, k2 = jax.random.split(key)
    huge_x = 1e6 * jax.random.normal(k1, X0.shape, X0.dtype)
    return {
        "huge features and labels": (huge_x, 1e8 * jnp.sign(y0)),
        "huge labels": (X0, 1e9 * jnp.ones_like(y0)),
        "aligned with U": (1e4 * jnp.ones_like(X0), -1e7 * jnp.ones_like(y0)),
        "zero data": (jnp.zeros_like(X0), jnp.zeros_like(y0)),
        "ordinary other user": (data.X[1], data.y[1]),
    }


def _replace_user0(data, X0, y0):
    return data._replace(X=data.X.at[0].set(X0), y=data.y.at[0].set(y0))


@functools.partial(jax.jit, static_argnames="config")
def _normalized_step_sum(data, U, config, clips):
    """sum_i c_i (G_i / C_G, H_i / C_H), flattened: the quantity of Lemma 1."""
    fits = peruser.per_user_step(data, U, None, config)
    G, H = pfit.step_sums(data, U, fits, clips, jnp.ones(data.X.shape[0]), None)
    return jnp.concatenate([(G / clips[0]).ravel(), (H / clips[1]).ravel()]), fits


@pytest.mark.parametrize("clips", [(1.0, 10.0), (0.05, 0.5), (50.0, 3.0)])
def test_step_release_changes_by_at_most_its_sensitivity(problem, config, clips):
    data, truth = problem
    clips = jnp.asarray(clips)
    U = truth.U
    base, fits = _normalized_step_sum(data, U, config, clips)
    for name, (X0, y0) in _adversaries(data, jax.random.key(7)).items():
        other = _replace_user0(data, X0, y0)
        moved, other_fits = _normalized_step_sum(other, U, config, clips)
        change = float(jnp.linalg.norm(base - moved))
        assert change <= 2 + 1e-9, name
        # Every other user's local fit is untouched: the billboard property.
        for a, b in zip(jax.tree.leaves(fits), jax.tree.leaves(other_fits)):
            np.testing.assert_array_equal(np.asarray(a)[1:], np.asarray(b)[1:])


@functools.partial(jax.jit, static_argnames="config")
def _fits(data, U, config):
    return peruser.per_user_step(data, U, None, config)


def test_each_user_contributes_at_most_one_after_clipping(problem, config):
    data, truth = problem
    fits = _fits(data, truth.U, config)
    norms = pfit.step_norms(data, truth.U, fits, None)
    clips = jnp.asarray([0.3, 2.0])
    w = mech.clip_weights(norms, clips)
    joint = jnp.sqrt(jnp.sum((w[:, None] * norms / clips) ** 2, axis=1))
    assert float(jnp.max(joint)) <= 1 + 1e-12
    # Users already inside the ball are not touched.
    inside = jnp.sqrt(jnp.sum((norms / clips) ** 2, axis=1)) <= 1
    np.testing.assert_array_equal(np.asarray(w)[np.asarray(inside)], 1.0)


def test_moment_release_changes_by_at_most_its_sensitivity(problem):
    data, _ = problem
    clip = 0.7

    @jax.jit
    def normalized(data):
        ones = jnp.ones(data.X.shape[0])
        return pfit.moment_sum(data, jnp.asarray(clip), ones, None) / clip

    base = normalized(data)
    for name, (X0, y0) in _adversaries(data, jax.random.key(8)).items():
        change = float(jnp.linalg.norm(base - normalized(_replace_user0(data, X0, y0))))
        assert change <= 2 + 1e-9, name


def test_each_quantile_count_changes_by_at_most_one():
    rng = np.random.default_rng(0)
    norms = jnp.asarray(np.exp(rng.normal(0, 5, size=(50, 2))))
    bins = mech.histogram_bins(norms)
    for replacement in ([1e-30, 1e30], [3.0, 3.0], [0.0, np.inf]):
        moved = mech.histogram_bins(norms.at[0].set(jnp.asarray(replacement)))
        for edge in range(0, mech.NUM_BINS, 7):
            change = jnp.sum(bins <= edge, axis=0) - jnp.sum(moved <= edge, axis=0)
            assert int(jnp.max(jnp.abs(change))) <= 1


def _levels(key, norms, q, z_histogram):
    return mech.quantile_thresholds(key, norms.shape[1], norms.shape[0], q, z_histogram)


def test_private_quantile_without_noise_brackets_the_true_quantile():
    rng = np.random.default_rng(1)
    norms = np.exp(rng.normal(0, 3, size=(1000, 2)))
    step = 2 ** (1 / mech.BINS_PER_OCTAVE)
    for q in (0.1, 0.5, 0.9, 1.0):
        levels = _levels(jax.random.key(0), norms, q, 0.0)
        edges = mech.private_quantile(levels, jnp.asarray(norms))
        for column, edge in enumerate(np.asarray(edges, np.float64)):
            assert np.mean(norms[:, column] <= edge * (1 + 1e-6)) >= q
            assert np.mean(norms[:, column] <= edge / step / (1 + 1e-6)) < q


def test_private_quantile_stays_near_the_quantile_under_noise():
    """Noise of 3% of t moves the answer by a few bins, not to an empty tail."""
    rng = np.random.default_rng(2)
    norms = np.exp(rng.normal(0, 1, size=(200, 1)))
    keys = jax.random.split(jax.random.key(3), 50)
    levels = jax.vmap(lambda k: _levels(k, norms, 0.5, 3.0))(keys)
    edges = jax.vmap(lambda lv: mech.private_quantile(lv, jnp.asarray(norms)))(levels)
    ranks = [np.mean(norms[:, 0] <= e) for e in np.asarray(edges)[:, 0]]
    assert 0.3 < min(ranks) and max(ranks) < 0.7


def test_released_noise_has_the_calibrated_spread(problem, config):
    """Chi-square test of the noise scale; false-alarm rate 1e-6 per check."""
    data, truth = problem
    fits = _fits(data, truth.U, config)
    clips = jnp.asarray([0.4, 3.0])
    ones = jnp.ones(data.X.shape[0])
    G, H = pfit.step_sums(data, truth.U, fits, clips, ones, None)
    z, n = 1.7, 3000
    keys = jax.random.split(jax.random.key(11), n)
    draw = functools.partial(
        mech.draw_noise, steps=1, d=D, r=R, num_users=T, quantile=0.5, z_histogram=1.0
    )
    draws = jax.vmap(draw)(keys)
    assert draws.step_G.dtype == draws.step_H.dtype == jnp.float64
    G_hat = jax.vmap(lambda g: mech.noisy_sum(G, g, clips[0], z))(draws.step_G[:, 0])
    H_hat = jax.vmap(lambda h: mech.noisy_sum(H, h, clips[1], z))(draws.step_H[:, 0])
    for released, total, clip in ((G_hat, G, clips[0]), (H_hat, H, clips[1])):
        sigma = 2 * z * float(clip)
        noise = np.asarray(released - total)
        if noise.ndim == 3 and noise.shape[1] == noise.shape[2]:
            np.testing.assert_allclose(noise, np.swapaxes(noise, 1, 2))
            noise = noise[:, *np.triu_indices(noise.shape[1])]
        samples = noise.reshape(-1)
        dof = samples.size
        statistic = float(np.sum(samples**2) / sigma**2)
        low, high = stats.chi2.ppf([0.5e-6, 1 - 0.5e-6], dof)
        assert low < statistic < high
        # A noise scale 10% off is detected at this sample size.
        assert not low < statistic / 1.1**2 < high


# ------------------------------------------------------------ accounting


def test_reported_epsilon_matches_an_independent_accountant_computation():
    steps, z, ratio, delta = 7, 3.0, 8.0, 1e-5
    plan = accounting.Plan(
        steps=steps,
        histogram_noise_ratio=ratio,
        num_users=100,
        batch_size=100,
        quantile_queries=9,
    )
    gaussian = dp_accounting.GaussianDpEvent
    independent = pld.PLDAccountant(
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=1e-4,
    )
    for _ in range(steps + 1):  # init and each step: quantile + statistic
        for _ in range(9):
            independent.compose(gaussian(ratio * z))
        independent.compose(gaussian(z))
    expected = independent.get_epsilon(delta)
    assert plan.compositions == 10 * (steps + 1)
    reported = accounting.epsilon_spent(plan, z, delta, "pld")
    assert reported == pytest.approx(expected, rel=2e-3)
    # The Renyi bound is looser, never tighter.
    assert accounting.epsilon_spent(plan, z, delta, "rdp") >= reported


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("epsilon", [0.5, 2.0, 8.0])
def test_epsilon_to_noise_to_epsilon_round_trips(accountant, epsilon):
    plan = accounting.Plan(steps=5, num_users=1000, batch_size=1000)
    z = accounting.calibrate(plan, epsilon, 1e-6, accountant)
    spent = accounting.epsilon_spent(plan, z, 1e-6, accountant)
    assert spent <= epsilon
    assert spent == pytest.approx(epsilon, rel=2e-3)
    assert accounting.epsilon_spent(plan, 0.98 * z, 1e-6, accountant) > epsilon


def test_more_steps_or_less_noise_never_spend_less():
    delta = 1e-5
    previous = 0.0
    for steps in (0, 1, 3, 10, 30):
        plan = accounting.Plan(steps=steps, num_users=10, batch_size=10)
        spent = accounting.epsilon_spent(plan, 5.0, delta, "rdp")
        assert spent >= previous
        previous = spent
    plan = accounting.Plan(steps=5, num_users=10, batch_size=10)
    by_noise = [accounting.epsilon_spent(plan, z, delta, "pld") for z in (20, 8, 3, 1)]
    assert by_noise == sorted(by_noise)


def test_subsampling_is_accounted_and_cheaper():
    full = accounting.Plan(steps=5, num_users=1000, batch_size=1000)
    sampled = dataclasses.replace(full, batch_size=100)
    assert sampled.subsampled
    assert accounting.epsilon_spent(sampled, 4.0, 1e-5, "rdp") < (
        accounting.epsilon_spent(full, 4.0, 1e-5, "rdp")
    )
    with pytest.raises(ValueError, match="pld"):
        accounting.epsilon_spent(sampled, 4.0, 1e-5, "pld")


# ------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(epsilon=0.0, delta=1e-5), "epsilon"),
        (dict(epsilon=-1.0, delta=1e-5), "epsilon"),
        (dict(epsilon=math.inf, delta=1e-5), "epsilon"),
        (dict(epsilon=1.0, delta=0.0), "delta"),
        (dict(epsilon=1.0, delta=1.0), "delta"),
        (dict(epsilon=1.0, delta=1.5), "delta"),
        (dict(epsilon=1.0, delta=1e-5, clip_gradient=0.0), "clip_gradient"),
        (dict(epsilon=1.0, delta=1e-5, clip_gram=-2.0), "clip_gram"),
        (dict(epsilon=1.0, delta=1e-5, clip_moment=math.nan), "clip_moment"),
        (dict(epsilon=1.0, delta=1e-5, noise_multiplier=0.0), "noise_multiplier"),
        (dict(epsilon=1.0, delta=1e-5, clip_quantile=0.0), "clip_quantile"),
        (dict(epsilon=1.0, delta=1e-5, sampling_rate=1.5), "sampling_rate"),
        (dict(epsilon=1.0, delta=1e-5, accountant="moments"), "accountant"),
        (dict(epsilon=1.0), "delta"),
        (dict(non_private=True, epsilon=1.0), "epsilon"),
    ],
)
def test_bad_dp_config_is_refused_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        private.DPConfig(**kwargs)


def test_a_noise_multiplier_that_cannot_reach_the_target_is_refused(problem, config):
    data, _ = problem
    weak = private.DPConfig(epsilon=1.0, delta=1e-5, noise_multiplier=0.5)
    with pytest.raises(ValueError, match="noise_multiplier=0.5 cannot reach"):
        private.fit(data, config, weak, key=jax.random.key(0))
    with pytest.raises(ValueError, match="dp_config"):
        private.fit(data, config, {"epsilon": 1.0}, key=jax.random.key(0))


# ------------------------------------------------------------------ the fit


def test_debug_mode_reproduces_the_non_private_fit(small_problem):
    data, truth = small_problem
    config = lrs.AMHTConfig(rank=3, sparsity=3, num_iters=25)
    reference, _ = lrs.fit(data, config, truth=truth)
    params, diagnostics = private.fit(
        data,
        config,
        private.DPConfig(non_private=True),
        key=jax.random.key(0),
        truth=truth,
        nonprivate_diagnostics=True,
    )
    assert diagnostics.nonprivate.relative_error[-1] < 1e-6
    np.testing.assert_allclose(lrs.weights(params), lrs.weights(reference), atol=1e-6)
    record = diagnostics.privacy
    assert record.non_private and record.epsilon == math.inf
    assert record.noise_multiplier == 0 and "non-private" in record.accountant


def test_private_fit_spends_what_it_reports_and_learns(problem, config):
    data, truth = problem
    before = jax.tree.map(np.array, data)
    dp = private.DPConfig(epsilon=2.0, delta=1e-5)
    params, diagnostics = private.fit(
        data, config, dp, key=jax.random.key(5), truth=truth
    )
    record = diagnostics.privacy
    assert record.epsilon <= 2.0 and record.epsilon == pytest.approx(2.0, rel=2e-3)
    plan = private.plan_for(config, dp, T)
    queries = mech.SEARCH_LEVELS
    assert (
        record.compositions
        == plan.compositions
        == (1 + queries) * (config.num_iters + 1)
    )
    assert len(record.clip_gradient) == config.num_iters
    assert record.clip_moment > 0 and all(c > 0 for c in record.clip_gram)
    assert not record.non_private and record.accountant == "pld"
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(data)):
        np.testing.assert_array_equal(a, np.asarray(b))
    again, _ = private.fit(data, config, dp, key=jax.random.key(5), truth=truth)
    np.testing.assert_array_equal(params.U, again.U)
    other, _ = private.fit(data, config, dp, key=jax.random.key(6), truth=truth)
    assert not np.allclose(params.U, other.U)
    # Little noise: as close to the planted U as the non-private algorithm
    # gets on this tiny problem; much noise: far.
    _, exact = private.fit(
        data,
        config,
        private.DPConfig(non_private=True),
        key=jax.random.key(1),
        truth=truth,
    )
    loose = private.DPConfig(epsilon=500.0, delta=1e-5)
    _, near = private.fit(data, config, loose, key=jax.random.key(2), truth=truth)
    assert near.subspace_distance[-1] < exact.subspace_distance[-1] + 0.05
    assert diagnostics.subspace_distance[-1] > near.subspace_distance[-1] + 0.2


def test_subsampled_fit_uses_the_rdp_accountant(problem, config):
    data, _ = problem
    dp = private.DPConfig(
        epsilon=30.0,
        delta=1e-5,
        sampling_rate=0.5,
        clip_gradient=1.0,
        clip_gram=5.0,
        noise_multiplier=2.0,
    )
    _, diagnostics = private.fit(data, config, dp, key=jax.random.key(0))
    record = diagnostics.privacy
    assert record.accountant == "rdp" and record.batch_size == T // 2
    assert record.epsilon <= 30.0 and record.noise_multiplier == 2.0
    assert set(record.clip_gradient) == {1.0} and set(record.clip_gram) == {5.0}
    # Fixed step clips: no step quantiles, only the moment's.
    assert record.compositions == 1 + mech.SEARCH_LEVELS + config.num_iters


# ------------------------------------------------ public init / step


@pytest.mark.parametrize(
    "dtype", ["float32", pytest.param("float64", marks=pytest.mark.slow)]
)
def test_init_then_steps_is_the_fit(dtype):
    """lrs.private.init + num_iters x lrs.private.step releases what
    lrs.private.fit releases with the same key (same noise, same batches)."""
    data, _ = lrs.synthetic.make_problem(
        jax.random.key(5), d=D, t=60, m=M, r=R, k=K, noise=0.05, dtype=dtype
    )
    config = lrs.AMHTConfig(rank=R, sparsity=K, num_iters=3)
    dp = private.DPConfig(epsilon=8.0, delta=1e-5, sampling_rate=0.5)
    key = jax.random.key(11)
    params, diag = private.fit(data, config, dp, key=key, transcript=True)
    state, mechanism = private.init(data, config, dp, key=key)
    tol = 1e-4 if dtype == "float32" else 1e-10
    np.testing.assert_allclose(state.U, diag.transcript.U[0], atol=tol)
    for i in range(config.num_iters):
        state, release = private.step(state, data, mechanism)
        np.testing.assert_allclose(release.G, diag.transcript.G[i], rtol=tol, atol=tol)
        np.testing.assert_allclose(release.U, diag.transcript.U[i + 1], atol=tol)
    assert int(state.step) == config.num_iters
    np.testing.assert_allclose(state.U, params.U, atol=tol)
    with pytest.raises(ValueError, match="privacy budget is spent"):
        private.step(state, data, mechanism)
    # under jit the check cannot run: a spent budget releases NaN, never a
    # second use of the last step's noise (the step's own jitted program)
    _, spent = pfit._step_jit(state, data, mechanism)
    assert np.isnan(np.asarray(spent.G)).all()


def test_step_refuses_a_foreign_mechanism(problem, config):
    data, _ = problem
    dp = private.DPConfig(epsilon=4.0, delta=1e-5)
    state, _ = private.init(data, config, dp, key=jax.random.key(0))
    with pytest.raises(ValueError, match="mechanism must be the lrs.private.Mechanism"):
        private.step(state, data, config)


def test_the_noise_is_calibrated_once_per_plan_and_target():
    """The calibration (seconds, ~10 s for subsampled RDP) is cached: a fit
    then init with the same settings, or a sweep over seeds, search once;
    another target searches again."""
    accounting._calibrate.cache_clear()
    config = lrs.AMHTConfig(rank=R, sparsity=K, num_iters=3)
    dp = private.DPConfig(epsilon=8.0, delta=1e-5)
    first = private.noise_multiplier(config, dp, 60)
    assert private.noise_multiplier(config, dp, 60) == first
    assert accounting._calibrate.cache_info().misses == 1
    other = dataclasses.replace(dp, epsilon=4.0)
    assert private.noise_multiplier(config, other, 60) > first
    assert accounting._calibrate.cache_info().misses == 2
