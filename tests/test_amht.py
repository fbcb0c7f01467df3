"""Specification of lrs.amht: fit, init/step, personalize, validation, FitError.

Every distinct (config, data shape) compiles the whole fit, so the tests share a
few configurations and problems on purpose, and compile without most XLA
optimizations (several times faster to compile; the programs are tiny).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrs
from lrs import amht, peruser
from lrs.data import UserData
from lrs.linalg import orthonormalize, subspace_distance

# The library defaults (rescue included), only with room to converge.
MAIN = lrs.AMHTConfig(rank=3, sparsity=3, num_iters=60)
# Cheaper to compile (no rescue); recovers the easier problem below exactly.
FAST = lrs.AMHTConfig(rank=3, sparsity=3, num_iters=60, rescue_fraction=0.0)

# Exact recovery in float64; float32 stops at its tolerance 1e-5.
RECOVERY_TOL = {np.float64: 1e-8, np.float32: 1e-4}


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def _assert_params_close(a, b, rtol, atol):
    np.testing.assert_allclose(
        np.asarray(lrs.weights(a)), np.asarray(lrs.weights(b)), rtol=rtol, atol=atol
    )
    np.testing.assert_array_equal(
        np.sort(np.asarray(a.B.indices), 1), np.sort(np.asarray(b.B.indices), 1)
    )
    assert float(subspace_distance(a.U, b.U)) < atol


def _rel_err(params, truth):
    return float(lrs.metrics.relative_error(params, truth))


def _support(params, truth):
    return float(lrs.metrics.support_recovery(params, truth))


pytestmark = pytest.mark.usefixtures("cheap_compiles")


@pytest.fixture(scope="module")
def main_fit(small_problem):
    data, truth = small_problem
    calls = []
    params, diag = lrs.fit(
        data, MAIN, truth=truth, callback=lambda i, info: calls.append((i, info))
    )
    return params, diag, calls


@pytest.fixture(scope="module")
def easy():
    """Ragged noiseless float64 users with enough samples for pursuit alone."""
    data, truth = lrs.synthetic.make_problem(
        jax.random.key(6), d=30, t=120, m=40, m_min=34, r=3, k=3, dtype="float64"
    )
    assert int(data.counts.max()) == 40 and int(data.counts.min()) < 40
    return data, truth


@pytest.fixture(scope="module")
def easy_fit(easy):
    data, truth = easy
    return lrs.fit(data, FAST, truth=truth)


# ------------------------------------------------------------------------ recovery


def test_exact_recovery_with_the_default_solver(main_fit, small_problem):
    params, diag, _ = main_fit
    _, truth = small_problem
    assert _rel_err(params, truth) < RECOVERY_TOL[np.float64]
    assert _support(params, truth) == 1.0
    U = np.asarray(params.U)
    np.testing.assert_allclose(U.T @ U, np.eye(3), atol=1e-12)
    assert float(subspace_distance(params.U, truth.U)) < 1e-8
    assert diag.relative_error[-1] == pytest.approx(_rel_err(params, truth), rel=1e-6)
    assert diag.loss[-1] < 1e-16


def test_exact_recovery_without_rescue_on_an_easier_problem(easy, easy_fit):
    params, diag = easy_fit
    _, truth = easy
    assert _rel_err(params, truth) < RECOVERY_TOL[np.float64]
    assert _support(params, truth) == 1.0


def test_float32_recovery(easy):
    data, truth = easy
    data32 = jax.tree.map(
        lambda a: a.astype(np.float32) if a.dtype == np.float64 else a, data
    )
    truth32 = jax.tree.map(
        lambda a: a.astype(np.float32) if a.dtype == np.float64 else a, truth
    )
    params, diag = lrs.fit(data32, FAST, truth=truth32)
    assert params.U.dtype == np.float32 and params.V.dtype == np.float32
    assert params.B.values.dtype == np.float32 and params.B.indices.dtype == np.int32
    assert diag.loss.dtype == np.float32
    assert _rel_err(params, truth32) < RECOVERY_TOL[np.float32]
    assert _support(params, truth32) == 1.0


# --------------------------------------------------------------------- diagnostics


def test_diagnostics_have_the_documented_fields(main_fit):
    _, diag, _ = main_fit
    assert isinstance(diag, lrs.Diagnostics) and lrs.AMHTInfo is lrs.Diagnostics
    assert diag._fields == (
        "loss",
        "u_change",
        "cg_iters",
        "relative_error",
        "subspace_distance",
        "stop_code",
        "excluded",
        "privacy",
        "transcript",
        "nonprivate",
        "details",
    )
    # the private fits' fields are empty here
    assert diag.excluded is diag.privacy is diag.details is None
    assert diag.stop_reason in ("converged", "max_iterations")
    assert np.all(diag.stop_code[:-1] == 0) and diag.stop_code[-1] > 0
    n = len(diag.loss)
    assert 2 <= n <= MAIN.num_iters + 1
    for field in map(diag.__getattribute__, lrs.diagnostics.PER_ITERATION):
        assert isinstance(field, np.ndarray) and field.shape == (n,)
    assert np.isnan(diag.u_change[0]) and diag.cg_iters[0] == 0  # initialization
    for name in ("loss", "relative_error", "subspace_distance"):
        assert np.all(np.isfinite(getattr(diag, name))), name
    assert np.all(np.isfinite(diag.u_change[1:]))
    assert 1 <= diag.cg_iters[1] <= MAIN.cg_iters
    # CG starts from the current U: near the fixed point it has little left to do
    assert np.all((diag.cg_iters >= 0) & (diag.cg_iters <= MAIN.cg_iters))
    # stopping rule: the budget ran out or U stopped moving
    tol, _ = MAIN.tolerances(np.float64)
    assert n - 1 == MAIN.num_iters or diag.u_change[-1] < tol
    assert np.all(diag.u_change[1:-1] >= tol)
    assert diag.loss[-1] < 1e-12 * diag.loss[0]


def test_callback_is_called_once_per_diagnostics_entry(main_fit):
    _, diag, calls = main_fit
    assert [i for i, _ in calls] == list(range(len(diag.loss)))
    for i, info in calls:
        assert isinstance(info, lrs.AMHTInfo)
        assert isinstance(info.loss, float) and isinstance(info.cg_iters, int)
        for name in ("loss", "relative_error", "subspace_distance", "cg_iters"):
            assert getattr(info, name) == pytest.approx(getattr(diag, name)[i]), name
        if i > 0:
            assert info.u_change == pytest.approx(diag.u_change[i])


@pytest.fixture(scope="module")
def chunked_fit(easy):
    """Chunks of 7 users (7 does not divide t = 120), and no truth."""
    data, _ = easy
    return lrs.fit(data, dataclasses.replace(FAST, user_chunk_size=7))


def test_without_truth_the_error_columns_are_nan(chunked_fit):
    _, diag = chunked_fit
    assert np.all(np.isnan(diag.relative_error))
    assert np.all(np.isnan(diag.subspace_distance))
    assert np.all(np.isfinite(diag.loss)) and np.all(np.isfinite(diag.u_change[1:]))


def test_user_chunk_size_7_gives_the_same_fit_as_one_chunk(chunked_fit, easy_fit):
    """Same iterates all along (not just the same limit): chunking is exact."""
    params, diag = chunked_fit
    ref_params, ref_diag = easy_fit
    assert len(diag.loss) == len(ref_diag.loss)
    np.testing.assert_allclose(diag.loss, ref_diag.loss, rtol=1e-6, atol=1e-20)
    np.testing.assert_allclose(diag.u_change, ref_diag.u_change, rtol=1e-5, atol=1e-12)
    _assert_params_close(params, ref_params, rtol=1e-8, atol=1e-9)


def test_sparsity_zero_is_plain_low_rank_regression():
    data, truth = lrs.synthetic.make_problem(
        jax.random.key(2), d=10, t=30, m=20, r=2, k=0, dtype="float64"
    )
    params, _ = lrs.fit(data, lrs.AMHTConfig(rank=2, sparsity=0, num_iters=60))
    assert params.B.indices.shape == (30, 0) and params.B.values.shape == (30, 0)
    assert _rel_err(params, truth) < RECOVERY_TOL[np.float64]


# ---------------------------------------------------------- same result, other data


def test_ragged_users_equal_the_same_users_padded_more(easy, easy_fit):
    """Padding is masked out: extra padded rows (even non-zero ones) change nothing."""
    data, truth = easy
    counts = data.counts
    Xs = [np.asarray(data.X[i, :c]) for i, c in enumerate(counts)]
    ys = [np.asarray(data.y[i, :c]) for i, c in enumerate(counts)]
    ragged = UserData.from_ragged(Xs, ys)
    for got, want in zip(ragged, data):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    t, m, d = data.X.shape
    rng = np.random.default_rng(0)
    X = rng.standard_normal((t, m + 1, d)) * 10  # garbage in every padded row
    y = rng.standard_normal((t, m + 1)) * 10
    mask = np.zeros((t, m + 1), bool)
    for i, c in enumerate(counts):
        X[i, :c], y[i, :c], mask[i, :c] = Xs[i], ys[i], True
    padded = UserData(jnp.asarray(X), jnp.asarray(y), jnp.asarray(mask))
    np.testing.assert_array_equal(padded.counts, counts)

    params_r, diag_r = lrs.fit(ragged, FAST, truth=truth)
    params_p, diag_p = lrs.fit(padded, FAST, truth=truth)
    np.testing.assert_allclose(diag_p.loss, diag_r.loss, rtol=1e-6, atol=1e-20)
    _assert_params_close(params_p, params_r, rtol=1e-8, atol=1e-9)


def test_from_long_round_trip_then_fit_gives_the_same_result(easy, easy_fit):
    data, truth = easy
    users, X, y = data.to_long()
    rng = np.random.default_rng(1)
    ids = 1000 - 7 * users  # not 0..t-1, and in the opposite order
    slots = rng.permutation(ids)  # shuffle rows, keeping each user's order
    order = np.empty(len(ids), int)
    for u in np.unique(ids):
        order[slots == u] = np.flatnonzero(ids == u)
    again = UserData.from_long(ids[order], X[order], y[order])
    # user i of the result is the i-th smallest id, i.e. user t - 1 - i of data
    flip = slice(None, None, -1)
    for got, want in zip(again, data):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want)[flip])
    truth_flipped = lrs.LRSParams(
        truth.U,
        truth.V[flip],
        lrs.SparseRows(truth.B.indices[flip], truth.B.values[flip], truth.B.dim),
    )
    params, diag = lrs.fit(again, FAST, truth=truth_flipped)
    ref, ref_diag = easy_fit
    np.testing.assert_allclose(
        np.asarray(lrs.weights(params)), np.asarray(lrs.weights(ref))[flip], atol=1e-9
    )
    np.testing.assert_allclose(diag.relative_error, ref_diag.relative_error, rtol=1e-5)


def test_determinism_bitwise(small_problem, main_fit):
    data, truth = small_problem
    params, diag, _ = main_fit
    again, diag_again = lrs.fit(data, MAIN, truth=truth, callback=lambda i, info: None)
    for a, b in zip(_leaves(again), _leaves(params)):
        assert np.array_equal(a, b)
    for name in lrs.diagnostics.PER_ITERATION:
        a, b = getattr(diag_again, name), getattr(diag, name)
        assert np.array_equal(a, b, equal_nan=True), name


# --------------------------------------------------------------------- init / step


@pytest.mark.slow
def test_step_jitted_equals_eager():
    data, _ = lrs.synthetic.make_problem(
        jax.random.key(7), d=6, t=5, m=6, r=1, k=1, noise=0.1, dtype="float64"
    )
    # kept small (the eager step runs op by op): chunks of 2 of 5 users, CG
    config = lrs.AMHTConfig(
        rank=1,
        sparsity=1,
        inner_steps=1,
        cg_iters=3,
        rescue_fraction=0.0,
        user_chunk_size=2,
    )
    state = jax.jit(lrs.init, static_argnames="config")(data, config, jax.random.key(0))
    jitted, info_j = jax.jit(lrs.step, static_argnames="config")(state, data, config)
    with jax.disable_jit():
        eager, info_e = lrs.step(state, data, config)
    assert isinstance(jitted, lrs.AMHTState) and isinstance(info_j, lrs.AMHTInfo)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
    for a, b in zip(info_j, info_e):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
    assert int(jitted.half_step) == int(state.half_step) + 2
    assert float(jitted.loss) <= float(state.loss)


def test_random_init_recovers(easy):
    data, truth = easy
    config = dataclasses.replace(FAST, init="random")
    seen = []
    params, diag = lrs.fit(
        data,
        config,
        truth=truth,
        key=jax.random.key(3),
        callback=lambda i, info: seen.append(info.subspace_distance),
    )
    assert seen[0] > 0.5  # a random start is far from U*
    assert _rel_err(params, truth) < RECOVERY_TOL[np.float64]
    assert _support(params, truth) == 1.0


def test_given_U0_is_used_and_recovers(easy):
    data, truth = easy
    rng = np.random.default_rng(2)
    U0 = np.asarray(truth.U) * 3 + 0.2 * rng.standard_normal((30, 3))  # not orthonormal
    U0_before = U0.copy()
    params, diag = lrs.fit(data, FAST, U0=U0, truth=truth)
    np.testing.assert_array_equal(U0, U0_before)
    start = float(subspace_distance(orthonormalize(jnp.asarray(U0))[0], truth.U))
    assert diag.subspace_distance[0] == pytest.approx(start, rel=1e-9)
    assert _rel_err(params, truth) < RECOVERY_TOL[np.float64]


def test_public_init_starts_from_U0(easy):
    data, truth = easy
    rng = np.random.default_rng(4)
    U0 = np.asarray(truth.U) + 0.1 * rng.standard_normal((30, 3))
    state = lrs.init(data, FAST, jax.random.key(0), U0=jnp.asarray(U0))
    assert float(subspace_distance(state.U, orthonormalize(jnp.asarray(U0))[0])) < 1e-12


def test_fresh_samples_still_recover_with_enough_samples():
    data, truth = lrs.synthetic.make_problem(
        jax.random.key(8), d=30, t=120, m=80, r=3, k=3, dtype="float64"
    )
    params, diag = lrs.fit(
        data, dataclasses.replace(FAST, fresh_samples=2), truth=truth
    )
    assert _rel_err(params, truth) < RECOVERY_TOL[np.float64]
    assert _support(params, truth) == 1.0


def test_batch_mask_splits_each_users_samples_into_disjoint_blocks():
    mask = np.zeros((3, 7), bool)
    for i, c in enumerate([7, 6, 4]):
        mask[i, :c] = True
    data = UserData(jnp.zeros((3, 7, 2)), jnp.zeros((3, 7)), jnp.asarray(mask))
    config = lrs.AMHTConfig(rank=1, sparsity=0, fresh_samples=3)
    blocks = [np.asarray(amht._batch_mask(data, config, h)) for h in range(3)]
    np.testing.assert_array_equal(sum(b.astype(int) for b in blocks), mask)  # disjoint
    for h in range(3, 6):  # reused cyclically
        np.testing.assert_array_equal(
            np.asarray(amht._batch_mask(data, config, h)), blocks[h % 3]
        )
    for b in blocks:  # near-equal contiguous blocks
        assert np.all(b.sum(1) >= np.array([7, 6, 4]) // 3)


# --------------------------------------------------------------------- personalize


def test_personalize_recovers_new_users_of_the_same_U(small_problem, main_fit):
    _, truth = small_problem
    params, _, _ = main_fit
    key_v, key_s, key_b, key_x = jax.random.split(jax.random.key(9), 4)
    t_new, m, d = 40, 30, 30
    V = jax.random.normal(key_v, (t_new, 3), jnp.float64)
    B = lrs.SparseRows(
        lrs.synthetic.random_supports(key_s, t_new, d, 3),
        jax.random.normal(key_b, (t_new, 3), jnp.float64),
        d,
    )
    new_truth = lrs.LRSParams(truth.U, V, B)
    X = jax.random.normal(key_x, (t_new, m, d), jnp.float64)
    y = jnp.einsum("tmd,td->tm", X, lrs.weights(new_truth))
    V_hat, B_hat = lrs.personalize(params.U, UserData.from_arrays(X, y), MAIN)
    assert V_hat.shape == (t_new, 3) and isinstance(B_hat, lrs.SparseRows)
    assert B_hat.dim == d and B_hat.indices.shape == (t_new, 3)
    fitted = lrs.LRSParams(params.U, V_hat, B_hat)
    assert _support(fitted, new_truth) == 1.0
    assert _rel_err(fitted, new_truth) < RECOVERY_TOL[np.float64]


def test_personalize_validates_its_arguments(small_problem):
    data, truth = small_problem
    with pytest.raises(ValueError, match=r"\bU\b.*shape"):
        lrs.personalize(truth.U[:, :2], data, MAIN)
    bad = data._replace(X=data.X.at[0, 0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match=r"data_new\.X.*NaN"):
        lrs.personalize(truth.U, bad, MAIN)


# ---------------------------------------------------------------------- validation


def _tiny(t=4, m=8, d=6, dtype=np.float64):
    rng = np.random.default_rng(0)
    return UserData(
        rng.standard_normal((t, m, d)).astype(dtype),
        rng.standard_normal((t, m)).astype(dtype),
        np.ones((t, m), bool),
    )


def _short_user():
    data = _tiny()
    mask = np.ones((4, 8), bool)
    mask[2, 3:] = False  # user 2 has 3 samples < rank + sparsity = 4
    return data._replace(mask=mask)


def _complex():
    data = _tiny()
    return data._replace(X=data.X.astype(complex))


def _nan(field):
    data = _tiny()
    arr = getattr(data, field).copy()
    arr.flat[5] = np.nan if field != "mask" else arr.flat[5]
    return data._replace(**{field: arr})


@pytest.mark.parametrize(
    "make_data, config_kw, match",
    [
        (_tiny, dict(rank=6, sparsity=0), r"\brank\b.*< d = 6"),
        (_tiny, dict(rank=7, sparsity=0), r"\brank\b.*< d = 6"),
        (_tiny, dict(rank=1, sparsity=6), r"\bsparsity\b.*< d = 6"),
        (_short_user, dict(rank=2, sparsity=2), r"rank \+ sparsity.*user 2 \(3\)"),
        (_tiny, dict(rank=2, sparsity=1, fresh_samples=3), r"fresh_samples.*user 0"),
        (lambda: _nan("X"), dict(rank=2, sparsity=1), r"data\.X.*NaN"),
        (lambda: _nan("y"), dict(rank=2, sparsity=1), r"data\.y.*NaN"),
        (_complex, dict(rank=2, sparsity=1), r"data\.X.*real"),
        (
            lambda: _tiny()._replace(y=np.ones((4, 7))),
            dict(rank=2, sparsity=1),
            r"data\.y",
        ),
        (
            lambda: _tiny()._replace(mask=np.ones((4, 7), bool)),
            dict(rank=2, sparsity=1),
            r"data\.mask",
        ),
        (
            lambda: _tiny()._replace(mask=np.ones((4, 8), int)),
            dict(rank=2, sparsity=1),
            r"data\.mask.*boolean",
        ),
        (
            lambda: _tiny()._replace(X=np.ones((4, 8))),
            dict(rank=2, sparsity=1),
            r"data\.X.*shape",
        ),
        (lambda: _tiny(t=0), dict(rank=2, sparsity=1), r"\bdata\b.*zero users"),
        (
            lambda: (np.ones((4, 8, 6)), np.ones((4, 8))),
            dict(rank=2, sparsity=1),
            r"\bdata\b.*UserData",
        ),
        (_tiny, dict(rank=2, sparsity=1, U0=np.ones((5, 2))), r"\bU0\b.*shape"),
        (_tiny, dict(rank=2, sparsity=1, U0=np.ones((6, 2))), r"\bU0\b.*rank"),
        (
            _tiny,
            dict(rank=2, sparsity=1, U0=np.full((6, 2), np.nan)),
            r"\bU0\b.*NaN",
        ),
    ],
    ids=[
        "rank=d",
        "rank>d",
        "sparsity=d",
        "short-user",
        "short-for-fresh-samples",
        "nan-X",
        "nan-y",
        "complex-X",
        "y-shape",
        "mask-shape",
        "mask-dtype",
        "X-2d",
        "zero-users",
        "not-UserData",
        "U0-shape",
        "U0-rank-deficient",
        "U0-nan",
    ],
)
def test_fit_refuses_bad_input_naming_the_argument(make_data, config_kw, match):
    config_kw = dict(config_kw)
    U0 = config_kw.pop("U0", None)
    config = lrs.AMHTConfig(**config_kw)
    with pytest.raises(ValueError, match=match):
        lrs.fit(make_data(), config, U0=U0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rank=0, sparsity=1), r"\brank\b.*>= 1"),
        (dict(rank=-1, sparsity=1), r"\brank\b.*>= 1"),
        (dict(rank=2, sparsity=-1), r"\bsparsity\b.*>= 0"),
        (dict(rank=2, sparsity=1, init="given"), r"\binit\b"),
    ],
)
def test_bad_rank_sparsity_or_init_are_refused_by_the_config(kw, match):
    with pytest.raises(ValueError, match=match):
        lrs.AMHTConfig(**kw)


def test_fit_refuses_a_non_config_and_a_mismatched_truth(small_problem):
    data, truth = small_problem
    with pytest.raises(ValueError, match=r"\bconfig\b.*AMHTConfig"):
        lrs.fit(data, {"rank": 3, "sparsity": 3})
    wrong = truth._replace(V=truth.V[:-1])
    with pytest.raises(ValueError, match=r"\btruth\b"):
        lrs.fit(data, MAIN, truth=wrong)


def test_fit_does_not_modify_its_inputs(easy, easy_fit):
    data, truth = easy
    X, y, mask = (np.array(a) for a in data)  # writable numpy copies
    before = [a.copy() for a in (X, y, mask)]
    params, _ = lrs.fit(UserData(X, y, mask), FAST, truth=truth)
    for a, b in zip((X, y, mask), before):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    for a, b in zip(_leaves(params), _leaves(easy_fit[0])):
        assert np.array_equal(a, b)


def test_fit_converts_integer_data_without_modifying_it(easy):
    data, truth = easy
    X = np.round(np.asarray(data.X) * 4).astype(np.int32)  # integer features
    y = np.asarray(data.y)
    X0 = X.copy()
    params, diag = lrs.fit(UserData(X, y, np.asarray(data.mask)), FAST, truth=truth)
    assert params.U.dtype == np.float64 and diag.loss.dtype == np.float64
    assert X.dtype == np.int32
    np.testing.assert_array_equal(X, X0)


# ------------------------------------------------------------------------ FitError


@pytest.mark.parametrize(
    "scale, config, first_bad",
    [
        # sum y^2 x x^T overflows: the moment initialization is already inf/NaN
        (1e200, MAIN, 0),
        # the first per-user Gram matrices overflow (the CG U-step is scaled to
        # the features, so it no longer overflows first: 1e150 fits)
        (1e160, dataclasses.replace(FAST, init="random"), 0),
    ],
    ids=["moments-overflow", "per-user-overflow"],
)
def test_non_finite_fit_raises_fit_error_naming_the_iteration(
    small_problem, easy, scale, config, first_bad
):
    data, truth = small_problem if config is MAIN else easy
    huge = data._replace(X=data.X * scale)
    assert bool(jnp.isfinite(huge.X).all())  # finite input: validation lets it in
    seen = []
    with pytest.raises(lrs.FitError, match=rf"iteration {first_bad}\b"):
        lrs.fit(
            huge,
            config,
            truth=truth,
            key=jax.random.key(3),
            callback=lambda i, info: seen.append((i, info.loss)),
        )
    # the iteration named is the first one whose loss the callback saw non-finite
    assert [i for i, _ in seen] == list(range(first_bad + 1))
    assert all(np.isfinite(loss) for _, loss in seen[:-1])
    assert not np.isfinite(seen[-1][1])


def test_overflowing_gram_matrices_are_not_a_silent_zero_fit(easy):
    data, truth = easy
    scale = 1e154
    huge = data._replace(X=data.X * scale)  # same y: theta* / scale fits exactly
    truth_scaled = lrs.LRSParams(
        truth.U,
        truth.V / scale,
        truth.B._replace(values=truth.B.values / scale),
    )
    config = dataclasses.replace(FAST, init="random")
    try:
        params, _ = lrs.fit(
            huge,
            config,
            truth=truth_scaled,
            key=jax.random.key(3),
            callback=lambda i, info: None,
        )
    except lrs.FitError:
        return  # refusing is acceptable
    assert _rel_err(params, truth_scaled) < 1e-3  # otherwise the answer must be right


# -------------------------------------------------------- chunked per-user step


def test_per_user_step_is_chunk_independent_and_consistent():
    """Users 6 and 7 start from a wrong support; chunks of 3 overlap at the end.

    The rescue must not depend on which chunk a user falls in, and every returned
    sq_residual must be the residual of the returned (v, support, b).
    """
    data, truth = lrs.synthetic.make_problem(
        jax.random.key(3), d=20, t=10, m=12, r=2, k=2, dtype="float64"
    )
    warm = np.array(truth.B.indices)
    for u in (6, 7):
        warm[u] = [i for i in range(20) if i not in warm[u]][:2]
    step = jax.jit(amht.per_user_step, static_argnames="config")
    results = []
    for chunk in (None, 3):
        config = lrs.AMHTConfig(
            rank=2,
            sparsity=2,
            inner_steps=0,
            user_chunk_size=chunk,
            l1_steps=0,
            rescue_fraction=0.2,
        )
        fits = step(data, truth.U, jnp.asarray(warm), config)
        fitted = lrs.LRSParams(
            truth.U, fits.v, lrs.SparseRows(fits.support, fits.b, 20)
        )
        pred = jnp.einsum("tmd,td->tm", data.X, lrs.weights(fitted))
        np.testing.assert_allclose(
            np.asarray(fits.sq_residual),
            np.sum(np.asarray(data.y - pred) ** 2, axis=1),
            rtol=1e-8,
            atol=1e-20,
        )
        results.append(fits)
    sq = np.asarray(results[0].sq_residual)
    assert np.all(np.delete(sq, [6, 7]) < 1e-16)  # the others kept the truth
    # the rescue (a cold start, then pursuit) improved both wrong starts
    X, y = np.asarray(data.X), np.asarray(data.y)
    for u in (6, 7):
        start = peruser.lstsq_on_support(X[u] @ truth.U, X[u], y[u], warm[u])
        assert sq[u] < 0.5 * float(start.sq_residual)
    for fits in results[1:]:
        for a, b in zip(jax.tree.leaves(fits), jax.tree.leaves(results[0])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-12)


# ------------------------------------------------------------ scale of the labels


@pytest.mark.parametrize("scale", [pytest.param(1e-12, marks=pytest.mark.slow), 1e12])
def test_fit_is_invariant_to_the_scale_of_the_labels(scale):
    """float32 statistics of y^2 must neither overflow nor underflow."""
    data, truth = lrs.synthetic.make_problem(
        jax.random.key(5), d=12, t=40, m=16, r=2, k=1, dtype="float32"
    )
    config = lrs.AMHTConfig(rank=2, sparsity=1, num_iters=30)
    base, base_diag = lrs.fit(data, config, truth=truth)
    scaled_truth = lrs.LRSParams(
        truth.U, truth.V * scale, truth.B._replace(values=truth.B.values * scale)
    )
    params, diag = lrs.fit(data._replace(y=data.y * scale), config, truth=scaled_truth)
    assert len(diag.loss) == len(base_diag.loss)
    assert _rel_err(params, scaled_truth) < 1e-4
    assert diag.loss[-1] == pytest.approx(base_diag.loss[-1] * scale**2, rel=0.5)
    V, B = lrs.personalize(truth.U, data._replace(y=data.y * scale), config)
    assert _rel_err(lrs.LRSParams(truth.U, V, B), scaled_truth) < 1e-4


def test_personalize_refuses_a_non_finite_U(small_problem):
    data, truth = small_problem
    U = np.array(truth.U)
    U[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"\bU\b.*NaN"):
        lrs.personalize(U, data, lrs.AMHTConfig(rank=3, sparsity=3))


def test_support_comparison_needs_the_same_sparsity(small_problem):
    _, truth = small_problem
    fewer = truth.B._replace(
        indices=truth.B.indices[:, :2], values=truth.B.values[:, :2]
    )
    with pytest.raises(ValueError, match="sparse shape"):
        lrs.metrics.support_recovery(truth._replace(B=fewer), truth)


def test_make_problem_draws_each_users_features_from_its_own_key():
    """X is generated in chunks of users; a prime t (no divisor) must not matter."""
    key, t, m, d = jax.random.key(2), 13, 4, 5
    data, _ = lrs.synthetic.make_problem(key, d=d, t=t, m=m, r=1, k=1)
    kx = jax.random.split(key, 7)[4]  # make_problem's feature key
    expected = jax.vmap(lambda k: jax.random.normal(k, (m, d), data.X.dtype))(
        jax.random.split(kx, t)
    )
    np.testing.assert_array_equal(np.asarray(data.X), np.asarray(expected))


def test_noisy_fit_stops_at_a_fixed_point_of_the_exact_dense_step():
    """Inexact CG used to stop at zero iterations once its loose tolerance was
    met, U stood still and the U-change rule called it converged (8 iterations,
    0.01 away from the exact step's fixed point). Every shared step now takes at
    least one CG iteration with a tolerance tied to the last U change, so
    'converged' means: a few exact dense U steps (plus per-user steps) from the
    final state do not move U."""
    data, _ = lrs.synthetic.make_problem(
        jax.random.key(0), d=30, t=400, m=30, r=3, k=3, noise=0.3, dtype="float64"
    )
    config = lrs.AMHTConfig(rank=3, sparsity=3, num_iters=60)
    params, diag = lrs.fit(data, config)
    assert diag.stop_reason == "converged"
    assert np.all(diag.cg_iters[1:] >= 1)
    assert diag.u_change[-1] < config.tolerances(np.float64)[0]
    fits = peruser.per_user_step(data, params.U, params.B.indices, config)
    state = amht.AMHTState(
        params.U,
        fits.v,
        fits.support,
        fits.b,
        jnp.zeros(()),
        peruser.relative_residual(data, fits.sq_residual),
        jnp.asarray(2, jnp.int32),
    )
    dense = dataclasses.replace(config, u_solver="dense")
    step = jax.jit(amht.step, static_argnames="config")
    for _ in range(3):
        state, _ = step(state, data, dense)
    assert float(subspace_distance(params.U, state.U)) < 1e-8


def test_stop_reason_says_why_the_fit_stopped(easy):
    data, _ = easy
    # out of budget
    _, diag = lrs.fit(data, dataclasses.replace(FAST, num_iters=2))
    assert diag.stop_reason == "max_iterations" and len(diag.loss) == 3
    np.testing.assert_array_equal(diag.stop_code, [0, 0, 2])
    # tol = 0 is never met: U hovers at rounding level, the fit stalls
    _, diag = lrs.fit(data, dataclasses.replace(FAST, tol=0.0, stall_iters=3))
    assert diag.stop_reason == "stalled" and len(diag.loss) < FAST.num_iters + 1
    best = np.minimum.accumulate(diag.u_change[1:])
    assert np.all(best[-3:] == best[-4])  # no new minimum in the last 3


def test_stop_code_rule():
    code = functools.partial(amht.stop_code, num_iters=10, tol=1e-3, stall=3)
    assert int(code(0, change=np.inf, best=np.inf, since_best=1, loss=1.0)) == 0
    assert int(code(4, change=1e-4, best=1e-4, since_best=0, loss=1.0)) == 1
    assert int(code(10, change=1e-2, best=1e-2, since_best=0, loss=1.0)) == 2
    assert int(code(10, change=1e-4, best=1e-4, since_best=0, loss=1.0)) == 1
    assert int(code(5, change=1e-2, best=1e-2, since_best=3, loss=1.0)) == 3
    assert int(code(5, change=1e-2, best=1e-2, since_best=0, loss=np.nan)) == 4
    assert lrs.AMHTInfo(*[np.zeros(3)] * 5, np.array([0, 0, 3])).stop_reason == (
        "stalled"
    )
