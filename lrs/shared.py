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
from lrs.sharding import psum


class SharedStats(NamedTuple):
    """Diagnostics of one shared step."""

    cg_iters: jax.Array  # () int32, CG iterations (0 for dense)
    cg_residual: jax.Array  # () relative residual of the normal equations


def sparse_predictions(X, idx, val) -> jax.Array:
    """``(c, m)`` values ``<x_ij, b_i>`` from compact sparse rows ``(c, k)``."""
    return jnp.einsum(
        "cmk,ck->cm", jnp.take_along_axis(X, idx[:, None, :], axis=2), val
    )


def _rhs(data, V, idx, val, chunk_size, axis=None) -> jax.Array:
    """``sum_i X_i^T (y_i - X_i b_i) v_i^T``, shape ``(d, r)``."""

    def fn(args, fresh):
        X, y, mask, v, i, b = args
        res = jnp.where(mask, y - sparse_predictions(X, i, b), 0)
        g = jnp.einsum("cmd,cm->cd", X, res)
        return None, jnp.einsum("cd,cr->dr", g * fresh[:, None], v)

    args = (data.X, data.y, data.mask, V, idx, val)
    return map_user_chunks(fn, args, chunk_size, axis=axis)[1]


def rhs_and_product(data, V, residual, low_rank, chunk_size, axis=None):
    """``(rhs, A(U))`` of the U step from the current fit's predictions.

    ``residual (t, m)`` and ``low_rank (t, m)`` are each user's
    ``y_i - X_i U v_i - X_i b_i`` and ``X_i U v_i`` (as
    :class:`lrs.peruser.UserCache`): then ``rhs = sum_i X_i^T (y_i - X_i
    b_i) v_i^T = sum_i X_i^T (r_i + z_i) v_i^T`` and the normal operator at
    ``U`` is ``sum_i X_i^T z_i v_i^T``: two products ``X_i^T (.)`` per user,
    where :func:`_rhs` and :func:`normal_operator` at ``U`` gather ``X_i b_i``
    and form ``X_i U v_i`` again. Samples outside ``data.mask`` are ignored.
    """

    def fn(args, fresh):
        X, mask, v, res, low = args
        low = jnp.where(mask, low, 0)
        v = v * fresh[:, None]
        # two products of one vector each: on XLA:CPU faster than one of two
        g_rhs = jnp.einsum("cmd,cm->cd", X, jnp.where(mask, res, 0) + low)
        g_low = jnp.einsum("cmd,cm->cd", X, low)
        return None, (g_rhs.T @ v, g_low.T @ v)

    args = (data.X, data.mask, V, residual, low_rank)
    return map_user_chunks(fn, args, chunk_size, axis=axis)[1]


def normal_operator(data, V, D, chunk_size, axis=None) -> jax.Array:
    """``sum_i X_i^T X_i D v_i v_i^T`` for ``D (d, r)``: one pass over the data."""

    def fn(args, fresh):
        X, mask, v = args
        z = jnp.where(mask, jnp.einsum("cmd,cd->cm", X, v @ D.T), 0)
        g = jnp.einsum("cmd,cm->cd", X, z)
        return None, jnp.einsum("cd,cr->dr", g * fresh[:, None], v)

    return map_user_chunks(fn, (data.X, data.mask, V), chunk_size, axis=axis)[1]


def _dense_normal_matrix(data, V, chunk_size, axis=None) -> jax.Array:
    """The ``(d r, d r)`` normal matrix in row-major ``vec(D)``; small d r only."""

    def fn(args, fresh):
        X, mask, v = args
        Z = jnp.einsum(
            "cmd,cr->cmdr", jnp.where(mask[..., None], X, 0), v * fresh[:, None]
        )
        Z = Z.reshape(-1, Z.shape[2] * Z.shape[3])
        return None, Z.T @ Z

    return map_user_chunks(fn, (data.X, data.mask, V), chunk_size, axis=axis)[1]


def _pcg(
    apply,
    rhs,
    x0,
    precond,
    max_iters: int,
    tol,
    while_loop=jax.lax.while_loop,
    applied_x0=None,
):
    """Preconditioned CG on matrices with the Frobenius inner product
    (``applied_x0``: ``apply(x0)`` if already computed)."""
    res = rhs - (apply(x0) if applied_x0 is None else applied_x0)
    z = precond(res)
    rhs_norm = jnp.linalg.norm(rhs) + jnp.finfo(rhs.dtype).tiny

    def cond(c):
        i, _, res, _, _, rz, alive = c
        # At least one iteration: a step that stops before moving would let the
        # fit read "U did not change" as converged (issue 16).
        unmet = (i < 1) | (jnp.linalg.norm(res) > tol * rhs_norm)
        return alive & (i < max_iters) & unmet

    def body(c):
        i, x, res, z, p, rz, _ = c
        Ap = apply(p)
        curvature = jnp.vdot(p, Ap)
        # Breakdown (a singular system, e.g. fewer users than the rank, or a
        # direction the float precision cannot resolve): stop at the current x.
        alive = (curvature > 0) & (rz > 0) & jnp.isfinite(curvature)
        alpha = jnp.where(alive, rz / jnp.where(alive, curvature, 1), 0)
        x, res = x + alpha * p, res - alpha * Ap
        z = precond(res)
        rz_new = jnp.vdot(res, z)
        beta = jnp.where(alive, rz_new / jnp.where(alive, rz, 1), 0)
        return i + alive.astype(i.dtype), x, res, z, z + beta * p, rz_new, alive

    rz0 = jnp.vdot(res, z)
    init = (jnp.zeros((), jnp.int32), x0, res, z, z, rz0, jnp.isfinite(rz0))
    i, x, res, *_ = while_loop(cond, body, init)
    return x, i, jnp.linalg.norm(res) / rhs_norm


def update_U(
    data,
    U,
    V,
    idx,
    val,
    *,
    ridge,
    solver,
    max_iters,
    tol,
    chunk_size,
    axis=None,
    predictions=None,
):
    """Least squares for U given V and B, then re-orthonormalization.

    Solves ``sum_i X_i^T X_i U v_i v_i^T + ridge U = sum_i X_i^T (y_i - X_i b_i) v_i^T``
    (the normal equations of the U-loss) by preconditioned conjugate gradients
    from the current ``U`` (right preconditioner ``(sum_i m_i v_i v_i^T)^-1``;
    Gaussian ``X_i^T X_i`` average to ``m_i I``) or densely. With ``axis``
    (inside ``shard_map``) the sums run over the users of every device.
    ``predictions``: ``(residual, low_rank)`` of the fit ``(U, V, B)`` on
    ``data.mask`` (see :func:`rhs_and_product`), which saves a pass over the
    data; None computes the right-hand side from ``B``.

    Returns:
      ``(U_new (d, r) orthonormal, V_new (t, r), SharedStats)`` with
      ``V_new U_new^T`` equal to ``V U_ls^T`` for the least-squares ``U_ls``.
    """
    AU = None
    if predictions is None:
        rhs = _rhs(data, V, idx, val, chunk_size, axis)
    else:
        rhs, AU = rhs_and_product(data, V, *predictions, chunk_size, axis)
    if solver == "dense":
        G = _dense_normal_matrix(data, V, chunk_size, axis)
        U_ls, stats = solve_U_dense(G, rhs, ridge)
    else:
        counts = jnp.sum(data.mask, axis=1).astype(V.dtype)
        M = psum((V * counts[:, None]).T @ V, axis)

        def apply(D):
            return normal_operator(data, V, D, chunk_size, axis)

        U_ls, stats = solve_U_cg(apply, rhs, U, M, ridge, max_iters, tol, applied=AU)
    U_new, R = orthonormalize(U_ls)
    return U_new, V @ R.T, stats


def solve_U_dense(G, rhs, ridge):
    """``U_ls (d, r)`` from the ``(d r, d r)`` normal matrix ``G``, ``rhs (d, r)``."""
    d, r = rhs.shape
    G = G + ridge * jnp.eye(d * r, dtype=rhs.dtype)
    U_ls = spd_solve(G, rhs.reshape(-1)).reshape(d, r)
    return U_ls, SharedStats(jnp.zeros((), jnp.int32), jnp.zeros((), rhs.dtype))


def solve_U_cg(
    apply,
    rhs,
    U,
    M,
    ridge,
    max_iters,
    tol,
    while_loop=jax.lax.while_loop,
    *,
    applied=None,
):
    """``U_ls (d, r)`` by CG from ``U`` with the normal operator ``apply(D)``.

    ``M (r, r) = sum_i m_i v_i v_i^T`` gives the right preconditioner
    ``(c M + ridge I)^-1``, where ``c = <U, A U> / <U, U M>`` is the average
    ``x^T x / d`` of the features measured on the starting point (1 for
    standard Gaussian features): the operator is ``sum_i X_i^T X_i D v_i v_i^T``
    and ``X_i^T X_i`` averages to ``c m_i I``, so features scaled by ``s``
    (``c = s^2``) give CG iterates of the same size, with no overflow in float32
    at ``s = 1e10`` nor underflow at ``1e-8``. ``while_loop`` may be
    :func:`lrs.loop.while_loop` with ``host=True`` when ``apply`` streams data from
    the host. ``applied``: ``apply(U)`` when already known (one product
    less).
    """
    r = M.shape[0]
    eye = jnp.eye(r, dtype=M.dtype)
    AU = apply(U) if applied is None else applied
    scale = jnp.vdot(U, AU) / jnp.vdot(U, U @ M)
    scale = jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1)
    M = scale * M + ridge * eye
    M_inv = _pseudo_inverse(M)

    def regularized(D):
        return apply(D) + ridge * D

    U_ls, iters, rel = _pcg(
        regularized,
        rhs,
        U,
        lambda G: G @ M_inv,
        max_iters,
        tol,
        while_loop,
        applied_x0=AU + ridge * U,
    )
    return U_ls, SharedStats(iters, rel)


def _pseudo_inverse(M) -> jax.Array:
    """Inverse of the symmetric PSD ``M (r, r)`` on the eigenvalues above
    ``sqrt(eps)`` times the largest, zero on the others.

    With fewer users than the rank (or users whose ``v_i`` span fewer than r
    directions) ``M`` is singular: a jittered inverse then multiplied rounding
    errors in its null space by ``1 / jitter`` (1e6 in float32) and CG moved U
    at random along directions the data do not see. The pseudo-inverse keeps
    the preconditioned residual in the range, where the operator acts.
    """
    M = 0.5 * (M + M.T)
    w, Q = jnp.linalg.eigh(M)
    keep = w > jnp.sqrt(jnp.finfo(M.dtype).eps) * jnp.max(w)
    inv = jnp.where(keep, 1 / jnp.where(keep, w, 1), 0)
    return (Q * inv) @ Q.T


def moment_matrix(data, chunk_size, axis=None) -> jax.Array:
    """``sum_ij y_ij^2 x_ij x_ij^T``, shape ``(d, d)``; one d x d in total."""

    def fn(args, fresh):
        X, y, mask = args
        Z = X * jnp.where(mask & fresh[:, None], y, 0)[..., None]
        Z = Z.reshape(-1, Z.shape[-1])
        return None, Z.T @ Z

    return map_user_chunks(fn, (data.X, data.y, data.mask), chunk_size, axis=axis)[1]


def moment_operator(data, Q, chunk_size, axis=None) -> jax.Array:
    """``sum_ij y_ij^2 x_ij x_ij^T Q`` for ``Q (d, p)`` without forming the d x d."""

    def fn(args, fresh):
        X, y, mask = args
        w = jnp.where(mask & fresh[:, None], y * y, 0)
        P = jnp.einsum("cmd,dp->cmp", X, Q) * w[..., None]
        return None, jnp.einsum("cmd,cmp->dp", X, P)

    return map_user_chunks(fn, (data.X, data.y, data.mask), chunk_size, axis=axis)[1]


def moment_init(
    data, rank: int, key, *, eigensolver: str, iters: int, chunk_size, axis=None
):
    """Top-``rank`` eigenvectors of the moment matrix ``sum_ij y_ij^2 x_ij x_ij^T``.

    ``eigensolver='dense'`` forms the d x d matrix once and takes its top
    singular vectors; ``'subspace'`` runs
    ``iters`` rounds of block subspace iteration (one data pass each) with
    ``rank + 5`` columns, then a Rayleigh-Ritz step.
    """
    return top_moment_vectors(
        lambda: moment_matrix(data, chunk_size, axis),
        lambda Q: moment_operator(data, Q, chunk_size, axis),
        data.X.shape[2],
        data.X.dtype,
        rank,
        key,
        eigensolver=eigensolver,
        iters=iters,
    )


def top_moment_vectors(
    matrix,
    operator,
    d: int,
    dtype,
    rank: int,
    key,
    *,
    eigensolver,
    iters,
    fori_loop=jax.lax.fori_loop,
):
    """:func:`moment_init` given ``matrix() (d, d)`` or ``operator(Q (d, p))``."""
    if eigensolver == "dense":
        # The matrix is symmetric PSD, so its singular vectors are eigenvectors;
        # XLA's CPU SVD is ~20x faster than its eigh at d = 100.
        vecs, _, _ = jnp.linalg.svd(matrix())
        U = vecs[:, :rank]
    else:
        p = min(rank + 5, d)
        Q0, _ = orthonormalize(jax.random.normal(key, (d, p), dtype))

        def body(_, Q):
            return orthonormalize(operator(Q))[0]

        Q = fori_loop(0, iters, body, Q0)
        _, vecs = jnp.linalg.eigh(Q.T @ operator(Q))
        U = Q @ vecs[:, ::-1][:, :rank]
    return orthonormalize(U)[0]
