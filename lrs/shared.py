"""The shared step and the initialization: everything that pools all users.

Shapes: X ``(t, m, d)``, y and mask ``(t, m)``, U ``(d, r)``, V ``(t, r)``,
sparse parts as ``(t, k)`` indices and values. Every pass over the data goes
through :func:`lrs.chunking.map_user_chunks`, so memory stays O(chunk m d).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lrs.chunking import map_user_chunks
from lrs.linalg import orthonormalize, spd_solve


class SharedStats(NamedTuple):
    """Diagnostics of one shared step."""

    cg_iters: jax.Array  # () int32, CG iterations (0 for dense)
    cg_residual: jax.Array  # () relative residual of the normal equations


def sparse_predictions(X, idx, val) -> jax.Array:
    """``(c, m)`` values ``<x_ij, b_i>`` from compact sparse rows ``(c, k)``."""
    return jnp.einsum(
        "cmk,ck->cm", jnp.take_along_axis(X, idx[:, None, :], axis=2), val
    )


def _rhs(data, V, idx, val, chunk_size) -> jax.Array:
    """``sum_i X_i^T (y_i - X_i b_i) v_i^T``, shape ``(d, r)``."""

    def fn(args, fresh):
        X, y, mask, v, i, b = args
        res = jnp.where(mask, y - sparse_predictions(X, i, b), 0)
        g = jnp.einsum("cmd,cm->cd", X, res)
        return None, jnp.einsum("cd,cr->dr", g * fresh[:, None], v)

    return map_user_chunks(fn, (data.X, data.y, data.mask, V, idx, val), chunk_size)[1]


def normal_operator(data, V, D, chunk_size) -> jax.Array:
    """``sum_i X_i^T X_i D v_i v_i^T`` for ``D (d, r)``: one pass over the data."""

    def fn(args, fresh):
        X, mask, v = args
        z = jnp.where(mask, jnp.einsum("cmd,cd->cm", X, v @ D.T), 0)
        g = jnp.einsum("cmd,cm->cd", X, z)
        return None, jnp.einsum("cd,cr->dr", g * fresh[:, None], v)

    return map_user_chunks(fn, (data.X, data.mask, V), chunk_size)[1]


def _dense_normal_matrix(data, V, chunk_size) -> jax.Array:
    """The ``(d r, d r)`` normal matrix in row-major ``vec(D)``; small d r only."""

    def fn(args, fresh):
        X, mask, v = args
        Z = jnp.einsum(
            "cmd,cr->cmdr", jnp.where(mask[..., None], X, 0), v * fresh[:, None]
        )
        Z = Z.reshape(-1, Z.shape[2] * Z.shape[3])
        return None, Z.T @ Z

    return map_user_chunks(fn, (data.X, data.mask, V), chunk_size)[1]


def _pcg(apply, rhs, x0, precond, max_iters: int, tol: float):
    """Preconditioned CG on matrices with the Frobenius inner product."""
    res = rhs - apply(x0)
    z = precond(res)
    rhs_norm = jnp.linalg.norm(rhs) + jnp.finfo(rhs.dtype).tiny

    def cond(c):
        i, _, res, _, _, _ = c
        return (i < max_iters) & (jnp.linalg.norm(res) > tol * rhs_norm)

    def body(c):
        i, x, res, z, p, rz = c
        Ap = apply(p)
        alpha = rz / jnp.vdot(p, Ap)
        x, res = x + alpha * p, res - alpha * Ap
        z = precond(res)
        rz_new = jnp.vdot(res, z)
        return i + 1, x, res, z, z + (rz_new / rz) * p, rz_new

    init = (jnp.zeros((), jnp.int32), x0, res, z, z, jnp.vdot(res, z))
    i, x, res, *_ = jax.lax.while_loop(cond, body, init)
    return x, i, jnp.linalg.norm(res) / rhs_norm


def update_U(data, U, V, idx, val, *, ridge, solver, max_iters, tol, chunk_size):
    """Least squares for U given V and B, then re-orthonormalization.

    Solves ``sum_i X_i^T X_i U v_i v_i^T + ridge U = sum_i X_i^T (y_i - X_i b_i) v_i^T``
    (the normal equations of the U-loss) by preconditioned conjugate gradients
    from the current ``U`` (right preconditioner ``(sum_i m_i v_i v_i^T)^-1``;
    Gaussian ``X_i^T X_i`` average to ``m_i I``) or densely.

    Returns:
      ``(U_new (d, r) orthonormal, V_new (t, r), SharedStats)`` with
      ``V_new U_new^T`` equal to ``V U_ls^T`` for the least-squares ``U_ls``.
    """
    rhs = _rhs(data, V, idx, val, chunk_size)
    d, r = U.shape
    if solver == "dense":
        G = _dense_normal_matrix(data, V, chunk_size) + ridge * jnp.eye(
            d * r, dtype=U.dtype
        )
        U_ls = spd_solve(G, rhs.reshape(-1)).reshape(d, r)
        stats = SharedStats(jnp.zeros((), jnp.int32), jnp.zeros((), U.dtype))
    else:
        counts = jnp.sum(data.mask, axis=1).astype(V.dtype)
        M = (V * counts[:, None]).T @ V + ridge * jnp.eye(r, dtype=V.dtype)
        M_inv = jnp.linalg.inv(M + 1e-12 * jnp.trace(M) * jnp.eye(r, dtype=V.dtype))

        def apply(D):
            return normal_operator(data, V, D, chunk_size) + ridge * D

        U_ls, iters, rel = _pcg(apply, rhs, U, lambda G: G @ M_inv, max_iters, tol)
        stats = SharedStats(iters, rel)
    U_new, R = orthonormalize(U_ls)
    return U_new, V @ R.T, stats


def moment_matrix(data, chunk_size) -> jax.Array:
    """``sum_ij y_ij^2 x_ij x_ij^T``, shape ``(d, d)``; one d x d in total."""

    def fn(args, fresh):
        X, y, mask = args
        Z = X * jnp.where(mask & fresh[:, None], y, 0)[..., None]
        Z = Z.reshape(-1, Z.shape[-1])
        return None, Z.T @ Z

    return map_user_chunks(fn, (data.X, data.y, data.mask), chunk_size)[1]


def moment_operator(data, Q, chunk_size) -> jax.Array:
    """``sum_ij y_ij^2 x_ij x_ij^T Q`` for ``Q (d, p)`` without forming the d x d."""

    def fn(args, fresh):
        X, y, mask = args
        w = jnp.where(mask & fresh[:, None], y * y, 0)
        P = jnp.einsum("cmd,dp->cmp", X, Q) * w[..., None]
        return None, jnp.einsum("cmd,cmp->dp", X, P)

    return map_user_chunks(fn, (data.X, data.y, data.mask), chunk_size)[1]


def moment_init(data, rank: int, key, *, eigensolver: str, iters: int, chunk_size):
    """Top-``rank`` eigenvectors of the moment matrix ``sum_ij y_ij^2 x_ij x_ij^T``.

    ``eigensolver='dense'`` forms the d x d matrix once and takes its top
    singular vectors; ``'subspace'`` runs
    ``iters`` rounds of block subspace iteration (one data pass each) with
    ``rank + 5`` columns, then a Rayleigh-Ritz step.
    """
    d = data.X.shape[2]
    if eigensolver == "dense":
        # The matrix is symmetric PSD, so its singular vectors are eigenvectors;
        # XLA's CPU SVD is ~20x faster than its eigh at d = 100.
        vecs, _, _ = jnp.linalg.svd(moment_matrix(data, chunk_size))
        U = vecs[:, :rank]
    else:
        p = min(rank + 5, d)
        Q0, _ = orthonormalize(jax.random.normal(key, (d, p), data.X.dtype))

        def body(_, Q):
            return orthonormalize(moment_operator(data, Q, chunk_size))[0]

        Q = jax.lax.fori_loop(0, iters, body, Q0)
        _, vecs = jnp.linalg.eigh(Q.T @ moment_operator(data, Q, chunk_size))
        U = Q @ vecs[:, ::-1][:, :rank]
    return orthonormalize(U)[0]
