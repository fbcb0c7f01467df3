"""Specification of lrs.params: SparseRows, LRSParams, weights and predict."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrs.params import LRSParams, SparseRows, predict, weights


def _random_params(rng, t=5, d=7, r=2, k=3):
    U = np.linalg.qr(rng.standard_normal((d, r)))[0]
    V = rng.standard_normal((t, r))
    idx = np.stack([rng.choice(d, k, replace=False) for _ in range(t)]).astype(np.int32)
    val = rng.standard_normal((t, k))
    return LRSParams(jnp.asarray(U), jnp.asarray(V), SparseRows(idx, val, d))


def _numpy_dense(idx, val, d):
    out = np.zeros((idx.shape[0], d))
    for i in range(idx.shape[0]):
        for j, v in zip(idx[i], val[i]):
            out[i, j] = v
    return out


def test_dense_places_each_value_at_its_column():
    idx = np.array([[2, 0], [1, 3], [3, 2]], np.int32)
    val = np.array([[1.5, -2.0], [3.0, 4.0], [-1.0, 0.5]])
    dense = np.asarray(SparseRows(jnp.asarray(idx), jnp.asarray(val), 4).dense())
    np.testing.assert_array_equal(
        dense, [[-2.0, 0, 1.5, 0], [0, 3.0, 0, 4.0], [0, 0, 0.5, -1.0]]
    )


def test_dense_random_against_numpy():
    rng = np.random.default_rng(0)
    p = _random_params(rng, t=6, d=9, k=4)
    np.testing.assert_array_equal(
        np.asarray(p.B.dense()),
        _numpy_dense(np.asarray(p.B.indices), np.asarray(p.B.values), 9),
    )


def test_dense_with_zero_stored_entries_is_zero():
    B = SparseRows(jnp.zeros((3, 0), jnp.int32), jnp.zeros((3, 0)), 5)
    dense = B.dense()
    assert dense.shape == (3, 5)
    assert not np.asarray(dense).any()


def test_weights_is_V_Ut_plus_B():
    rng = np.random.default_rng(1)
    p = _random_params(rng)
    U, V = np.asarray(p.U), np.asarray(p.V)
    expected = V @ U.T + _numpy_dense(
        np.asarray(p.B.indices), np.asarray(p.B.values), 7
    )
    np.testing.assert_allclose(np.asarray(weights(p)), expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_predict_against_numpy_formula(k):
    rng = np.random.default_rng(2)
    t, d = 5, 7
    p = _random_params(rng, t=t, d=d, k=k)
    N = 11
    X = rng.standard_normal((N, d))
    users = rng.integers(0, t, N)  # arbitrary order, repeats
    theta = np.asarray(p.V) @ np.asarray(p.U).T + _numpy_dense(
        np.asarray(p.B.indices), np.asarray(p.B.values), d
    )
    expected = np.einsum("nd,nd->n", X, theta[users])
    got = predict(p, X, users)
    assert got.shape == (N,)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12, atol=1e-12)


def test_predict_is_jittable_and_matches_weights():
    rng = np.random.default_rng(3)
    p = _random_params(rng)
    X = jnp.asarray(rng.standard_normal((4, 7)))
    users = jnp.array([4, 0, 0, 2])
    got = jax.jit(predict)(p, X, users)
    want = jnp.sum(X * weights(p)[users], axis=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12)


@pytest.mark.parametrize(
    "X, users, match",
    [
        (np.ones((3, 6)), np.zeros(3, int), r"\bX\b.*shape"),
        (np.ones(7), np.zeros(1, int), r"\bX\b.*shape"),
        (np.ones((3, 7)), np.zeros(2, int), r"\buser_ids\b.*shape"),
        (np.ones((3, 7)), np.zeros((3, 1), int), r"\buser_ids\b.*shape"),
        (np.ones((2, 7)), np.array([0, 5]), r"\buser_ids\b.*\[0, 5\)"),
        (np.ones((2, 7)), np.array([-1, 0]), r"\buser_ids\b"),
        (np.ones((2, 7)), np.array([0.0, 1.0]), r"\buser_ids\b.*integer"),
    ],
    ids=[
        "wrong-d",
        "X-1d",
        "short-users",
        "2d-users",
        "too-large",
        "negative",
        "float",
    ],
)
def test_predict_refuses_mismatched_shapes(X, users, match):
    p = _random_params(np.random.default_rng(4))
    with pytest.raises(ValueError, match=match):
        predict(p, X, users)


# -------------------------------------------------------------------------- pytree


def test_sparse_rows_pytree_round_trip_keeps_dim_static():
    rng = np.random.default_rng(5)
    B = _random_params(rng).B
    leaves, treedef = jax.tree.flatten(B)
    assert len(leaves) == 2  # indices and values; dim is static metadata
    again = jax.tree.unflatten(treedef, leaves)
    assert isinstance(again, SparseRows)
    assert again.dim == B.dim and isinstance(again.dim, int)
    np.testing.assert_array_equal(np.asarray(again.indices), np.asarray(B.indices))
    np.testing.assert_array_equal(np.asarray(again.values), np.asarray(B.values))
    doubled = jax.tree.map(lambda a: a * 2, B)
    assert isinstance(doubled, SparseRows) and doubled.dim == B.dim


def test_sparse_rows_under_jit():
    rng = np.random.default_rng(6)
    B = _random_params(rng).B
    dense = jax.jit(lambda b: b.dense())(B)
    assert dense.shape == (5, 7)  # dim stays a Python int inside jit
    np.testing.assert_array_equal(np.asarray(dense), np.asarray(B.dense()))
    out = jax.jit(lambda b: b._replace(values=b.values + 1))(B)
    assert isinstance(out, SparseRows) and out.dim == 7
    np.testing.assert_array_equal(np.asarray(out.values), np.asarray(B.values) + 1)
    # A different dim is a different static value: recompiled, not a stale shape.
    wider = jax.jit(lambda b: b.dense())(B._replace(dim=9))
    assert wider.shape == (5, 9)


def test_lrs_params_is_a_pytree():
    p = _random_params(np.random.default_rng(7))
    leaves, treedef = jax.tree.flatten(p)
    assert len(leaves) == 4  # U, V, B.indices, B.values
    again = jax.tree.unflatten(treedef, leaves)
    assert isinstance(again, LRSParams) and isinstance(again.B, SparseRows)
    w = jax.jit(weights)(p)
    np.testing.assert_allclose(np.asarray(w), np.asarray(weights(p)), rtol=1e-13)
