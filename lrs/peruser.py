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

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrs.chunking import map_user_chunks
from lrs.config import AMHTConfig
from lrs.data import UserData
from lrs.linalg import hard_threshold, spd_solve, top_k_indices
from lrs.sharding import all_users, first_user


class UserFit(NamedTuple):
    """Solution of one user's problem (leading user axis when vmapped)."""

    v: jax.Array  # (r,)
    support: jax.Array  # (k,) int32
    b: jax.Array  # (k,)
    sq_residual: jax.Array  # () ||y - A v - X_S b_S||^2


def lstsq_on_support(A, X, y, support, ridge=0.0, *, sparse_ridge=0.0) -> UserFit:
    """Least squares on the columns ``[A, X[:, support]]`` (``r + s`` unknowns).

    The penalty is ``ridge ||v||^2 + (ridge + sparse_ridge) ||b_S||^2``:
    ``sparse_ridge`` shrinks the sparse values more than the low-rank part.
    ``sq_residual`` is the squared residual of the data alone (no penalty).
    """
    return _fit_on_support(A, X, y, support, ridge, sparse_ridge=sparse_ridge)[0]


class _System(NamedTuple):
    """The columns ``Z = [A, X_S]`` of one user's least squares and the
    residual of its solution (kept so a pursuit step reuses them)."""

    Z: jax.Array  # (m, p) the columns, zero on masked samples
    residual: jax.Array  # (m,) y - Z coef


def _columns(X, idx, mask):
    """``X[:, idx]``, zero on the samples outside ``mask`` (None: all in).

    The per-user solvers read the features unmasked and mask only what they
    gather and the products' outputs: no masked copy of X is made (timed
    alone, the cold supports of P0 took 5x longer from a masked copy).
    """
    cols = jnp.take(X, idx, axis=1)
    return cols if mask is None else jnp.where(mask[:, None], cols, 0)


def _penalty(r: int, s: int, ridge, sparse_ridge, dtype):
    if not (isinstance(sparse_ridge, float | int) and sparse_ridge == 0) and s:
        return jnp.concatenate(
            [jnp.full((r,), ridge, dtype), jnp.full((s,), ridge + sparse_ridge, dtype)]
        )
    return ridge


def _solve_system(Z, G, h, y, support, r: int, ridge, sparse_ridge):
    """``(UserFit, _System)`` of the least squares ``G coef = h`` on ``Z``."""
    penalty = _penalty(r, support.shape[-1], ridge, sparse_ridge, y.dtype)
    coef = spd_solve(G, h, penalty)
    residual = y - Z @ coef
    fit = UserFit(coef[:r], support, coef[r:], residual @ residual)
    return fit, _System(Z, residual)


def _fit_on_support(
    A, X, y, support, ridge, mask=None, columns=None, *, sparse_ridge=0.0
):
    """:func:`lstsq_on_support` and its :class:`_System` (``X`` read unmasked,
    ``A`` and ``y`` zero on the masked samples). ``columns``: the support's
    columns ``X[:, support]`` (masked) when already known."""
    if columns is None:
        columns = _columns(X, support, mask)
    Z = jnp.concatenate([A, columns], axis=1)
    r = A.shape[1]
    return _solve_system(Z, Z.T @ Z, Z.T @ y, y, support, r, ridge, sparse_ridge)


def _residual(A, X, y, fit: UserFit) -> jax.Array:
    return y - A @ fit.v - jnp.take(X, fit.support, axis=1) @ fit.b


def _allowed_scores(scores, allowed, fill=-1.0):
    """``scores (..., d)`` with the features outside ``allowed`` set to ``fill``."""
    if allowed is None:
        return scores
    return jnp.where(jnp.asarray(allowed), scores, jnp.asarray(fill, scores.dtype))


def _candidates(k: int, d: int, allowed) -> int:
    """New candidate columns per pursuit step: ``min(k, free features)``."""
    free = d if allowed is None else int(sum(bool(a) for a in allowed))
    return min(k, free - k)


def pursuit_step(
    A, X, y, fit: UserFit, ridge=0.0, *, sparse_ridge=0.0, allowed=None
) -> tuple[UserFit, jax.Array]:
    """One subspace-pursuit step for one user.

    Returns ``(fit, moved)``: the candidate replaces ``fit`` only when its
    support differs as a set and its residual is smaller by a relative margin,
    so the residual never increases and ``moved`` is False at a fixed point.
    ``allowed``: static ``(d,)`` bools, the features the support may use
    (None: all).
    """
    Z = jnp.concatenate([A, jnp.take(X, fit.support, axis=1)], axis=1)
    system = _System(Z, _residual(A, X, y, fit))
    fit, _, moved = _pursuit_step(
        A, X, y, fit, system, ridge, sparse_ridge=sparse_ridge, allowed=allowed
    )
    return fit, moved


def _pursuit_step(
    A, X, y, fit: UserFit, system: _System, ridge, mask=None, *, sparse_ridge, allowed
):
    """:func:`pursuit_step` from the fit's :class:`_System`:
    ``(fit, system, moved)``.

    The fit's columns and residual come from its :class:`_System`: per step
    one product ``X^T residual`` over all features and a gather of the ``k``
    new columns; the rest works on the ``r + 2k`` merged columns, and the
    candidate's Gram matrix is a sub-block of the merged one. ``mask``: the
    samples present (``A`` and ``y`` are zero on the others; None: all).
    """
    k, d, r = fit.support.shape[0], X.shape[1], A.shape[1]
    n_new = _candidates(k, d, allowed)
    if n_new <= 0:  # the support is every allowed feature already
        return fit, system, jnp.asarray(False)
    proxy = jnp.abs(X.T @ system.residual)
    proxy = jnp.where(_members(jnp.arange(d), fit.support), -1.0, proxy)
    new = top_k_indices(_allowed_scores(proxy, allowed, -2.0), n_new)
    merged = jnp.concatenate([fit.support, new])
    W = jnp.concatenate([system.Z, _columns(X, new, mask)], axis=1)
    G, h = W.T @ W, W.T @ y
    wide = spd_solve(G, h, _penalty(r, k + n_new, ridge, sparse_ridge, y.dtype))
    keep, _ = hard_threshold(wide[r:], k)
    cols = jnp.concatenate([jnp.arange(r), r + keep])
    G = jnp.take(jnp.take(G, cols, axis=0), cols, axis=1)
    candidate, cand_system = _solve_system(
        jnp.take(W, cols, axis=1), G, h[cols], y, merged[keep], r, ridge, sparse_ridge
    )
    margin = 1.0 - 100 * jnp.finfo(y.dtype).eps
    changed = ~jnp.all(_members(candidate.support, fit.support))
    moved = changed & (
        _objective(candidate, ridge, sparse_ridge)
        < margin * _objective(fit, ridge, sparse_ridge)
    )
    fit, system = jax.tree.map(
        lambda a, b: jnp.where(moved, a, b), (candidate, cand_system), (fit, system)
    )
    return fit, system, moved


def _members(items, support) -> jax.Array:
    """``(n,)`` bools: which of ``items (n,)`` are in ``support (k,)``."""
    return jnp.any(items[:, None] == support[None, :], axis=1)


def _objective(fit: UserFit, ridge, sparse_ridge) -> jax.Array:
    """The penalized per-user loss (the squared residual without penalties)."""
    if isinstance(ridge, float | int) and isinstance(sparse_ridge, float | int):
        if ridge == 0 and sparse_ridge == 0:
            return fit.sq_residual
    return (
        fit.sq_residual
        + ridge * (fit.v @ fit.v)
        + (ridge + sparse_ridge) * (fit.b @ fit.b)
    )


def pursue(
    A,
    X,
    y,
    support,
    steps: int,
    ridge=0.0,
    *,
    sparse_ridge=0.0,
    allowed=None,
    mask=None,
    significance=0.0,
) -> UserFit:
    """Refits users on ``support (n, k)``, then up to ``steps`` pursuit steps.

    ``A (n, m, r)``, ``X (n, m, d)``, ``y (n, m)``. The loop over steps runs
    over the whole batch and stops early once no user's support moves.
    ``sparse_ridge`` and ``allowed``: see :func:`pursuit_step`. ``mask (n,
    m)``: the samples present; on the others ``X`` may hold anything finite
    and ``A`` and ``y`` must be zero (None: ``X`` is masked already).
    ``significance``: then keep only significant sparse values
    (:func:`_keep_significant`; 0: all ``k``).
    """
    args = (steps, ridge, sparse_ridge, allowed, mask)
    return _pursue(A, X, y, support, *args, significance=significance)[0]


def _pursue(
    A,
    X,
    y,
    support,
    steps,
    ridge,
    sparse_ridge,
    allowed,
    mask,
    columns=None,
    *,
    significance=0.0,
):
    """:func:`pursue`: ``(fits, residuals (n, m), support columns (n, m, k))``
    (``columns``: those of ``support``, when known)."""
    fits, residual, columns = _pursue_all(
        A, X, y, support, steps, ridge, sparse_ridge, allowed, mask, columns
    )
    if support.shape[-1] == 0 or (
        isinstance(significance, float | int) and significance == 0
    ):
        return fits, residual, columns
    count = jnp.full(y.shape[:1], y.shape[1]) if mask is None else mask.sum(axis=1)
    free = X.shape[-1] if allowed is None else sum(map(bool, allowed))
    keep = jax.vmap(_keep_significant, (0, 0, 0, 0, 0, None, None, None, None))
    Z = jnp.concatenate([A, columns], axis=-1)
    options = (count, ridge, sparse_ridge, significance, free)
    fits, residual = keep(Z, y, fits, residual, *options)
    return fits, residual, columns


def search_dof(k: int, free: int) -> float:
    """Degrees of freedom of ``k`` values chosen among ``free`` features:
    ``k (1 + 2 log(free / k))`` (each chosen value costs about ``2 log(free /
    k)`` more than a fixed one, as in the risk inflation criterion of Foster
    and George, 1994)."""
    return k * (1 + 2 * math.log(max(free / k, 1.0))) if k else 0.0


def _keep_significant(
    Z, y, fit: UserFit, residual, count, ridge, sparse_ridge, level, free
):
    """One user's fit with only its significant sparse values, refitted.

    ``Z = [A, X_S] (m, r + k)`` (zero on masked samples), ``count`` the
    user's samples and ``free`` the features the support was chosen among.
    The residual variance ``s^2 = ||res||^2 / (count - r - search_dof(k,
    free))`` (infinite when that count is not positive: the user cannot
    support ``k`` values; the search counted, as the ``k`` columns were
    chosen to fit this user's residual) and the inverse of the
    (penalized) Gram matrix give each value's standard error ``se_j``; the
    values with ``|b_j| < level se_j`` are set to 0 and ``v`` and the others
    are refitted. Returns ``(fit, residual)``.
    """
    r, k = fit.v.shape[0], fit.b.shape[0]
    p = r + k
    G, h = Z.T @ Z, Z.T @ y
    penalty = _penalty(r, k, ridge, sparse_ridge, y.dtype)
    inverse = spd_solve(G, jnp.eye(p, dtype=y.dtype), penalty)
    dof = count - r - search_dof(k, free)
    variance = jnp.where(dof > 0, fit.sq_residual / jnp.maximum(dof, 1), jnp.inf)
    se = jnp.sqrt(variance * jnp.maximum(jnp.diagonal(inverse)[r:], 0))
    kept = jnp.abs(fit.b) >= level * se
    used = jnp.concatenate([jnp.ones((r,), bool), kept])
    G = jnp.where(used[:, None] & used[None, :], G, jnp.diag((~used).astype(G.dtype)))
    coef = jnp.where(used, spd_solve(G, jnp.where(used, h, 0), penalty), 0)
    res = y - Z @ coef
    refit = UserFit(coef[:r], fit.support, coef[r:], res @ res)
    all_kept = jnp.all(kept)
    fit = jax.tree.map(lambda a, b: jnp.where(all_kept, a, b), fit, refit)
    return fit, jnp.where(all_kept, residual, res)


def _pursue_all(
    A, X, y, support, steps, ridge, sparse_ridge, allowed, mask, columns=None
):
    """The pursuit of :func:`_pursue` (every user keeps ``k`` values)."""
    fit_fn = functools.partial(_fit_on_support, sparse_ridge=sparse_ridge)
    fits, systems = jax.vmap(fit_fn, (0, 0, 0, 0, None, 0, 0))(
        A, X, y, support, ridge, mask, columns
    )
    r = A.shape[-1]
    if support.shape[-1] == 0 or (isinstance(steps, int) and steps == 0):
        return fits, systems.residual, systems.Z[..., r:]
    one = functools.partial(_pursuit_step, sparse_ridge=sparse_ridge, allowed=allowed)
    step = jax.vmap(one, (0, 0, 0, 0, 0, None, 0))

    def cond(carry):
        i, _, _, moved = carry
        return (i < steps) & moved

    def body(carry):
        i, fits, systems, _ = carry
        fits, systems, moved = step(A, X, y, fits, systems, ridge, mask)
        return i + 1, fits, systems, jnp.any(moved)

    init = (0, fits, systems, jnp.asarray(True))
    _, fits, systems, _ = jax.lax.while_loop(cond, body, init)
    return fits, systems.residual, systems.Z[..., r:]


def cold_support(A, X, y, k: int, ridge=0.0, *, allowed=None) -> jax.Array:
    """Initial support: the k largest correlations with the low-rank residual
    (among the ``allowed`` features).

    ``X`` may hold anything finite on samples where ``A`` and ``y`` are zero.
    """
    _, base = _fit_on_support(A, X, y, jnp.zeros((0,), jnp.int32), ridge)
    if k == 0:
        return jnp.zeros((0,), jnp.int32)
    scores = jnp.abs(X.T @ base.residual)
    return top_k_indices(_allowed_scores(scores, allowed), k)


def l1_support(A, X, y, k: int, steps: int, *, allowed=None) -> jax.Array:
    """Support of a Lasso path on the part of ``(X, y)`` orthogonal to ``A``.

    FISTA on ``0.5 ||P (y - X b)||^2 + lam ||b||_1`` with ``P`` the projector
    off ``span(A)`` and ``lam`` decreasing geometrically from ``||X^T P y||_inf``
    to ``1e-4`` of it (continuation); returns the top-k entries' indices.
    With ``allowed``, ``b`` is zero outside the allowed features.
    """
    if allowed is not None:
        X = X * jnp.asarray(allowed, X.dtype)
    Q, _ = jnp.linalg.qr(A)
    Xp = X - Q @ (Q.T @ X)
    yp = y - Q @ (Q.T @ y)
    # ||Xp||_2^2, the largest singular value of the smaller Gram matrix
    # (LAPACK is faster on it than on Xp)
    gram = Xp @ Xp.T if Xp.shape[0] <= Xp.shape[1] else Xp.T @ Xp
    lipschitz = jnp.linalg.svd(gram, compute_uv=False)[0] + 1e-30
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
    return top_k_indices(_allowed_scores(jnp.abs(b), allowed), k)


def rescue(
    X,
    y,
    U,
    fits: UserFit,
    *,
    steps: int,
    l1_steps: int,
    ridge=0.0,
    sparse_ridge=0.0,
    allowed=None,
    mask=None,
    significance=0.0,
) -> UserFit:
    """Stronger attempt for a batch of hard users: best of ``fits``, a cold
    start and an l1 start, each polished by ``steps`` pursuit steps.

    ``mask (n, m)``: the samples present (None: ``X`` and ``y`` are masked
    already). The l1 candidate is computed after the cold one (:func:`_after`),
    so the program's batched factorizations form one chain (no CPU deadlock)."""
    if fits.support.shape[-1] == 0:
        return fits
    opts = dict(
        steps=steps,
        l1_steps=l1_steps,
        ridge=ridge,
        sparse_ridge=sparse_ridge,
        allowed=allowed,
        significance=significance,
    )
    A, y = _low_rank_columns(X, y, mask, U)
    best = _rescue_candidate(A, X, y, mask, fits, "cold", **opts)
    if l1_steps > 0:
        # The l1 chain starts only once the cold one is done (see _after).
        A, X, y, mask = _after((A, X, y, mask), best)
        best = _rescue_candidate(A, X, y, mask, best, "l1", **opts)
    return best


def _low_rank_columns(X, y, mask, U):
    """``(A, y)``: ``A = X U`` and ``y``, both zero on the masked samples."""
    A = X @ U
    if mask is None:
        return A, y
    return jnp.where(mask[..., None], A, 0), jnp.where(mask, y, 0)


def _rescue_candidate(
    A,
    X,
    y,
    mask,
    best: UserFit,
    start: str,
    *,
    steps,
    l1_steps,
    ridge,
    sparse_ridge,
    allowed,
    significance,
) -> UserFit:
    """One candidate of :func:`rescue` (``start``: ``'cold'`` or ``'l1'``)
    polished by pursuit; each row of ``best`` it fits better is replaced."""
    k = best.support.shape[-1]
    if start == "cold":
        cold = functools.partial(cold_support, allowed=allowed)
        support = jax.vmap(cold, (0, 0, 0, None, None))(A, X, y, k, ridge)
    else:
        X_l1 = X if mask is None else jnp.where(mask[..., None], X, 0)
        l1 = functools.partial(l1_support, allowed=allowed)
        support = jax.vmap(l1, (0, 0, 0, None, None))(A, X_l1, y, k, l1_steps)
    fit = pursue(
        A,
        X,
        y,
        support,
        steps,
        ridge,
        sparse_ridge=sparse_ridge,
        allowed=allowed,
        mask=mask,
        significance=significance,
    )
    return _keep_better(fit, best)


def rescue_candidate(
    X, y, mask, U, best: UserFit, config: AMHTConfig, start: str
) -> UserFit:
    """One candidate of :func:`rescue_masked` (``start``: ``'cold'`` or
    ``'l1'``) on padded data: the rows of ``best`` it fits better are replaced.

    ``rescue_masked`` is the cold candidate, then the l1 candidate from its
    result; the streamed fit runs the two as separate programs.
    """
    if best.support.shape[-1] == 0:
        return best
    A, y = _low_rank_columns(X, y, mask, U)
    return _rescue_candidate(A, X, y, mask, best, start, **_rescue_options(config, X))


def _rescue_options(config: AMHTConfig, X) -> dict:
    return dict(
        steps=config.inner_steps + 2,
        l1_steps=config.l1_steps,
        ridge=config.ridge,
        **sparse_options(config, X.shape[-1]),
    )


def _keep_better(candidate: UserFit, best: UserFit) -> UserFit:
    """Each row of ``candidate`` if its residual is smaller, else ``best``'s."""
    better = candidate.sq_residual < best.sq_residual
    return jax.tree.map(lambda a, b: _where_rows(better, a, b), candidate, best)


def _after(x, dep):
    """``x`` unchanged, but with a data dependency on ``dep`` that XLA keeps.

    Orders two chains of batched factorizations in one program: what is
    computed from the result cannot start before ``dep`` is computed. In
    jaxlib 0.10.2 a large batched LAPACK call on CPU (QR, Cholesky) splits its
    batch into tasks on XLA's intra-op pool and blocks until they are done;
    two such calls that XLA runs at once, as it does independent ops, can block
    every pool thread and deadlock (docs/scale.md). ``lax.optimization_barrier``
    does not order them: XLA:CPU removes it before scheduling and the compiled
    program holds the two chains independent again. Here ``x`` goes through a
    ``select`` on a predicate computed from all of ``dep`` (``(bits | 1) != 0``,
    always true, NaN included, but not foldable), which returns ``x`` exactly.
    """
    ok = jnp.asarray(True)
    for leaf in jax.tree.leaves(dep):
        leaf = jnp.asarray(leaf)
        if leaf.dtype == jnp.bool_:
            leaf = leaf.astype(jnp.int8)
        elif not jnp.issubdtype(leaf.dtype, jnp.integer):
            bits = jnp.dtype(f"int{8 * leaf.dtype.itemsize}")
            leaf = jax.lax.bitcast_convert_type(leaf, bits)
        ok = ok & jnp.all((leaf | 1) != 0)
    return jax.tree.map(lambda a: jnp.where(ok, a, jnp.zeros_like(a)), x)


def _where_rows(pick, a, b):
    return jnp.where(pick.reshape(pick.shape + (1,) * (a.ndim - 1)), a, b)


def solve_user(
    X,
    y,
    U,
    support,
    *,
    steps: int,
    ridge=0.0,
    sparse_ridge=0.0,
    allowed=None,
    significance=0.0,
) -> UserFit:
    """The per-user step for a single user (``X (m, d)``, all samples present)."""
    batch = jax.tree.map(lambda a: a[None], (X @ U, X, y, support))
    opts = dict(sparse_ridge=sparse_ridge, allowed=allowed, significance=significance)
    fits = pursue(*batch, steps, ridge, **opts)
    return jax.tree.map(lambda a: a[0], fits)


def sparse_options(config: AMHTConfig, d: int) -> dict:
    """``config``'s keyword arguments of the per-user solvers for ``d`` features:
    ``sparse_ridge``, ``allowed`` (a static ``(d,)`` bool tuple, or None) and
    ``significance`` (:attr:`lrs.AMHTConfig.sparse_significance`)."""
    allowed = None
    if config.sparse_features is not None:
        config.check_features(d)
        chosen = set(config.sparse_features)
        allowed = tuple(j in chosen for j in range(d))
    return dict(
        sparse_ridge=config.sparse_ridge,
        allowed=allowed,
        significance=config.sparse_significance,
    )


# ---------------------------------------------------- the step over all users


def chunk_size(data: UserData, config: AMHTConfig) -> int:
    """Users per chunk for ``data`` under ``config``."""
    _, m, d = data.X.shape
    return config.chunk_size(m, d, data.X.dtype.itemsize)


class UserCache(NamedTuple):
    """What a per-user step leaves for the next steps, per user, zero on the
    masked samples: the shared step reads the predictions instead of forming
    ``X_i b_i`` and ``X_i U v_i`` again, the next per-user step the support's
    columns instead of gathering them."""

    residual: jax.Array  # (t, m) y_i - X_i U v_i - X_i b_i
    low_rank: jax.Array  # (t, m) X_i U v_i
    columns: jax.Array  # (t, m, k) X_i[:, S_i], S_i = the fit's support


def per_user_step(
    data: UserData, U, warm, config: AMHTConfig, steps=None, *, axis=None
):
    """Fits every user's ``v_i`` and k-sparse ``b_i`` given ``U``.

    Pursuit for all users (chunk by chunk), then :func:`_rescue_worst` on the
    users with the largest relative residual. The result does not depend on
    the chunk size.

    Args:
      warm: ``(t, k)`` previous supports, or None for a cold start
        (:func:`cold_supports`).
      steps: pursuit steps (may be traced); default ``config.inner_steps``,
        plus 3 for a cold start.
      axis: inside ``shard_map``, the :class:`lrs.sharding.UserAxis` the users
        are sharded over; the rescue then picks the worst users of all devices.

    Returns:
      a :class:`UserFit` with leading axis ``t``.
    """
    return fit_users(data, U, warm, config, steps, axis=axis)[0]


def fit_users(
    data: UserData,
    U,
    warm,
    config: AMHTConfig,
    steps=None,
    *,
    axis=None,
    columns=None,
) -> tuple[UserFit, UserCache]:
    """:func:`per_user_step` and the fits' :class:`UserCache`.

    ``columns``: ``(t, m, k)`` the columns of the ``warm`` supports on
    ``data.mask`` (a previous step's :class:`UserCache`), None: gathered.
    """
    if steps is None:
        steps = config.inner_steps + (3 if warm is None else 0)
    if warm is None:
        warm = cold_supports(data, U, config)

    opts = sparse_options(config, data.X.shape[2])

    def fn(args, fresh):
        X, y, mask, support, cols = args
        return pursue_chunk(
            X, y, mask, support, U, steps, config.ridge, columns=cols, **opts
        ), None

    chunk = chunk_size(data, config)
    args = (data.X, data.y, data.mask, warm, columns)
    out, _ = map_user_chunks(fn, args, chunk)
    return _rescue_worst(data, U, *out, config, chunk, axis)


def pursue_chunk(
    X,
    y,
    mask,
    support,
    U,
    steps,
    ridge=0.0,
    *,
    sparse_ridge=0.0,
    allowed=None,
    columns=None,
    significance=0.0,
) -> tuple[UserFit, UserCache]:
    """:func:`pursue` on padded data ``X (n, m, d)``, ``y, mask (n, m)``, and
    the fits' :class:`UserCache` (``columns``: those of ``support``, when
    known)."""
    A, y = _low_rank_columns(X, y, mask, U)
    fits, residual, columns = _pursue(
        A, X, y, support, steps, ridge, sparse_ridge, allowed, mask, columns,
        significance=significance,
    )  # fmt: skip
    low_rank = jnp.einsum("nmr,nr->nm", A, fits.v)
    return fits, UserCache(residual, low_rank, columns)


def support_columns(X, mask, support) -> jax.Array:
    """``(n, m, k)`` each user's columns ``X_i[:, S_i]``, zero where masked."""
    cols = jnp.take_along_axis(X, support[:, None, :], axis=2)
    return jnp.where(mask[..., None], cols, 0)


def user_cache(X, y, mask, U, fits: UserFit) -> UserCache:
    """The :class:`UserCache` of ``fits`` on padded data."""
    A, y = _low_rank_columns(X, y, mask, U)
    low_rank = jnp.einsum("nmr,nr->nm", A, fits.v)
    columns = support_columns(X, mask, fits.support)
    sparse = jnp.einsum("nmk,nk->nm", columns, fits.b)
    return UserCache(y - low_rank - sparse, low_rank, columns)


def rescue_masked(X, y, mask, U, current: UserFit, config: AMHTConfig) -> UserFit:
    """:func:`rescue` with ``config``'s settings on padded data."""
    return rescue(X, y, U, current, mask=mask, **_rescue_options(config, X))


def rescue_count(t: int, config: AMHTConfig) -> int:
    """How many of ``t`` users :func:`_rescue_worst` considers (0: never)."""
    if config.sparsity == 0:
        return 0
    return min(t, math.ceil(config.rescue_fraction * t))


def rescue_floor(score) -> jax.Array:
    """The rescue runs when the largest score exceeds this: 10x the median."""
    return 10 * jnp.median(score) + 1e3 * jnp.finfo(score.dtype).eps


def rescue_selection(score, n: int) -> tuple[jax.Array, jax.Array]:
    """Which users the rescue tries: ``(worst (n,), run)``.

    ``worst``: the ``n`` users with the largest relative residual ``score
    (t,)`` (all users, all devices), largest first; ``run``: whether the
    rescue runs at all (the largest score stands out above
    :func:`rescue_floor`). The one rule of the in-memory, sharded and
    streamed fits.
    """
    score = jnp.asarray(score)
    _, worst = jax.lax.top_k(score, n)
    return worst, jnp.max(score) > rescue_floor(score)


def cold_supports(data: UserData, U, config: AMHTConfig) -> jax.Array:
    """``(t, k)`` starting supports: top-k correlations with the low-rank residual."""

    allowed = sparse_options(config, data.X.shape[2])["allowed"]
    cold = jax.vmap(
        functools.partial(cold_support, allowed=allowed), (0, 0, 0, None, None)
    )

    def fn(args, fresh):
        X, y, mask = args
        A, y = _low_rank_columns(X, y, mask, U)
        return cold(A, X, y, config.sparsity, config.ridge), None

    return map_user_chunks(fn, (data.X, data.y, data.mask), chunk_size(data, config))[0]


def relative_residual(data: UserData, sq_residual) -> jax.Array:
    """``(t,)`` scores ``||res_i||^2 / ||y_i||^2`` over each user's samples."""
    y_sq = jnp.sum(jnp.where(data.mask, data.y, 0) ** 2, axis=1)
    return score_from_sums(sq_residual, y_sq)


def score_from_sums(sq_residual, y_sq):
    """``sq_residual / y_sq`` per user (0 labels give the residual / tiny).

    Works on numpy arrays as on jax arrays (the streamed fit keeps its
    per-user sums on the host).
    """
    return sq_residual / (y_sq + np.finfo(y_sq.dtype).tiny)


def _rescue_worst(
    data: UserData, U, fits: UserFit, cache: UserCache, config, chunk: int, axis=None
) -> tuple[UserFit, UserCache]:
    """Runs :func:`rescue` on the ``rescue_fraction`` of users that fit worst.

    Skipped when the worst users do not stand out (largest relative residual
    below 10x the median): at a fixed point where every user fits equally well
    there is nothing to rescue. With ``axis``, the worst users and the median
    are over all devices' users and each device rescues its own.
    """
    t_local = data.X.shape[0]
    n = rescue_count(t_local if axis is None else axis.num_users, config)
    if n == 0:
        return fits, cache
    score = all_users(relative_residual(data, fits.sq_residual), axis)
    worst, run = rescue_selection(score, n)
    chosen = None
    if axis is not None:
        worst, chosen = _local_rows(worst, t_local, axis)
    subset = jax.tree.map(lambda a: a[worst], (fits, cache))

    def fn(args, fresh):
        users, current = args
        X, y, mask = data.X[users], data.y[users], data.mask[users]
        better = rescue_masked(X, y, mask, U, current, config)
        return (better, user_cache(X, y, mask, U, better)), None

    better = jax.lax.cond(
        run,
        lambda: map_user_chunks(fn, (worst, subset[0]), chunk)[0],
        lambda: subset,
    )
    if chosen is not None:  # rows that only fill this device's buffer
        better = jax.tree.map(lambda a, b: _where_rows(chosen, a, b), better, subset)
    return jax.tree.map(lambda a, b: a.at[worst].set(b), (fits, cache), better)


def _local_rows(worst, t_local: int, axis) -> tuple[jax.Array, jax.Array]:
    """This device's rows among the global indices ``worst (n,)``.

    Returns ``(rows (min(n, t_local),), chosen)``: the chosen rows first, then
    filler rows (``chosen`` False) whose results are to be discarded.
    """
    local = worst - first_user(t_local, axis)
    mine = (local >= 0) & (local < t_local)
    flags = jnp.zeros((t_local,), jnp.int32)
    flags = flags.at[jnp.where(mine, local, t_local)].set(1, mode="drop")
    chosen, rows = jax.lax.top_k(flags, min(worst.shape[0], t_local))
    return rows, chosen.astype(bool)
