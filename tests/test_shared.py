"""Specification of lrs.shared (the U step, the initialization) and lrs.chunking."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrs
from lrs import shared
from lrs.chunking import map_user_chunks
from lrs.linalg import subspace_distance

pytestmark = pytest.mark.usefixtures("cheap_compiles")


@pytest.fixture(scope="module")
def problem():
    """Ragged noisy users with garbage in the padded rows (which must be ignored)."""
    data, truth = lrs.synthetic.make_problem(
        jax.random.key(3),
        d=9,
        t=23,
        m=14,
        r=2,
        k=2,
        noise=0.3,
        m_min=6,
        dtype="float64",
    )
    assert not bool(data.mask.all())
    rng = np.random.default_rng(0)
    X = np.where(
        np.asarray(data.mask)[..., None],
        np.asarray(data.X),
        rng.standard_normal(data.X.shape) * 50,
    )
    y = np.where(np.asarray(data.mask), np.asarray(data.y), 1e3)
    data = lrs.UserData(jnp.asarray(X), jnp.asarray(y), data.mask)
    # a current iterate that is not the truth
    U = np.linalg.qr(np.asarray(truth.U) + 0.3 * rng.standard_normal((9, 2)))[0]
    V = np.asarray(truth.V) + 0.2 * rng.standard_normal((23, 2))
    idx = np.asarray(truth.B.indices)
    val = np.asarray(truth.B.values) + 0.1 * rng.standard_normal((23, 2))
    return (
        data,
        truth,
        (jnp.asarray(U), jnp.asarray(V), jnp.asarray(idx), jnp.asarray(val)),
    )


def _numpy_U_ls(data, V, idx, val, ridge):
    """Least-squares U from the (d r) x (d r) normal matrix in column-major vec(U)."""
    X, y, mask = (np.asarray(a) for a in data)
    V, idx, val = np.asarray(V), np.asarray(idx), np.asarray(val)
    t, _, d = X.shape
    r = V.shape[1]
    G = ridge * np.eye(d * r)
    H = np.zeros((d, r))
    for i in range(t):
        Xi, yi = X[i][mask[i]], y[i][mask[i]]
        b = np.zeros(d)
        b[idx[i]] = val[i]
        G += np.kron(np.outer(V[i], V[i]), Xi.T @ Xi)
        H += np.outer(Xi.T @ (yi - Xi @ b), V[i])
    u = np.linalg.solve(G, H.reshape(-1, order="F"))
    return u.reshape(d, r, order="F")


def _update(problem, solver, ridge=0.0, chunk_size=None):
    data, _, (U, V, idx, val) = problem
    fn = jax.jit(
        functools.partial(
            shared.update_U,
            ridge=ridge,
            solver=solver,
            max_iters=200,
            tol=1e-13,
            chunk_size=chunk_size,
        )
    )
    return fn(data, U, V, idx, val)


@pytest.mark.parametrize("ridge", [0.0, 2.0])
def test_update_U_cg_and_dense_match_the_numpy_normal_equations(problem, ridge):
    data, _, (U, V, idx, val) = problem
    U_ls = _numpy_U_ls(data, V, idx, val, ridge)
    want = np.asarray(V) @ U_ls.T
    scale = np.abs(want).max()
    results = {}
    for solver in ("cg", "dense"):
        U_new, V_new, stats = _update(problem, solver, ridge)
        U_new, V_new = np.asarray(U_new), np.asarray(V_new)
        np.testing.assert_allclose(U_new.T @ U_new, np.eye(2), atol=1e-12)
        np.testing.assert_allclose(V_new @ U_new.T, want, atol=1e-9 * scale)
        results[solver] = (U_new, V_new, stats)
    np.testing.assert_allclose(results["cg"][0], results["dense"][0], atol=1e-9)
    np.testing.assert_allclose(results["cg"][1], results["dense"][1], atol=1e-9 * scale)
    cg_stats, dense_stats = results["cg"][2], results["dense"][2]
    assert 0 < int(cg_stats.cg_iters) <= 200
    assert float(cg_stats.cg_residual) <= 1e-13
    assert int(dense_stats.cg_iters) == 0


def test_update_U_same_for_every_chunk_size(problem):
    base = _update(problem, "cg")
    for chunk in (1, 7, 23, 230):
        got = _update(problem, "cg", chunk_size=chunk)
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(base[0]), atol=1e-10)
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(base[1]), atol=1e-10)


def test_update_U_cg_respects_max_iters(problem):
    data, _, (U, V, idx, val) = problem
    _, _, stats = shared.update_U(
        data,
        U,
        V,
        idx,
        val,
        ridge=0.0,
        solver="cg",
        max_iters=2,
        tol=1e-13,
        chunk_size=None,
    )
    assert int(stats.cg_iters) == 2
    assert float(stats.cg_residual) > 1e-13


# ------------------------------------------------------------------ initialization


def _numpy_moment_matrix(data):
    X, y, mask = (np.asarray(a) for a in data)
    w = np.where(mask, y * y, 0.0)
    return np.einsum("tm,tmd,tme->de", w, X, X)


def test_moment_matrix_and_operator_match_numpy(problem):
    data = problem[0]
    M = _numpy_moment_matrix(data)
    for chunk in (None, 7):
        got = shared.moment_matrix(data, chunk)
        np.testing.assert_allclose(np.asarray(got), M, rtol=1e-12)
        Q = np.random.default_rng(1).standard_normal((9, 4))
        np.testing.assert_allclose(
            np.asarray(shared.moment_operator(data, jnp.asarray(Q), chunk)),
            M @ Q,
            rtol=1e-11,
        )


@pytest.fixture(scope="module")
def init_problem():
    return lrs.synthetic.make_problem(
        jax.random.key(4), d=24, t=60, m=20, r=3, k=2, dtype="float64"
    )[0]


def test_moment_init_dense_is_the_top_eigenspace(init_problem):
    U = shared.moment_init(
        init_problem,
        3,
        jax.random.key(0),
        eigensolver="dense",
        iters=1,
        chunk_size=None,
    )
    U = np.asarray(U)
    assert U.shape == (24, 3)
    np.testing.assert_allclose(U.T @ U, np.eye(3), atol=1e-12)
    _, vecs = np.linalg.eigh(_numpy_moment_matrix(init_problem))
    top = vecs[:, -3:]
    assert float(subspace_distance(jnp.asarray(top), jnp.asarray(U))) < 1e-10


def test_moment_init_subspace_matches_dense(init_problem):
    lam = np.linalg.eigvalsh(_numpy_moment_matrix(init_problem))[::-1]
    # subspace iteration with rank + 5 columns converges like (lam[8] / lam[2])^iters
    iters = int(np.ceil(np.log(1e-9) / np.log(lam[8] / lam[2])))
    assert iters < 300  # the gap of this problem is large enough to test
    kw = dict(iters=iters, chunk_size=7)
    dense = shared.moment_init(
        init_problem, 3, jax.random.key(0), eigensolver="dense", **kw
    )
    sub = shared.moment_init(
        init_problem, 3, jax.random.key(0), eigensolver="subspace", **kw
    )
    np.testing.assert_allclose(
        np.asarray(sub).T @ np.asarray(sub), np.eye(3), atol=1e-12
    )
    assert float(subspace_distance(dense, sub)) < 1e-6


# ----------------------------------------------------------------------- chunking


def _chunk_fn(args, fresh):
    """Per-user outputs and fresh-user sums of a pytree of arguments."""
    X, (a, b) = args
    per_user = {"rowsum": X.sum(axis=(1, 2)) * a, "pair": (a + b, b * 2)}
    summed = {
        "count": jnp.sum(fresh.astype(jnp.int32)),
        "ids": jnp.sum(jnp.where(fresh, a, 0)),
        "outer": jnp.einsum("c,cd->d", fresh * b, X[:, 0, :]),
    }
    return per_user, summed


@pytest.mark.parametrize("t", [1, 23])
def test_map_user_chunks_same_result_for_every_chunk_size(t):
    rng = np.random.default_rng(2)
    X = jnp.asarray(rng.standard_normal((t, 3, 4)))
    a = jnp.arange(t, dtype=jnp.float64)
    b = jnp.asarray(rng.standard_normal(t))
    args = (X, (a, b))
    ref_per_user, ref_sum = _chunk_fn(args, jnp.ones(t, bool))
    for chunk in (None, 1, 7, t, 10 * t):
        per_user, summed = jax.jit(
            lambda args, c=chunk: map_user_chunks(_chunk_fn, args, c)
        )(args)
        for got, want in zip(jax.tree.leaves(per_user), jax.tree.leaves(ref_per_user)):
            assert got.shape == want.shape
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert int(summed["count"]) == t  # every user is fresh exactly once
        assert float(summed["ids"]) == t * (t - 1) / 2
        np.testing.assert_allclose(
            np.asarray(summed["outer"]), np.asarray(ref_sum["outer"]), rtol=1e-12
        )


def test_map_user_chunks_calls_fn_with_chunks_of_the_given_size():
    seen = []

    def fn(args, fresh):
        seen.append((args.shape, fresh.shape))
        return args * 2, jnp.sum(jnp.where(fresh, args, 0))

    per_user, total = map_user_chunks(fn, jnp.arange(10.0), 4)
    assert all(s == ((4,), (4,)) for s in seen)
    np.testing.assert_array_equal(np.asarray(per_user), 2 * np.arange(10.0))
    assert float(total) == 45.0
