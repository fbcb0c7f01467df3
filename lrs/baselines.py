"""Baselines to compare AMHT-LRS with, all shaped like :func:`lrs.fit`.

Every baseline is ``(data, config, *, key=None) -> (params, diagnostics)``.
``config`` is an :class:`lrs.AMHTConfig` (its ``rank``, ``sparsity`` and
``num_iters`` are used) or a :class:`BaselineConfig` (the same plus the
baselines' own settings). ``params`` is always an :class:`lrs.LRSParams`, so
``lrs.predict``, ``lrs.weights`` and ``lrs.metrics`` apply to every method;
the shapes say what a method stores per user:

==================  ==========  ==========  ===================================
baseline            U           V           B (``SparseRows``)
==================  ==========  ==========  ===================================
``low_rank_only``   ``(d, r)``  ``(t, r)``  ``k = 0``
``sparse_only``     ``(d, 0)``  ``(t, 0)``  ``k`` per user
``local_ridge``     ``(d, 0)``  ``(t, 0)``  dense: ``k = d``, indices ``0..d-1``
``global_model``    ``(d, 1)``  ``(t, 1)``  ``k`` (fine-tune) or ``0``;
                                            ``V`` is the same for every user
``convex``          ``(d, r^)`` ``(t, r^)`` ``k^`` = most nonzeros of a user
``oracle``          given       ``(t, r)``  ``k``
==================  ==========  ==========  ===================================

``diagnostics`` is a dict of numpy arrays / Python scalars (listed per baseline).

``low_rank_only``, ``sparse_only``, ``local_ridge`` and ``global_model`` also
take a :class:`lrs.RaggedData` (users' samples without padding) and return
the same fit as on its padded form: per-user sums by ``np.add.reduceat``
over each user's rows, per-user solvers on blocks of users of similar
counts (each padded to its own largest count rounded up to a power of two,
never to ``t x m_max``), ``low_rank_only`` by :func:`lrs.fit_streamed`.
``convex`` and ``oracle`` need padded data (``data.padded(m)``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lrs import amht, ragged_blocks, shared, streaming
from lrs.chunking import map_user_chunks
from lrs.config import AMHTConfig
from lrs.data import RaggedData, UserData
from lrs.diagnostics import Diagnostics, fixed_length
from lrs.linalg import spd_solve, top_k_indices
from lrs.metrics import mean_squared_error
from lrs.params import LRSParams, SparseRows, predict
from lrs.peruser import (
    per_user_step,
)
from lrs.validation import (
    check_data,
    check_fraction,
    check_integer,
    check_key,
    check_ragged,
    check_real,
)

__all__ = [
    "BASELINES",
    "BaselineConfig",
    "convex",
    "global_model",
    "local_ridge",
    "low_rank_only",
    "oracle",
    "sparse_only",
]


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """Settings of the baselines; frozen and hashable.

    Attributes:
      rank: r of ``low_rank_only`` and ``oracle`` (``>= 1``).
      sparsity: k of ``sparse_only``, ``oracle`` and the ``global_model``
        fine-tune (``>= 0``).
      num_iters: outer iterations of ``low_rank_only`` (``>= 0``).
      ridge_grid: ``local_ridge`` penalties, relative to ``trace(X_i^T X_i) / d``
        of each user; the one with the smallest leave-one-out error wins.
      fine_tune: ``global_model`` adds a per-user k-sparse correction.
      convex_grid: ``convex`` penalties, as fractions of the smallest penalty
        that zeroes the solution; all pairs (nuclear, l1) are tried.
      convex_steps: accelerated proximal-gradient steps per penalty pair.
      validation_fraction: share of each user's samples held out to choose the
        ``convex`` penalties, in ``(0, 1)``.
    """

    rank: int = 1
    sparsity: int = 0
    num_iters: int = 30
    ridge_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    fine_tune: bool = True
    convex_grid: tuple[float, ...] = (0.3, 0.1, 0.03, 0.01)
    convex_steps: int = 200
    validation_fraction: float = 0.2

    def __post_init__(self):
        check_integer("rank", self.rank, 1)
        check_integer("sparsity", self.sparsity, 0)
        check_integer("num_iters", self.num_iters, 0)
        check_integer("convex_steps", self.convex_steps, 1)
        for name in ("ridge_grid", "convex_grid"):
            grid = getattr(self, name)
            if not isinstance(grid, tuple) or not grid:
                raise ValueError(f"{name} must be a non-empty tuple; got {grid!r}")
            for value in grid:
                expected = "a tuple of finite numbers > 0"
                check_real(name, value, expected, low=0, open_low=True)
        if not isinstance(self.fine_tune, bool):
            raise ValueError(f"fine_tune must be a bool; got {self.fine_tune!r}")
        check_fraction("validation_fraction", self.validation_fraction)


def _baseline_config(config) -> BaselineConfig:
    if isinstance(config, BaselineConfig):
        return config
    if isinstance(config, AMHTConfig):
        return BaselineConfig(config.rank, config.sparsity, config.num_iters)
    raise ValueError(
        f"config must be an lrs.AMHTConfig or lrs.baselines.BaselineConfig; "
        f"got {type(config).__name__}"
    )


def _amht_config(config, rank: int, sparsity: int) -> AMHTConfig:
    """An AMHTConfig with ``rank`` and ``sparsity`` (other fields kept if given)."""
    if isinstance(config, AMHTConfig):
        return dataclasses.replace(config, rank=rank, sparsity=sparsity)
    return AMHTConfig(rank, sparsity, num_iters=_baseline_config(config).num_iters)


def _check(data, sparsity: int, need: int):
    """Validated data (padded or ragged): ``sparsity < d``, every value
    finite and at least ``need`` samples per user."""
    if isinstance(data, RaggedData):
        data = check_ragged(data, AMHTConfig(1, 0))
        for field in ("X", "y"):
            if not np.isfinite(getattr(data, field)).all():
                raise ValueError(f"data.{field} contains NaN or inf values")
        counts = np.asarray(data.counts)
    else:
        data = check_data(data, AMHTConfig(1, 0))
        counts = data.counts
    if not sparsity < data.dim:
        raise ValueError(f"sparsity must be < d = {data.dim}; got {sparsity}")
    short = np.flatnonzero(counts < max(need, 1))
    if short.size:
        raise ValueError(
            f"data: {short.size} user(s) have fewer than {need} samples, e.g. "
            f"user {short[0]} ({counts[short[0]]})"
        )
    return data


def _padded_only(data, name: str) -> None:
    if isinstance(data, RaggedData):
        raise ValueError(
            f"data: {name} needs padded data (lrs.UserData); got an "
            f"lrs.RaggedData: pass data.padded(m) (t x m x d floats)"
        )


def _masked(data: UserData):
    X = jnp.where(data.mask[..., None], data.X, 0)
    return X, jnp.where(data.mask, data.y, 0)


def _chunk(data: UserData) -> int:
    return AMHTConfig(1, 0).chunk_size(data.X.shape[1], data.dim, data.X.dtype.itemsize)


def _no_factor(data: UserData, t: int) -> tuple[jax.Array, jax.Array]:
    dtype = data.X.dtype
    return jnp.zeros((data.dim, 0), dtype), jnp.zeros((t, 0), dtype)


def _one_shot(params: LRSParams, data: UserData, **details) -> Diagnostics:
    """The :class:`lrs.Diagnostics` of a baseline without iterations: one
    entry, its training loss (mean squared residual), ``details`` as numpy."""
    if isinstance(data, RaggedData):
        residual = predict(params, data.X, ragged_blocks.sample_users(data)) - data.y
        loss = float(jnp.mean(residual * residual))
    else:
        loss = float(mean_squared_error(params, data))
    details = {
        name: np.asarray(v) if isinstance(v, jax.Array) else v
        for name, v in details.items()
    }
    return fixed_length(1, loss=loss, details=details)


# ----------------------------------------------------------------- low rank only

RAGGED_CHUNK_USERS = 512
"""Users per chunk of :func:`low_rank_only`'s streamed fit on ragged data."""


def low_rank_only(data: UserData | RaggedData, config, *, key=None):
    """Shared rank-r U and per-user v_i, no sparse part (AltMin / FedRep).

    This is :func:`lrs.fit` with ``sparsity = 0``: alternating least squares
    for ``V`` given ``U`` and ``U`` given ``V`` from the moment initialization.

    On a :class:`lrs.RaggedData` this is :func:`lrs.fit_streamed` (users of
    similar counts in chunks of ``RAGGED_CHUNK_USERS``, kept on the device).

    Returns:
      ``(LRSParams with k = 0, Diagnostics)``: :func:`lrs.fit`'s, one entry
      per iteration.
    """
    cfg = _amht_config(config, _baseline_config(config).rank, 0)
    if isinstance(data, RaggedData):
        return streaming.fit(
            data, cfg, chunk_users=RAGGED_CHUNK_USERS, key=key, resident=True
        )
    return amht.fit(data, cfg, key=key)


# ------------------------------------------------------------------ sparse only


@functools.partial(jax.jit, static_argnames="config")
def _sparse_fits(data: UserData, config: AMHTConfig):
    """Cold-started per-user k-sparse fits with no shared factor (one pass of
    ``inner_steps + 6`` pursuit steps, then the rescue of the worst users)."""
    U = jnp.zeros((data.dim, 0), data.X.dtype)
    fits = per_user_step(data, U, None, config, steps=config.inner_steps + 6)
    return fits.support, fits.b, fits.sq_residual


def sparse_only(data: UserData | RaggedData, config, *, key=None):
    """Per-user k-sparse least squares, no sharing (hard-thresholding pursuit).

    Each user alone: ``min ||y_i - X_i b_i||^2`` over k-sparse ``b_i``, by the
    per-user solver of AMHT-LRS with an empty ``U`` (subspace pursuit from the
    top-k correlations, plus the l1 restart for the users that fit worst).

    Returns:
      ``(LRSParams with r = 0, Diagnostics)``; ``details``: ``sq_residual``
      ``(t,)`` training residual of each user.
    """
    k = _baseline_config(config).sparsity
    data = _check(data, k, k)
    ragged = isinstance(data, RaggedData)
    U, V = _no_factor(data, data.num_users)
    if k == 0:
        zero = jnp.zeros((data.num_users, 0), data.X.dtype)
        if ragged:
            sq_y = ragged_blocks.user_sums(data, lambda X, y, u: y * y)
        else:
            sq_y = jnp.sum(_masked(data)[1] ** 2, 1)
        B = SparseRows(zero.astype(jnp.int32), zero, data.dim)
        params = LRSParams(U, V, B)
        return params, _one_shot(params, data, sq_residual=sq_y)
    # num_iters does not matter here: fixed, so one compiled program serves all
    cfg = dataclasses.replace(_amht_config(config, 1, k), init="moments", num_iters=0)
    fits = ragged_blocks.sparse_fits if ragged else _sparse_fits
    support, values, sq_res = fits(data, cfg)
    params = LRSParams(U, V, SparseRows(support, values, data.dim))
    return params, _one_shot(params, data, sq_residual=sq_res)


# ------------------------------------------------------------------ local ridge


def _ridge_user(X, y, mask, grid):
    """One user's ridge fit, penalty by leave-one-out: ``(coef, alpha, loo)``."""
    left, s, right_t = jnp.linalg.svd(X, full_matrices=False)
    scale = jnp.sum(s * s) / X.shape[1] + jnp.finfo(X.dtype).tiny
    lam = grid * scale  # (A,)
    uy = left.T @ y
    shrink = (s * s) / (s * s + lam[:, None])  # (A, p)
    fitted = (shrink * uy) @ left.T  # (A, m)
    leverage = shrink @ (left * left).T  # (A, m)
    gap = jnp.maximum(1 - leverage, jnp.finfo(X.dtype).eps)
    loo = jnp.where(mask, ((y - fitted) / gap) ** 2, 0)
    err = jnp.sum(loo, axis=1) / jnp.maximum(jnp.sum(mask), 1)
    best = jnp.argmin(err)
    coef = right_t.T @ (s / (s * s + lam[best]) * uy)
    return coef, grid[best], err[best]


@jax.jit
def _ridge_all(data: UserData, grid):
    def fn(args, fresh):
        X, y, mask = args
        X = jnp.where(mask[..., None], X, 0)
        y = jnp.where(mask, y, 0)
        return jax.vmap(_ridge_user, (0, 0, 0, None))(X, y, mask, grid), None

    return map_user_chunks(fn, (data.X, data.y, data.mask), _chunk(data))[0]


def local_ridge(data: UserData | RaggedData, config, *, key=None):
    """Per-user ridge regression; each user's penalty by leave-one-out CV.

    ``theta_i = argmin ||y_i - X_i theta||^2 + alpha_i ||theta||^2`` with
    ``alpha_i = a * trace(X_i^T X_i) / d`` and ``a`` the entry of
    ``config.ridge_grid`` with the smallest leave-one-out error on the user's
    own samples (exact, from one SVD per user). No sharing, ``d`` numbers per user.

    Returns:
      ``(LRSParams with r = 0 and dense B (k = d), Diagnostics)``;
      ``details``: ``alpha`` ``(t,)`` chosen relative penalty, ``loo_mse``
      ``(t,)`` its leave-one-out mean squared error.
    """
    cfg = _baseline_config(config)
    data = _check(data, 0, 1)
    if isinstance(data, RaggedData):
        coef, alpha, loo = ragged_blocks.ridge_fits(data, np.asarray(cfg.ridge_grid))
    else:
        grid = jnp.asarray(cfg.ridge_grid, data.X.dtype)
        coef, alpha, loo = _ridge_all(data, grid)
    t, d = data.num_users, data.dim
    indices = jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32), (t, d))
    U, V = _no_factor(data, t)
    params = LRSParams(U, V, SparseRows(indices, coef, d))
    return params, _one_shot(params, data, alpha=alpha, loo_mse=loo)


# ----------------------------------------------------------------- global model


@jax.jit
def _pooled_least_squares(data: UserData):
    """``w`` minimizing ``sum_ij (y_ij - <x_ij, w>)^2``: one ``d x d`` solve."""

    def fn(args, fresh):
        X, y, mask = args
        keep = mask & fresh[:, None]
        X = jnp.where(keep[..., None], X, 0)
        y = jnp.where(keep, y, 0)
        return None, (jnp.einsum("cmd,cme->de", X, X), jnp.einsum("cmd,cm->d", X, y))

    G, h = map_user_chunks(fn, (data.X, data.y, data.mask), _chunk(data))[1]
    return spd_solve(G, h)


def global_model(data: UserData | RaggedData, config, *, key=None):
    """One linear model for all users, plus (optionally) a per-user k-sparse fix.

    ``w`` is pooled least squares over every sample. With ``config.fine_tune``
    (always on for an AMHTConfig) and ``sparsity > 0``, the model is
    ``theta_i = w + b_i``: alternately each user fits a k-sparse ``b_i`` to its
    residuals ``y_i - X_i w`` (as :func:`sparse_only`) and ``w`` is refitted
    to ``y_i - X_i b_i``, for up to ``num_iters`` rounds (until ``w`` stops
    moving). Stored as ``U = w / ||w||``, ``v_i = ||w||`` for every user.

    Returns:
      ``(LRSParams with r = 1, Diagnostics)``; ``details``: ``global_norm``
      ``||w||``, ``rounds`` of the alternation.
    """
    cfg = _baseline_config(config)
    k = cfg.sparsity if cfg.fine_tune else 0
    data = _check(data, k, k)
    t, d = data.num_users, data.dim
    w = _pooled(data)
    B = SparseRows(jnp.zeros((t, 0), jnp.int32), jnp.zeros((t, 0), w.dtype), d)
    rounds, blocks = 0, None
    while k > 0 and rounds < max(cfg.num_iters, 1):
        rounds += 1
        residual = _with_y(data, data.y - _linear_y(data, w))
        if isinstance(data, RaggedData):  # pad the users' X once, not per round
            blocks = ragged_blocks.padded_blocks(residual) if blocks is None else blocks
            B = _sparse_rows_ragged(
                residual, cfg, ragged_blocks.with_targets(residual, blocks)
            )
        else:
            B = sparse_only(residual, dataclasses.replace(cfg, rank=1))[0].B
        w_old, w = w, _pooled(_with_y(data, data.y - _sparse_y(data, B)))
        if jnp.linalg.norm(w - w_old) <= 1e-6 * jnp.linalg.norm(w):
            break
    norm = jnp.linalg.norm(w)
    U = jnp.where(
        norm > 0, w / jnp.where(norm > 0, norm, 1), jnp.eye(d, dtype=w.dtype)[0]
    )
    V = jnp.full((t, 1), norm, data.X.dtype)
    params = LRSParams(U[:, None], V, B)
    return params, _one_shot(params, data, global_norm=float(norm), rounds=rounds)


def _sparse_rows_ragged(data: RaggedData, cfg: BaselineConfig, blocks):
    """:func:`sparse_only`'s ``B`` on checked ragged data padded in ``blocks``."""
    k = cfg.sparsity
    amht_cfg = dataclasses.replace(_amht_config(cfg, 1, k), init="moments", num_iters=0)
    support, values, _ = ragged_blocks.sparse_fits(data, amht_cfg, blocks)
    return SparseRows(support, values, data.dim)


def _pooled(data) -> jax.Array:
    """Pooled least squares ``w`` of padded or ragged data."""
    if isinstance(data, RaggedData):
        G, h = data.X.T @ data.X, data.X.T @ data.y
        return spd_solve(jnp.asarray(G), jnp.asarray(h))
    return _pooled_least_squares(data)


def _with_y(data, y):
    """``data`` with targets ``y`` (zero on the padding of padded data)."""
    if isinstance(data, RaggedData):
        return data._replace(y=np.asarray(y, data.y.dtype))
    return data._replace(y=jnp.where(data.mask, y, 0))


def _linear_y(data, w) -> jax.Array | np.ndarray:
    """``<x_ij, w>`` of every sample: ``(N,)`` ragged, ``(t, m)`` padded."""
    if isinstance(data, RaggedData):
        return data.X @ np.asarray(w, data.X.dtype)
    return jnp.einsum("tmd,d->tm", data.X, w)


def _sparse_y(data, B: SparseRows) -> jax.Array | np.ndarray:
    """``<x_ij, b_i>``: ``(t, m)`` padded, ``(N,)`` ragged."""
    if isinstance(data, RaggedData):
        users = ragged_blocks.sample_users(data)
        idx, values = np.asarray(B.indices)[users], np.asarray(B.values)[users]
        return np.sum(np.take_along_axis(data.X, idx, axis=1) * values, axis=1)
    return shared.sparse_predictions(data.X, B.indices, B.values)


# ----------------------------------------------------------------------- convex


def _gradient(X, y, mask, W):
    """``(t, d)`` gradient of ``0.5 sum_ij (<x_ij, w_i> - y_ij)^2`` (masked data)."""
    res = jnp.where(mask, jnp.einsum("tmd,td->tm", X, W) - y, 0)
    return jnp.einsum("tmd,tm->td", X, res)


def _svt(Z, tau):
    """Singular-value soft thresholding: ``(prox of tau ||.||_*, rank)``."""
    left, s, right_t = jnp.linalg.svd(Z, full_matrices=False)
    shrunk = jnp.maximum(s - tau, 0)
    return (left * shrunk) @ right_t, jnp.sum(shrunk > 0)


def _soft(Z, tau):
    return jnp.sign(Z) * jnp.maximum(jnp.abs(Z) - tau, 0)


def _apg(X, y, mask, L, S, lam_nuc, lam_l1, step, steps: int):
    """FISTA on ``0.5 ||y - X(L + S)||^2 + lam_nuc ||L||_* + lam_l1 ||S||_1``."""

    def body(carry, _):
        L, S, L_z, S_z, s = carry
        G = _gradient(X, y, mask, L_z + S_z)
        L_new, _ = _svt(L_z - step * G, step * lam_nuc)
        S_new = _soft(S_z - step * G, step * lam_l1)
        s_new = 0.5 * (1 + jnp.sqrt(1 + 4 * s * s))
        beta = (s - 1) / s_new
        carry = (L_new, S_new, L_new + beta * (L_new - L), S_new + beta * (S_new - S))
        return carry + (s_new,), None

    one = jnp.ones((), X.dtype)
    (L, S, *_), _ = jax.lax.scan(body, (L, S, L, S, one), None, length=steps)
    return L, S


def _sq_error(X, y, mask, W):
    res = jnp.where(mask, jnp.einsum("tmd,td->tm", X, W) - y, 0)
    return jnp.sum(res * res)


@functools.partial(jax.jit, static_argnames=("steps",))
def _convex_path(X, y, train, valid, pairs, steps: int):
    """Warm-started path over penalty ``pairs (P, 2)``; validation SSE per pair."""
    t, _, d = X.shape
    step = 1 / (2 * jnp.max(jnp.linalg.norm(X, ord=2, axis=(1, 2))) ** 2 + 1e-30)
    G0 = _gradient(X, y, train, jnp.zeros((t, d), X.dtype))
    lam_max = jnp.stack([jnp.linalg.norm(G0, ord=2), jnp.max(jnp.abs(G0))])

    def body(carry, pair):
        L, S = carry
        lam = pair * lam_max
        L, S = _apg(X, y, train, L, S, lam[0], lam[1], step, steps)
        return (L, S), _sq_error(X, y, valid, L + S)

    zero = jnp.zeros((t, d), X.dtype)
    _, errors = jax.lax.scan(body, (zero, zero), pairs)
    return errors, lam_max, step


@functools.partial(jax.jit, static_argnames=("steps",))
def _convex_final(X, y, mask, lam, step, steps: int):
    zero = jnp.zeros(X.shape[::2], X.dtype)
    L, S = _apg(X, y, mask, zero, zero, lam[0], lam[1], step, steps)
    # one more proximal step, to read off the rank of the final L exactly
    G = _gradient(X, y, mask, L + S)
    L, rank = _svt(L - step * G, step * lam[0])
    return L, _soft(S - step * G, step * lam[1]), rank


def _validation_split(mask, fraction: float, key):
    """Random held-out share of each user's samples (at least one kept for training)."""
    u = jnp.where(mask, jax.random.uniform(key, mask.shape), jnp.inf)
    rank = jnp.argsort(jnp.argsort(u, axis=1), axis=1)
    count = jnp.sum(mask, axis=1, keepdims=True)
    n_valid = jnp.minimum(jnp.floor(fraction * count), count - 1)
    valid = mask & (rank < n_valid)
    return mask & ~valid, valid


def convex(data: UserData, config, *, key=None):
    """Nuclear norm + l1 penalized least squares: the convex relaxation.

    ``min_{L, S} 0.5 sum_ij (y_ij - <x_ij, l_i + s_i>)^2 + a ||L||_* + b ||S||_1``
    over ``(t, d)`` matrices (``||S||_1`` is the sum of the users' l1 norms),
    by FISTA with singular-value and soft thresholding. ``a, b`` range over
    ``config.convex_grid`` times the smallest penalties that give ``L = 0``,
    ``S = 0``; each pair is warm-started from the previous one on a random
    ``1 - validation_fraction`` of each user's samples, the pair with the
    smallest error on the rest wins, and the fit is redone on all samples.

    Returns:
      ``(LRSParams with the rank r^ and row sparsity k^ it found,
      Diagnostics)``; ``details``: ``penalties`` ``(a, b)``, ``grid`` the
      relative pairs tried, ``validation_sse`` per pair, ``rank``, ``sparsity``.
    """
    _padded_only(data, "convex")
    cfg = _baseline_config(config)
    data = _check(data, 0, 2)
    key = check_key(key, default=jax.random.key(0))
    X, y = _masked(data)
    train, valid = _validation_split(data.mask, cfg.validation_fraction, key)
    grid = sorted(cfg.convex_grid, reverse=True)
    pairs = jnp.asarray([(a, b) for a in grid for b in grid], X.dtype)
    errors, lam_max, step = _convex_path(X, y, train, valid, pairs, cfg.convex_steps)
    best = int(jnp.argmin(errors))
    lam = pairs[best] * lam_max
    L, S, _ = _convex_final(X, y, data.mask, lam, step, cfg.convex_steps)
    params = _as_lrs(np.asarray(L), np.asarray(S))
    return params, _one_shot(
        params,
        data,
        penalties=lam,
        grid=pairs,
        validation_sse=errors,
        rank=params.U.shape[1],
        sparsity=params.B.indices.shape[1],
    )


def _as_lrs(L: np.ndarray, S: np.ndarray) -> LRSParams:
    """``L + S`` exactly in LRS form: ``U`` from the nonzero singular values of
    ``L``, ``k^ = `` the most nonzeros in a row of ``S``."""
    left, s, right_t = np.linalg.svd(L, full_matrices=False)
    rank = int(np.sum(s > 1e3 * np.finfo(L.dtype).eps * max(s.max(initial=0), 1e-300)))
    U = right_t[:rank].T
    V = left[:, :rank] * s[:rank]
    k = int(np.max(np.sum(S != 0, axis=1), initial=0))
    idx = top_k_indices(jnp.abs(jnp.asarray(S)), k) if k else np.zeros((len(S), 0))
    idx = jnp.asarray(idx, jnp.int32)
    values = jnp.take_along_axis(jnp.asarray(S), idx, axis=1)
    return LRSParams(
        jnp.asarray(U), jnp.asarray(V), SparseRows(idx, values, S.shape[1])
    )


# ----------------------------------------------------------------------- oracle


@functools.partial(jax.jit, static_argnames=("config", "passes"))
def _oracle_fits(data: UserData, U, config: AMHTConfig, passes: int):
    """Cold-started per-user step given ``U``, then ``passes`` warm ones."""
    fits = per_user_step(data, U, None, config)
    body = lambda _, f: per_user_step(data, U, f.support, config)  # noqa: E731
    return jax.lax.fori_loop(0, passes, body, fits)


def oracle(data: UserData, config, *, key=None, U, passes: int = 10):
    """The true ``U`` given: only the per-user step (a reference, not a rival).

    ``v_i`` and k-sparse ``b_i`` for each user given ``U (d, r)``: the per-user
    step of AMHT-LRS, cold-started and then repeated ``passes`` times warm
    (as often as a fit runs it, so the oracle's per-user solver is no weaker
    than the one inside :func:`lrs.fit`). Use ``functools.partial(oracle,
    U=U)`` for the common signature.

    Returns:
      ``(LRSParams with the given U, Diagnostics)``; ``details``:
      ``sq_residual`` ``(t,)``.
    """
    _padded_only(data, "oracle")
    U = jnp.asarray(U)
    if U.ndim != 2 or U.shape[0] != data.X.shape[-1] or U.shape[1] < 1:
        raise ValueError(
            f"U must be a (d, r) array with d = {data.X.shape[-1]}, r >= 1; "
            f"got shape {U.shape}"
        )
    check_integer("passes", passes, 0)
    k = _baseline_config(config).sparsity
    cfg = dataclasses.replace(_amht_config(config, U.shape[1], k), init="moments")
    data = check_data(data, cfg)
    U = U.astype(data.X.dtype)
    if not bool(jnp.isfinite(U).all()):
        raise ValueError("U contains NaN or inf values")
    fits = _oracle_fits(data, U, dataclasses.replace(cfg, num_iters=0), passes)
    B = SparseRows(fits.support, fits.b, data.dim)
    params = LRSParams(U, fits.v, B)
    return params, _one_shot(params, data, sq_residual=fits.sq_residual)


BASELINES = {
    "low_rank_only": low_rank_only,
    "sparse_only": sparse_only,
    "local_ridge": local_ridge,
    "global_model": global_model,
    "convex": convex,
}
"""The competitors by name (``oracle`` needs ``U`` and is not among them)."""
