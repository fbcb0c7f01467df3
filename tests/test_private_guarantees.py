"""The privacy promise under ordinary calls (issue 14): secret keys, a public
initial U, float64 noise, integer counts, clipping no magnitude can defeat, no
refusal that depends on the data's values, nothing exact released by default.

Each test failed on the code before the fix.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrs
from lrs import private
from lrs.private import algorithm as alg
from lrs.private import mechanism as mech
from lrs.private.result import RELEASED

pytestmark = pytest.mark.usefixtures("cheap_compiles")

D, R, K, M, T = 10, 2, 1, 12, 24
CONFIG = lrs.AMHTConfig(rank=R, sparsity=K, num_iters=2)
LOCAL = dataclasses.replace(CONFIG, rescue_fraction=0.0)  # as the private fit runs
DP = private.DPConfig(epsilon=2.0, delta=1e-5)
# Fixed clip levels: the first release of neighbouring data sets is comparable.
DP_FIXED = private.DPConfig(
    epsilon=2.0, delta=1e-5, clip_moment=1.0, clip_gradient=1.0, clip_gram=5.0
)


def _problem(dtype):
    return lrs.synthetic.make_problem(
        jax.random.key(3), d=D, t=T, m=M, r=R, k=K, noise=0.05, dtype=dtype
    )


@pytest.fixture(scope="module", params=["float32", "float64"])
def problem(request):
    return _problem(request.param)


def _streamed(data, config, dp, **kw):
    host = lrs.UserData.from_host(*(np.asarray(a) for a in data))
    return private.fit_streamed(host, config, dp, chunk_users=7, **kw)


FITS = {"in memory": private.fit, "streamed": _streamed}


# ------------------------------------------------------------------ keys


@pytest.mark.parametrize("fit", FITS.values(), ids=FITS.keys())
def test_a_private_fit_needs_an_explicit_key(fit):
    data, _ = _problem("float64")
    with pytest.raises(TypeError, match="key"):
        fit(data, CONFIG, DP)
    with pytest.raises(ValueError, match="key is required.*secret and fresh"):
        fit(data, CONFIG, DP, key=None)
    for bad in (0, np.zeros(3, np.uint32), jax.random.split(jax.random.key(0))):
        with pytest.raises(ValueError, match="key must be one jax.random key"):
            fit(data, CONFIG, DP, key=bad)


def test_the_noise_key_only_feeds_noise_and_each_release_gets_its_own():
    draw = functools.partial(
        mech.draw_noise, steps=3, d=D, r=R, num_users=T, quantile=0.5, z_histogram=2.0
    )
    a, again, b = (
        draw(jax.random.key(1)),
        draw(jax.random.key(1)),
        draw(jax.random.key(2)),
    )
    # The draws are a function of the key alone (no data goes in): the same
    # key gives the same noise, another key other noise, in every release.
    for x, y, z in zip(a, again, b):
        np.testing.assert_array_equal(x, y)
        if x.dtype == jnp.float64:
            assert not np.any(np.asarray(x) == np.asarray(z))
    # No two releases share their noise.
    gs = np.asarray(a.step_G).reshape(3, -1)
    for i in range(3):
        for j in range(i):
            assert abs(np.corrcoef(gs[i], gs[j])[0, 1]) < 0.6
    assert not np.any(np.isin(np.asarray(a.step_G), np.asarray(a.init_moment)))
    # The batch branch differs from every noise branch.
    k = jax.random.key(1)
    batch = jax.random.key_data(mech.batch_key(k, 0))
    for branch in (mech.INIT_BRANCH, mech.STEP_BRANCH):
        noise = jax.random.key_data(jax.random.fold_in(k, branch))
        assert not np.array_equal(batch, noise)


def test_noise_is_drawn_in_float64_for_float32_data():
    data, _ = _problem("float32")
    prepared, data = alg.prepare(data, CONFIG, DP)
    key = jax.random.key(4)
    draws32 = alg.draw_noise(prepared, key, T, D, jnp.float32)
    draws64 = alg.draw_noise(prepared, key, T, D, jnp.float64)
    assert draws64.step_G.dtype == jnp.float64
    assert draws32.step_G.dtype == jnp.float32
    # The float32 noise is the float64 draw rounded, not a float32 sample
    # (whose tails stop near 5.2 sigma).
    np.testing.assert_array_equal(
        np.asarray(draws32.step_G), np.asarray(draws64.step_G).astype(np.float32)
    )
    g64 = np.asarray(draws64.step_G)
    assert np.mean(g64 != g64.astype(np.float32).astype(np.float64)) > 0.99
    for levels in (draws32.init_levels, draws32.step_levels):
        assert levels.dtype == jnp.int32


def test_quantile_counts_are_exact_integers_beyond_float32():
    """2^24 users at 1 and 3 at 1000; the target count 2^24 + 1 needs the 1000s.

    A float32 count rounds 2^24 + 1 to 2^24 and stops one bin too early.
    """
    t = 2**24 + 3
    norms = jnp.ones((t, 1), jnp.float32).at[-3:].set(1000.0)
    q = (2**24 + 1) / t
    levels = mech.quantile_thresholds(jax.random.key(0), 1, t, q, 0.0)
    assert levels.dtype == jnp.int32 and int(levels[0, 0]) == 2**24 + 1
    edge = float(mech.private_quantile(levels, norms)[0])
    assert 1000 <= edge < 1000 * 2 ** (1 / mech.BINS_PER_OCTAVE)


# ------------------------------------------------------------ public U_0


@pytest.mark.parametrize("fit", FITS.values(), ids=FITS.keys())
def test_a_random_initial_U_comes_from_the_public_seed_not_the_key(fit):
    data, _ = _problem("float64")
    config = lrs.AMHTConfig(rank=R, sparsity=K, num_iters=1, init="random")

    def first_U(key, seed):
        _, diag = fit(data, config, DP, key=key, public_seed=seed, transcript=True)
        return diag.transcript.U[0]

    U_a = first_U(jax.random.key(1), 5)
    np.testing.assert_array_equal(U_a, first_U(jax.random.key(2), 5))
    assert not np.allclose(U_a, first_U(jax.random.key(1), 6))
    np.testing.assert_array_equal(U_a, alg.public_init(R, D, jnp.float64, 5))


# ------------------------------------------------------- the data domain


def _with_user0(data, X0, y0, mask0=None):
    mask = data.mask if mask0 is None else data.mask.at[0].set(mask0)
    return lrs.UserData(data.X.at[0].set(X0), data.y.at[0].set(y0), mask)


def _overflowing(data):
    X0, y0 = data.X[0], data.y[0]
    return {
        "X and y x 1e20": (1e20 * X0, 1e20 * y0),
        "X x 1e19": (1e19 * X0, y0),
        "X x 1e30, y x -1e30": (1e30 * X0, -1e30 * y0),
    }


@pytest.mark.parametrize("fit", FITS.values(), ids=FITS.keys())
def test_a_user_scaled_to_overflow_float32_changes_a_release_by_its_sensitivity(fit):
    data, _ = _problem("float32")
    key = jax.random.key(9)
    _, base = fit(data, CONFIG, DP_FIXED, key=key, transcript=True)
    for name, (X0, y0) in _overflowing(data).items():
        other = _with_user0(data, X0, y0)
        params, diag = fit(other, CONFIG, DP_FIXED, key=key, transcript=True)
        assert np.all(np.isfinite(np.asarray(params.U))), name
        # The first release (the moment sum, same noise on both sides) moves
        # by at most the sensitivity 2 C: user 0 now contributes exactly 0.
        change = np.linalg.norm(diag.transcript.moment - base.transcript.moment)
        assert change <= 2 * DP_FIXED.clip_moment * (1 + 1e-5), name
        assert diag.excluded[0] and not diag.excluded[1:].any(), name
        assert not np.any(np.asarray(params.V)[0]), name


def test_huge_users_keep_each_step_release_within_its_sensitivity(problem):
    """Lemma 1 at one shared step, float32 and float64, for users far outside
    the others' range: overflowing, NaN and infinite statistics included."""
    data, truth = problem
    clips = jnp.asarray([1.0, 5.0], data.X.dtype)

    @jax.jit
    def normalized_sum(data):
        data, eligible = alg.usable_users(data, R + K)
        U = truth.U.astype(data.X.dtype)
        fits = lrs.peruser.per_user_step(data, U, None, LOCAL)
        selection = eligible.astype(data.X.dtype)
        G, H = alg.step_sums(data, U, fits, clips, selection, None)
        return jnp.concatenate([(G / clips[0]).ravel(), (H / clips[1]).ravel()])

    base = normalized_sum(data)
    cases = dict(_overflowing(data))
    cases["NaN feature"] = (data.X[0].at[0, 0].set(jnp.nan), data.y[0])
    cases["inf label"] = (data.X[0], data.y[0].at[1].set(jnp.inf))
    for name, (X0, y0) in cases.items():
        moved = normalized_sum(_with_user0(data, X0, y0))
        assert np.all(np.isfinite(np.asarray(moved))), name
        assert float(jnp.linalg.norm(base - moved)) <= 2 * (1 + 1e-5), name


@pytest.mark.parametrize("fit", FITS.values(), ids=FITS.keys())
def test_unusable_users_take_part_with_zero_weight_instead_of_refusing(fit):
    data, _ = _problem("float64")
    key = jax.random.key(11)
    empty = jnp.zeros((M,), bool)
    # User 0 with no samples is the reference: it contributes nothing.
    reference, ref_diag = fit(
        _with_user0(data, data.X[0], data.y[0], empty), CONFIG, DP, key=key
    )
    assert ref_diag.excluded[0]
    one_sample = empty.at[0].set(True)
    cases = {
        "NaN feature": (data.X[0].at[3, 2].set(jnp.nan), data.y[0], None),
        "inf label": (data.X[0], data.y[0].at[0].set(-jnp.inf), None),
        "fewer than r + k samples": (data.X[0], data.y[0], one_sample),
    }
    for name, (X0, y0, mask0) in cases.items():
        params, diag = fit(_with_user0(data, X0, y0, mask0), CONFIG, DP, key=key)
        np.testing.assert_allclose(
            np.asarray(params.U), np.asarray(reference.U), atol=1e-12, err_msg=name
        )
        assert diag.excluded[0] and not diag.excluded[1:].any(), name
        assert not np.any(np.asarray(params.V)[0]), name
        assert not np.any(np.asarray(params.B.values)[0]), name
    # NaN hidden in padding (mask False) is no reason to exclude anyone.
    padded = _with_user0(
        data, data.X[0].at[-1].set(jnp.nan), data.y[0], empty.at[:-1].set(True)
    )
    _, diag = fit(padded, CONFIG, DP, key=key)
    assert not diag.excluded.any()
    # The non-private fit still refuses such data, naming it.
    with pytest.raises(ValueError, match="NaN or inf"):
        lrs.fit(_with_user0(data, *cases["NaN feature"][:2]), CONFIG)


# ------------------------------------------------------- what is released


@pytest.mark.parametrize("fit", FITS.values(), ids=FITS.keys())
def test_by_default_nothing_exact_is_released(fit):
    data, truth = _problem("float64")
    seen = []
    _, diag = fit(
        data,
        CONFIG,
        DP,
        key=jax.random.key(0),
        truth=truth,
        callback=lambda i, info: seen.append(set(info)),
    )
    assert diag.nonprivate is None and diag.transcript is None
    # the raw-data fields of the one diagnostics type stay empty (NaN)
    assert np.all(np.isnan(diag.loss)) and np.all(np.isnan(diag.relative_error))
    assert not hasattr(diag, "clipped_fraction")
    assert all(keys == set(RELEASED) for keys in seen) and len(seen) == 3
    _, diag = fit(
        data,
        CONFIG,
        DP,
        key=jax.random.key(0),
        truth=truth,
        nonprivate_diagnostics=True,
        callback=lambda i, info: seen.append(set(info)),
    )
    assert diag.nonprivate.loss.shape == (3,) and np.all(diag.nonprivate.loss > 0)
    assert all(k.startswith("nonprivate_") for k in seen[-1] - set(RELEASED))


def test_the_transcript_holds_every_release_and_U_is_its_post_processing():
    data, truth = _problem("float64")
    params, diag = private.fit(data, CONFIG, DP, key=jax.random.key(2), transcript=True)
    tr, record = diag.transcript, diag.privacy
    steps = CONFIG.num_iters
    assert tr.U.shape == (steps + 1, D, R) and tr.G.shape == (steps, D, R)
    assert tr.H.shape == (steps, R, R) and tr.moment.shape == (D, D)
    np.testing.assert_array_equal(tr.U[-1], np.asarray(params.U))
    assert tuple(tr.clip_gradient) == record.clip_gradient
    assert tr.clip_moment == record.clip_moment
    z = record.noise_multiplier
    for i in range(steps):
        clips = jnp.asarray([tr.clip_gradient[i], tr.clip_gram[i]])
        U_next = alg.step_update(tr.U[i], tr.G[i], tr.H[i], clips, z)
        np.testing.assert_allclose(U_next, tr.U[i + 1], atol=1e-10)


@pytest.mark.parametrize("fit", FITS.values(), ids=FITS.keys())
def test_a_public_starting_U_releases_no_initialization(fit):
    data, truth = _problem("float64")
    U0 = np.asarray(truth.U) + 0.1
    _, diag = fit(data, CONFIG, DP, key=jax.random.key(3), U0=U0, transcript=True)
    record = diag.privacy
    plan = private.plan_for(CONFIG, DP, T, public_U0=True)
    assert not plan.private_init and record.compositions == plan.compositions
    assert record.clip_moment is None and diag.transcript.moment is None
    expected = np.linalg.qr(U0)[0]
    np.testing.assert_allclose(
        np.abs(diag.transcript.U[0]), np.abs(expected), atol=1e-12
    )
    assert record.epsilon <= DP.epsilon


def test_settings_the_fit_cannot_honour_are_refused_by_name():
    """From an adversarial probe: each of these ran silently (clip levels
    rounded to 0 or inf in float32) or crashed deep inside (IndexError,
    scipy's brentq) instead of naming the argument."""
    with jax.enable_x64(False):
        data, _ = lrs.synthetic.make_problem(
            jax.random.key(0), d=6, t=40, m=12, r=2, k=1
        )
        config = lrs.AMHTConfig(rank=2, sparsity=1, num_iters=2)
        key = jax.random.key(1)
        dp = functools.partial(private.DPConfig, epsilon=4.0, delta=1e-5)
        cases = [
            (config, dp(clip_gradient=1e39), "clip_gradient"),
            (config, dp(clip_moment=1e-46), "clip_moment"),
            (config, private.DPConfig(epsilon=1e6, delta=1e-5), "epsilon"),
            (config, private.DPConfig(epsilon=4.0, delta=5e-324), "delta"),
            (lrs.AMHTConfig(rank=2, sparsity=1, num_iters=0),
             private.DPConfig(epsilon=4.0, delta=1e-5), "num_iters"),
        ]  # fmt: skip
        for amht, dp, name in cases:
            with pytest.raises(ValueError, match=name):
                private.fit(data, amht, dp, key=key)
