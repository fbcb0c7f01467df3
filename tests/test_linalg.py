"""Specification of lrs.linalg: hard thresholding, QR, SPD solves, subspace angles."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lrs.linalg import (
    hard_threshold,
    orthonormalize,
    spd_solve,
    subspace_distance,
    top_k_indices,
)

pytestmark = pytest.mark.usefixtures("cheap_compiles")

# Tolerances scale with the unit roundoff of the dtype.
EPS = {np.float32: 1e-5, np.float64: 1e-12}

# --------------------------------------------------------------------- hard_threshold


@st.composite
def vector_and_k(draw):
    d = draw(st.sampled_from([1, 9]))  # few (d, k) pairs: each one compiles
    x = draw(
        hnp.arrays(
            np.float64,
            d,
            # small integers make ties (equal magnitudes, +-x) common
            elements=st.one_of(
                st.integers(-3, 3).map(float),
                # No subnormals: XLA on CPU flushes them to zero, so their
                # order among zeros is not defined (hypothesis found 2e-309).
                st.floats(
                    -1e6,
                    1e6,
                    allow_nan=False,
                    allow_infinity=False,
                    allow_subnormal=False,
                ),  # fmt: skip
            ),
        )
    )
    k = draw(st.sampled_from(sorted({1, min(3, d), d - 1 or 1, d})))
    return x, k


@settings(max_examples=30, deadline=None)
@given(vector_and_k())
def test_hard_threshold_keeps_the_k_largest_magnitudes(xk):
    x, k = xk
    idx, val = hard_threshold(jnp.asarray(x), k)
    idx, val = np.asarray(idx), np.asarray(val)
    assert idx.shape == (k,) and val.shape == (k,)
    assert idx.dtype == np.int32
    assert len(set(idx.tolist())) == k  # exactly k distinct entries
    np.testing.assert_array_equal(val, x[idx])  # values are x at those indices
    # they are the k largest magnitudes: nothing left out is larger
    left_out = np.setdiff1d(np.arange(len(x)), idx)
    if left_out.size:
        assert np.abs(x[left_out]).max() <= np.abs(val).min()
    # sorted by decreasing magnitude, ties towards the lower index
    np.testing.assert_array_equal(idx, np.argsort(-np.abs(x), kind="stable")[:k])


def test_hard_threshold_acts_row_by_row():
    x = np.random.default_rng(0).standard_normal((4, 9))
    x[2, :3] = [1.0, -1.0, 1.0]  # a row with ties
    idx, val = hard_threshold(jnp.asarray(x), 3)
    assert idx.shape == val.shape == (4, 3)
    want = np.argsort(-np.abs(x), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(np.asarray(idx), want)
    np.testing.assert_array_equal(np.asarray(val), np.take_along_axis(x, want, 1))


def test_hard_threshold_ties_go_to_the_lower_index():
    idx, val = hard_threshold(jnp.array([1.0, -2.0, 2.0, -1.0, 0.5]), 3)
    np.testing.assert_array_equal(np.asarray(idx), [1, 2, 0])
    np.testing.assert_array_equal(np.asarray(val), [-2.0, 2.0, 1.0])


@pytest.mark.parametrize("k", [1, 5, 33, 40])  # both the argmax and the sort path
def test_top_k_indices_is_a_stable_descending_argsort(k):
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, (3, 40)).astype(np.float64)  # many ties
    idx = np.asarray(top_k_indices(jnp.asarray(scores), k))
    assert idx.shape == (3, k) and idx.dtype == np.int32
    np.testing.assert_array_equal(
        idx, np.argsort(-scores, axis=1, kind="stable")[:, :k]
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hard_threshold_k_zero_is_empty(dtype):
    idx, val = hard_threshold(jnp.ones((3, 5), dtype), 0)
    assert idx.shape == (3, 0) and idx.dtype == np.int32
    assert val.shape == (3, 0) and val.dtype == dtype


# ---------------------------------------------------------------------- orthonormalize


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(5, 1), (8, 3), (6, 6)])
@pytest.mark.parametrize("seed", [0, 1])
def test_orthonormalize_is_a_qr_with_nonnegative_diagonal(dtype, shape, seed):
    A = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    Q, R = orthonormalize(jnp.asarray(A))
    Q, R = np.asarray(Q), np.asarray(R)
    assert Q.dtype == dtype and R.dtype == dtype
    assert Q.shape == shape and R.shape == (shape[1], shape[1])
    tol = 50 * EPS[dtype]
    np.testing.assert_allclose(Q.T @ Q, np.eye(shape[1]), atol=tol)
    np.testing.assert_allclose(Q @ R, A, atol=tol * np.abs(A).max())
    assert np.all(np.diag(R) >= 0)
    np.testing.assert_array_equal(np.tril(R, -1), 0)


def test_orthonormalize_is_unique_under_column_sign_flips():
    """Q is determined by the span's flag: negating A's columns negates Q's."""
    A = np.random.default_rng(2).standard_normal((7, 3))
    Q1, R1 = orthonormalize(jnp.asarray(A))
    Q2, R2 = orthonormalize(jnp.asarray(-A))
    np.testing.assert_allclose(np.asarray(Q2), -np.asarray(Q1), atol=1e-13)
    np.testing.assert_allclose(np.asarray(R2), np.asarray(R1), atol=1e-13)
    Q3, _ = orthonormalize(-jnp.eye(4)[:, :2])
    np.testing.assert_allclose(np.asarray(Q3), -np.eye(4)[:, :2], atol=1e-15)


# --------------------------------------------------------------------------- spd_solve


def _spd(rng, p, dtype, cond=10.0):
    Q = np.linalg.qr(rng.standard_normal((p, p)))[0]
    return ((Q * np.geomspace(1.0, cond, p)) @ Q.T).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ridge", [0.0, 0.7])
def test_spd_solve_matches_numpy(dtype, ridge):
    rng = np.random.default_rng(3)
    p = 6
    G = _spd(rng, p, dtype)
    for rhs_shape in [(), (3,)]:  # one right-hand side or several
        h = rng.standard_normal((p,) + rhs_shape).astype(dtype)
        x = np.asarray(spd_solve(jnp.asarray(G), jnp.asarray(h), ridge))
        assert x.dtype == dtype and x.shape == h.shape
        G64, h64 = G.astype(np.float64), h.astype(np.float64)
        want = np.linalg.solve(G64 + ridge * np.eye(p), h64)
        # condition number 10: the relative error is a few eps (plus the jitter)
        tol = 100 * EPS[dtype]
        np.testing.assert_allclose(x, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_spd_solve_singular_gram_stays_finite_and_consistent(dtype):
    """More unknowns than samples: G = Z^T Z is singular but the solve is defined."""
    rng = np.random.default_rng(4)
    Z = rng.standard_normal((2, 5))
    G = (Z.T @ Z).astype(dtype)
    h = (G @ rng.standard_normal(5)).astype(dtype)  # consistent right-hand side
    x = np.asarray(spd_solve(jnp.asarray(G), jnp.asarray(h)))
    assert np.all(np.isfinite(x))
    tol = {np.float32: 1e-2, np.float64: 1e-8}[dtype]
    np.testing.assert_allclose(G @ x, h, atol=tol * np.abs(h).max())


def test_spd_solve_zero_matrix_is_finite():
    x = spd_solve(jnp.zeros((3, 3)), jnp.zeros(3))
    np.testing.assert_array_equal(np.asarray(x), np.zeros(3))


# ------------------------------------------------------------------- subspace_distance


def _orthonormal(rng, d, r):
    return np.linalg.qr(rng.standard_normal((d, r)))[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_subspace_distance_zero_for_the_same_span(dtype):
    rng = np.random.default_rng(5)
    U = _orthonormal(rng, 9, 3)
    rotation = _orthonormal(rng, 3, 3)  # any orthogonal r x r, incl. reflections
    U1, U2 = jnp.asarray(U, dtype), jnp.asarray(U @ rotation, dtype)
    assert float(subspace_distance(U1, U2)) <= 10 * EPS[dtype]
    assert float(subspace_distance(U1, U1)) <= 10 * EPS[dtype]


def test_subspace_distance_one_for_orthogonal_spans():
    Q = _orthonormal(np.random.default_rng(6), 8, 4)
    assert float(subspace_distance(jnp.asarray(Q[:, :2]), jnp.asarray(Q[:, 2:]))) == (
        pytest.approx(1.0, abs=1e-12)
    )


@pytest.mark.parametrize("angle", [0.0, 1e-3, 0.3, np.pi / 4, 1.2, np.pi / 2])
def test_subspace_distance_is_the_sine_of_the_largest_angle(angle):
    e = np.eye(4)
    U1 = e[:, :2]  # span(e1, e2)
    # span(e1, cos a e2 + sin a e3): principal angles 0 and a
    U2 = np.stack([e[:, 0], np.cos(angle) * e[:, 1] + np.sin(angle) * e[:, 2]], 1)
    # hide the structure behind rotations of both bases and of the space
    rng = np.random.default_rng(7)
    O = _orthonormal(rng, 4, 4)
    U1, U2 = O @ U1 @ _orthonormal(rng, 2, 2), O @ U2 @ _orthonormal(rng, 2, 2)
    got = float(subspace_distance(jnp.asarray(U1), jnp.asarray(U2)))
    assert got == pytest.approx(np.sin(angle), abs=1e-12)


def test_subspace_distance_is_symmetric_and_matches_scipy():
    from scipy.linalg import subspace_angles

    rng = np.random.default_rng(8)
    U1, U2 = _orthonormal(rng, 10, 3), _orthonormal(rng, 10, 3)
    a = float(subspace_distance(jnp.asarray(U1), jnp.asarray(U2)))
    b = float(subspace_distance(jnp.asarray(U2), jnp.asarray(U1)))
    assert a == pytest.approx(b, abs=1e-12)
    assert a == pytest.approx(np.sin(subspace_angles(U1, U2).max()), abs=1e-12)
