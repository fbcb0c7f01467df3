"""Specification of lrs.baselines: each recovers its own model class."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrs
from lrs import baselines, ragged_blocks

pytestmark = pytest.mark.usefixtures("cheap_compiles")

SIZES = dict(d=20, t=40, m=20)  # one data shape for every test: few compiles
CONVEX = dict(convex_grid=(0.1, 0.03), convex_steps=150)


def _problem(seed=0, **kwargs):
    sizes = dict(SIZES, r=2, k=2, dtype="float64") | kwargs
    return lrs.synthetic.make_problem(jax.random.key(seed), **sizes)


def _error(params, truth):
    return float(lrs.metrics.relative_error(params, truth))


def test_low_rank_only_recovers_pure_low_rank():
    data, truth = _problem(k=0)
    params, diag = baselines.low_rank_only(data, lrs.AMHTConfig(rank=2, sparsity=3))
    assert params.U.shape == (20, 2) and params.B.indices.shape == (40, 0)
    assert _error(params, truth) < 1e-6
    assert diag.loss[-1] < 1e-10


def test_sparse_only_recovers_pure_sparse():
    data, truth = _problem(r=1, k=2, v_scale=0.0)
    params, diag = baselines.sparse_only(data, baselines.BaselineConfig(sparsity=2))
    assert params.U.shape == (20, 0) and params.V.shape == (40, 0)
    assert _error(params, truth) < 1e-6
    assert diag.details["sq_residual"].shape == (40,)


def test_local_ridge_matches_brute_force_leave_one_out():
    data, truth = _problem(noise=0.5)
    grid = (1e-3, 1.0, 30.0)
    params, diag = baselines.local_ridge(
        data, baselines.BaselineConfig(ridge_grid=grid)
    )
    theta = np.asarray(lrs.weights(params))
    X, y = np.asarray(data.X), np.asarray(data.y)
    for i in (0, 7):
        scale = np.trace(X[i].T @ X[i]) / X.shape[2]
        loo = []
        for a in grid:
            errs = []
            for j in range(X.shape[1]):
                keep = np.arange(X.shape[1]) != j
                A, b = X[i][keep], y[i][keep]
                w = np.linalg.solve(A.T @ A + a * scale * np.eye(20), A.T @ b)
                errs.append((y[i][j] - X[i][j] @ w) ** 2)
            loo.append(np.mean(errs))
        best = grid[int(np.argmin(loo))]
        assert diag.details["alpha"][i] == pytest.approx(best)
        assert diag.details["loo_mse"][i] == pytest.approx(min(loo), rel=1e-6)
        ref = np.linalg.solve(X[i].T @ X[i] + best * scale * np.eye(20), X[i].T @ y[i])
        np.testing.assert_allclose(theta[i], ref, rtol=1e-6, atol=1e-8)


def test_local_ridge_recovers_dense_models_without_noise():
    data, truth = _problem()  # m = d = 20: each user alone is determined
    params, _ = baselines.local_ridge(
        data, baselines.BaselineConfig(ridge_grid=(1e-12,))
    )
    assert params.B.indices.shape == (40, 20)
    assert _error(params, truth) < 1e-5


def test_global_model_recovers_shared_model_plus_sparse():
    data, truth = _problem(r=1, k=2)
    truth = truth._replace(V=jnp.full_like(truth.V, 1.5))  # the same w for all
    y = jnp.einsum("tmd,td->tm", data.X, lrs.weights(truth))
    data = data._replace(y=y)
    params, diag = baselines.global_model(data, baselines.BaselineConfig(sparsity=2))
    assert _error(params, truth) < 1e-5
    assert np.ptp(np.asarray(params.V)) == 0  # one model shared by all users


def test_global_model_without_fine_tune_is_pooled_least_squares():
    data, _ = _problem(noise=0.1)
    cfg = baselines.BaselineConfig(sparsity=2, fine_tune=False)
    params, _ = baselines.global_model(data, cfg)
    X, y = np.asarray(data.X).reshape(-1, 20), np.asarray(data.y).reshape(-1)
    w = np.linalg.lstsq(X, y, rcond=None)[0]
    np.testing.assert_allclose(np.asarray(lrs.weights(params))[3], w, rtol=1e-6)
    assert params.B.indices.shape == (40, 0)


def test_convex_beats_local_ridge_below_d_samples():
    data, truth = _problem()
    data = data._replace(mask=data.mask.at[:, 16:].set(False))  # m_i = 16 < d
    cfg = baselines.BaselineConfig(**CONVEX)
    params, diag = baselines.convex(data, cfg, key=jax.random.key(1))
    ridge, _ = baselines.local_ridge(data, cfg)
    assert _error(params, truth) < 0.8 * _error(ridge, truth)
    # the chosen penalties are the validation winner, relative to lam_max
    best = diag.details["grid"][np.argmin(diag.details["validation_sse"])]
    ratio = diag.details["penalties"] / best
    assert ratio[0] > ratio[1] > 0  # ||G||_2 > ||G||_max for a generic G
    # the LRS form holds the solution: orthonormal U, rank and row sparsity
    r = diag.details["rank"]
    np.testing.assert_allclose(params.U.T @ params.U, np.eye(r), atol=1e-8)
    assert params.B.indices.shape[1] == diag.details["sparsity"] <= 20


def test_oracle_recovers_everything_given_the_true_U():
    data, truth = _problem()
    fit = functools.partial(baselines.oracle, U=truth.U)
    params, _ = fit(data, lrs.AMHTConfig(rank=2, sparsity=2))
    assert _error(params, truth) < 1e-6
    np.testing.assert_array_equal(params.U, truth.U)


@pytest.mark.parametrize("name", sorted(baselines.BASELINES))
def test_every_baseline_shares_the_fit_contract(name):
    data, truth = _problem(noise=0.1)
    before = jax.tree.map(np.array, data)
    cfg = baselines.BaselineConfig(rank=2, sparsity=2, **CONVEX)
    params, diag = baselines.BASELINES[name](data, cfg, key=jax.random.key(0))
    assert isinstance(params, lrs.LRSParams) and isinstance(diag, lrs.Diagnostics)
    assert lrs.weights(params).shape == (40, 20)
    assert bool(jnp.isfinite(lrs.weights(params)).all())
    pred = lrs.predict(params, data.X[:, 0], jnp.arange(40))
    assert pred.shape == (40,)
    jax.tree.map(np.testing.assert_array_equal, before, data)  # inputs untouched
    with pytest.raises(ValueError, match="config"):
        baselines.BASELINES[name](data, {"rank": 2})
    with pytest.raises(ValueError, match="UserData"):
        baselines.BASELINES[name]((data.X, data.y), cfg)


@pytest.mark.parametrize(
    "field, value",
    [
        ("rank", 0),
        ("sparsity", -1),
        ("ridge_grid", ()),
        ("ridge_grid", (1.0, -1.0)),
        ("convex_grid", [0.1]),
        ("fine_tune", 1),
        ("validation_fraction", 1.0),
        ("convex_steps", 0),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        baselines.BaselineConfig(**{field: value})


def test_too_few_samples_or_bad_U_raise():
    data, truth = _problem()
    with pytest.raises(ValueError, match="samples"):
        baselines.sparse_only(
            data._replace(mask=data.mask.at[3, 2:].set(False)),
            baselines.BaselineConfig(sparsity=3),
        )
    with pytest.raises(ValueError, match="U"):
        baselines.oracle(data, lrs.AMHTConfig(2, 2), U=truth.U[:, 0])


# ------------------------------------------------------------------ ragged data

RAGGED_FITS = ("global_model", "local_ridge", "low_rank_only", "sparse_only")


def _ragged(dtype="float64", noise=0.05, seed=0):
    """Users with 20..60 samples (blocks 32 and 64 wide; few compiles),
    planted rank 2 + 2-sparse."""
    rng = np.random.default_rng(seed)
    t, d = 30, 12
    counts = rng.integers(20, 61, size=t).astype(np.int64)
    counts[:3] = (20, 60, 33)
    U = np.linalg.qr(rng.normal(size=(d, 2)))[0]
    W = rng.normal(size=(t, 2)) @ U.T
    W[np.arange(t)[:, None], rng.integers(0, d, size=(t, 2))] += 1.0
    X = rng.normal(size=(counts.sum(), d))
    users = np.repeat(np.arange(t), counts)
    y = np.einsum("nd,nd->n", X, W[users]) + noise * rng.normal(size=len(users))
    return lrs.RaggedData(X.astype(dtype), y.astype(dtype), counts)


SLOW = pytest.mark.slow  # two ~8 s compiles of the sparse fits (ragged, padded)
RAGGED_CASES = [
    pytest.param(name, dtype, fine, marks=SLOW if dtype == "float32" or heavy else ())
    for dtype in ("float64", "float32")
    for name, fine, heavy in (
        ("global_model", False, False),
        ("global_model", True, True),
        ("local_ridge", True, False),
        ("low_rank_only", True, False),
        ("sparse_only", True, True),
    )
]


@pytest.mark.parametrize("name, dtype, fine_tune", RAGGED_CASES)
def test_ragged_data_gives_the_padded_fit(name, dtype, fine_tune, monkeypatch):
    """The same fit on RaggedData as on its padded form: float64 to 1e-8.
    Tiny sum steps, so users straddle them."""
    monkeypatch.setattr(ragged_blocks, "_SUM_ROWS", 37)
    ragged = _ragged(dtype)
    cfg = baselines.BaselineConfig(rank=2, sparsity=2, num_iters=8, fine_tune=fine_tune)
    fit = baselines.BASELINES[name]
    params, diag = fit(ragged, cfg, key=jax.random.key(0))
    ref, ref_diag = fit(ragged.padded(64), cfg, key=jax.random.key(0))
    tol = 1e-8 if dtype == "float64" else 2e-3
    theta, ref_theta = np.asarray(lrs.weights(params)), np.asarray(lrs.weights(ref))
    assert theta.dtype == ref_theta.dtype == np.dtype(dtype)
    scale = np.abs(ref_theta).max()
    np.testing.assert_allclose(theta, ref_theta, rtol=0, atol=tol * scale)
    assert params.B.indices.shape == ref.B.indices.shape
    np.testing.assert_allclose(diag.loss, ref_diag.loss, rtol=10 * tol)
    for key, value in (ref_diag.details or {}).items():
        if dtype == "float64":
            np.testing.assert_allclose(diag.details[key], value, rtol=1e-6)
        elif key != "alpha":  # float32: near-equal LOO errors may pick another
            np.testing.assert_allclose(diag.details[key], value, rtol=0.1)
    jax.tree.map(np.testing.assert_array_equal, _ragged(dtype), ragged)  # untouched


def _sparse_users(ragged, hard=()):
    """``ragged`` with noiseless 2-sparse users (dense ones at ``hard``)."""
    rng = np.random.default_rng(1)
    t, d = ragged.num_users, ragged.dim
    B = np.zeros((t, d))
    B[np.arange(t)[:, None], rng.choice(d, size=(t, 2))] = 1 + rng.random((t, 2))
    B[list(hard)] = rng.normal(size=(len(hard), d))
    users = np.repeat(np.arange(t), ragged.counts)
    return ragged._replace(y=np.einsum("nd,nd->n", ragged.X, B[users])), B


def test_ragged_sparse_only_recovers_sparse_users():
    ragged, B = _sparse_users(_ragged(noise=0.0))
    params, diag = baselines.sparse_only(ragged, baselines.BaselineConfig(sparsity=2))
    np.testing.assert_allclose(lrs.weights(params), B, atol=1e-8)
    assert diag.details["sq_residual"].max() < 1e-16 and diag.loss[-1] < 1e-16


@pytest.mark.slow
def test_ragged_sparse_only_rescues_the_worst_users(monkeypatch):
    """Exactly 2-sparse users but three dense ones: the rescue runs, over all
    users (not block by block), and gives the padded fits; blocks of a few
    users (width classes split into several blocks) change nothing."""
    rescued = []
    rescue = ragged_blocks.rescue_block

    def counted(block, *args, **kwargs):
        rescued.append(block.X.shape[0])
        return rescue(block, *args, **kwargs)

    monkeypatch.setattr(ragged_blocks, "rescue_block", counted)
    monkeypatch.setattr(ragged_blocks, "_BLOCK_BYTES", 8000)
    ragged, _ = _sparse_users(_ragged(noise=0.0), hard=(3, 11, 20))
    cfg = baselines.BaselineConfig(sparsity=2)
    params, diag = baselines.sparse_only(ragged, cfg)
    ref, ref_diag = baselines.sparse_only(ragged.padded(), cfg)
    assert len(rescued) >= 2  # cold and l1 (per width class of the worst users)
    np.testing.assert_allclose(lrs.weights(params), lrs.weights(ref), atol=1e-8)
    np.testing.assert_allclose(
        diag.details["sq_residual"], ref_diag.details["sq_residual"], atol=1e-8
    )


@pytest.mark.parametrize("name", ["convex", "oracle"])
def test_ragged_data_for_padded_only_baselines_says_pass_padded(name):
    fit = baselines.BASELINES.get(name) or functools.partial(
        baselines.oracle, U=np.eye(12)[:, :2]
    )
    with pytest.raises(ValueError, match=r"padded\(m\)"):
        fit(_ragged(), baselines.BaselineConfig(rank=2))


@pytest.mark.parametrize("name", RAGGED_FITS)
def test_bad_ragged_data_names_the_argument(name):
    ragged = _ragged()
    cfg = baselines.BaselineConfig(rank=2, sparsity=2)
    fit = baselines.BASELINES[name]
    X = ragged.X.copy()
    X[5, 3] = np.nan
    with pytest.raises(ValueError, match="data.X"):
        fit(ragged._replace(X=X), cfg)
    with pytest.raises(ValueError, match="counts"):
        fit(ragged._replace(counts=ragged.counts[:-1]), cfg)
    short = ragged.counts.copy()
    short[:2] = (0, short[0] + short[1])  # user 0: no sample
    with pytest.raises(ValueError, match="user 0"):
        fit(ragged._replace(counts=short), cfg)
