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

from lrs.linalg import hard_threshold, spd_solve, top_k_indices


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


def pursuit_step(A, X, y, fit: UserFit, ridge=0.0) -> tuple[UserFit, jax.Array]:
    """One subspace-pursuit step for one user.

    Returns ``(fit, moved)``: the candidate replaces ``fit`` only when its
    support differs as a set and its residual is smaller by a relative margin,
    so the residual never increases and ``moved`` is False at a fixed point.
    """
    k, d = fit.support.shape[0], X.shape[1]
    proxy = jnp.abs(X.T @ _residual(A, X, y, fit)).at[fit.support].set(-1.0)
    new = top_k_indices(proxy, min(k, d - k))
    merged = jnp.concatenate([fit.support, new])
    wide = lstsq_on_support(A, X, y, merged, ridge)
    keep, _ = hard_threshold(wide.b, k)
    candidate = lstsq_on_support(A, X, y, merged[keep], ridge)
    margin = 1.0 - 100 * jnp.finfo(y.dtype).eps
    changed = jnp.any(jnp.sort(candidate.support) != jnp.sort(fit.support))
    moved = changed & (candidate.sq_residual < margin * fit.sq_residual)
    return jax.tree.map(lambda a, b: jnp.where(moved, a, b), candidate, fit), moved


def pursue(A, X, y, support, steps: int, ridge=0.0) -> UserFit:
    """Refits users on ``support (n, k)``, then up to ``steps`` pursuit steps.

    ``A (n, m, r)``, ``X (n, m, d)``, ``y (n, m)``. The loop over steps runs
    over the whole batch and stops early once no user's support moves.
    """
    fits = jax.vmap(lstsq_on_support, (0, 0, 0, 0, None))(A, X, y, support, ridge)
    if support.shape[-1] == 0 or (isinstance(steps, int) and steps == 0):
        return fits
    step = jax.vmap(pursuit_step, (0, 0, 0, 0, None))

    def cond(carry):
        i, _, moved = carry
        return (i < steps) & moved

    def body(carry):
        i, fits, _ = carry
        fits, moved = step(A, X, y, fits, ridge)
        return i + 1, fits, jnp.any(moved)

    _, fits, _ = jax.lax.while_loop(cond, body, (0, fits, jnp.asarray(True)))
    return fits


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


def rescue(X, y, U, fits: UserFit, *, steps: int, l1_steps: int, ridge=0.0) -> UserFit:
    """Stronger attempt for a batch of hard users: best of ``fits``, a cold
    start and an l1 start, each polished by ``steps`` pursuit steps."""
    k = fits.support.shape[-1]
    if k == 0:
        return fits
    A = X @ U
    cold = jax.vmap(cold_support, (0, 0, 0, None, None))(A, X, y, k, ridge)
    candidates = [pursue(A, X, y, cold, steps, ridge)]
    if l1_steps > 0:
        l1 = jax.vmap(l1_support, (0, 0, 0, None, None))(A, X, y, k, l1_steps)
        candidates.append(pursue(A, X, y, l1, steps, ridge))
    best = fits
    for c in candidates:
        better = c.sq_residual < best.sq_residual
        best = jax.tree.map(lambda a, b, w=better: _where_rows(w, a, b), c, best)
    return best


def _where_rows(pick, a, b):
    return jnp.where(pick.reshape(pick.shape + (1,) * (a.ndim - 1)), a, b)


def solve_user(X, y, U, support, *, steps: int, ridge=0.0) -> UserFit:
    """The per-user step for a single user (``X (m, d)`` already masked)."""
    batch = jax.tree.map(lambda a: a[None], (X @ U, X, y, support))
    return jax.tree.map(lambda a: a[0], pursue(*batch, steps, ridge))
