"""The per-user step: given the shared U, fit ``v_i`` and a k-sparse ``b_i``.

For one user with masked data ``X (m, d)``, ``y (m,)`` and ``A = X U (m, r)``:

    min_{v, b : |supp b| <= k}  || y - A v - X b ||^2

Solved by subspace pursuit (hard-thresholding pursuit that adds ``k`` candidate
columns, refits on ``2k``, keeps the ``k`` largest and refits), warm-started
from the previous support. Every least-squares solve uses only the ``r + 2k``
selected columns. The users whose residual stays largest get a second,
stronger attempt (:func:`rescue`): a cold start and an l1 (Lasso path, FISTA)
candidate, each polished by subspace pursuit; the smallest residual wins.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lrs.linalg import hard_threshold, spd_solve


class UserFit(NamedTuple):
    """Solution of one user's problem (leading user axis when vmapped)."""

    v: jax.Array  # (r,)
    support: jax.Array  # (k,) int32
    b: jax.Array  # (k,)
    sq_residual: jax.Array  # () ||y - A v - X_S b_S||^2


def lstsq_on_support(A, X, y, support, ridge=0.0) -> UserFit:
    """Least squares on the columns ``[A, X[:, support]]`` (``r + s`` unknowns)."""
    Z = jnp.concatenate([A, jnp.take(X, support, axis=1)], axis=1)
    coef = spd_solve(Z.T @ Z, Z.T @ y, ridge)
    residual = y - Z @ coef
    r = A.shape[1]
    return UserFit(coef[:r], support, coef[r:], residual @ residual)


def _residual(A, X, y, fit: UserFit) -> jax.Array:
    return y - A @ fit.v - jnp.take(X, fit.support, axis=1) @ fit.b


def pursuit_step(A, X, y, fit: UserFit, ridge=0.0) -> UserFit:
    """One subspace-pursuit step; never increases the residual."""
    k, d = fit.support.shape[0], X.shape[1]
    proxy = jnp.abs(X.T @ _residual(A, X, y, fit)).at[fit.support].set(-1.0)
    _, new = jax.lax.top_k(proxy, min(k, d - k))
    merged = jnp.concatenate([fit.support, new.astype(jnp.int32)])
    wide = lstsq_on_support(A, X, y, merged, ridge)
    keep, _ = hard_threshold(wide.b, k)
    candidate = lstsq_on_support(A, X, y, merged[keep], ridge)
    better = candidate.sq_residual < fit.sq_residual
    return jax.tree.map(lambda a, b: jnp.where(better, a, b), candidate, fit)


def pursue(A, X, y, support, steps: int, ridge=0.0) -> UserFit:
    """Refits on ``support`` then runs ``steps`` pursuit steps."""
    fit = lstsq_on_support(A, X, y, support, ridge)
    if support.shape[0] == 0:
        return fit
    return jax.lax.fori_loop(
        0, steps, lambda _, f: pursuit_step(A, X, y, f, ridge), fit
    )


def cold_support(A, X, y, k: int, ridge=0.0) -> jax.Array:
    """Initial support: the k largest correlations with the low-rank residual."""
    base = lstsq_on_support(A, X, y, jnp.zeros((0,), jnp.int32), ridge)
    support, _ = hard_threshold(X.T @ _residual(A, X, y, base), k)
    return support


def l1_support(A, X, y, k: int, steps: int) -> jax.Array:
    """Support of a Lasso path on the part of ``(X, y)`` orthogonal to ``A``.

    FISTA on ``0.5 ||P (y - X b)||^2 + lam ||b||_1`` with ``P`` the projector
    off ``span(A)`` and ``lam`` decreasing geometrically from ``||X^T P y||_inf``
    to ``1e-4`` of it (continuation); returns the top-k entries' indices.
    """
    Q, _ = jnp.linalg.qr(A)
    Xp = X - Q @ (Q.T @ X)
    yp = y - Q @ (Q.T @ y)
    lipschitz = jnp.linalg.norm(Xp, ord=2) ** 2 + 1e-30
    lam_max = jnp.max(jnp.abs(Xp.T @ yp))
    decay = 1e-4 ** (1.0 / max(steps - 1, 1))

    def body(j, carry):
        b, z, s = carry
        lam = lam_max * decay**j
        g = z - Xp.T @ (Xp @ z - yp) / lipschitz
        b_new = jnp.sign(g) * jnp.maximum(jnp.abs(g) - lam / lipschitz, 0.0)
        s_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * s * s))
        z_new = b_new + ((s - 1.0) / s_new) * (b_new - b)
        return b_new, z_new, s_new

    zero = jnp.zeros(X.shape[1], X.dtype)
    b, _, _ = jax.lax.fori_loop(0, steps, body, (zero, zero, jnp.ones((), X.dtype)))
    support, _ = hard_threshold(b, k)
    return support


def solve_user(X, y, U, warm_support, *, steps: int, ridge=0.0) -> UserFit:
    """Per-user step for one user (``X`` already masked), warm-started."""
    return pursue(X @ U, X, y, warm_support, steps, ridge)


def rescue(X, y, U, fit: UserFit, *, steps: int, l1_steps: int, ridge=0.0) -> UserFit:
    """Stronger attempt for a hard user: best of ``fit``, cold start and l1 start."""
    A = X @ U
    k = fit.support.shape[0]
    if k == 0:
        return fit
    candidates = [fit, pursue(A, X, y, cold_support(A, X, y, k, ridge), steps, ridge)]
    if l1_steps > 0:
        candidates.append(pursue(A, X, y, l1_support(A, X, y, k, l1_steps), steps, ridge))
    best = candidates[0]
    for c in candidates[1:]:
        better = c.sq_residual < best.sq_residual
        best = jax.tree.map(lambda a, b, w=better: jnp.where(w, a, b), c, best)
    return best
