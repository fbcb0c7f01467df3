"""Ragged data in blocks of users of similar sample counts, and the per-user
computations of the baselines on them.

A :class:`lrs.RaggedData` is cut into blocks of users whose counts round up
to the same power of two (``padded_width``), each padded to it (at most
``_BLOCK_BYTES`` of ``X`` a block): memory follows the number of samples, not
``t m_max``. Per-user sums over the samples (:func:`user_sums`) need no
padding at all. :mod:`lrs.baselines` runs its ragged paths through these.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lrs.chunking import map_user_chunks
from lrs.config import AMHTConfig
from lrs.data import RaggedData, UserData, padded_width
from lrs.peruser import (
    UserFit,
    chunk_size,
    cold_supports,
    pursue_chunk,
    rescue_candidate,
    rescue_count,
    rescue_selection,
    score_from_sums,
    sparse_options,
)

_BLOCK_BYTES = 64 * 2**20  # X of one padded block of users (ragged data)
_SUM_ROWS = 2**15  # samples per step of the per-user sums


def sample_users(data: RaggedData) -> np.ndarray:
    """``(N,)`` the user of each sample."""
    return np.repeat(np.arange(data.num_users), data.counts)


def user_sums(data: RaggedData, fn) -> np.ndarray:
    """``(t, ...)`` sums over each user's samples of ``fn(X, y, users)``
    (``(n, ...)`` values of ``n`` samples, given with their users), by
    ``np.add.reduceat`` on ``_SUM_ROWS`` samples at a time."""
    offsets, n, owner = data.offsets, data.X.shape[0], sample_users(data)
    out = None
    for start in range(0, max(n, 1), _SUM_ROWS):
        stop = min(start + _SUM_ROWS, n)
        rows = slice(start, stop)
        values = np.asarray(fn(data.X[rows], data.y[rows], owner[rows]))
        if out is None:
            out = np.zeros((data.num_users,) + values.shape[1:], values.dtype)
        users = np.flatnonzero((offsets[:-1] < stop) & (offsets[1:] > start))
        if users.size:
            first = np.maximum(offsets[users], start) - start
            out[users] += np.add.reduceat(values, first, axis=0)
    return out


def pad(data: RaggedData, users: np.ndarray, m: int) -> UserData:
    """``users`` as a padded :class:`UserData` of ``m`` samples per user."""
    row, column, source = data.positions(users)
    X = np.zeros((len(users), m, data.dim), data.X.dtype)
    y = np.zeros((len(users), m), data.X.dtype)
    mask = np.zeros((len(users), m), bool)
    X[row, column], y[row, column] = data.X[source], data.y[source]
    mask[row, column] = True
    return UserData(jnp.asarray(X), jnp.asarray(y), jnp.asarray(mask))


def padded_blocks(data: RaggedData) -> list:
    """``[(users, block)]``: users of the same ``padded_width``, padded to
    it, at most ``_BLOCK_BYTES`` of ``X`` a block (at least one user)."""
    users = np.arange(data.num_users)
    widths = np.array([padded_width(c) for c in data.counts])
    blocks = []
    for m in np.unique(widths):
        group = users[widths == m]
        per = max(1, _BLOCK_BYTES // (int(m) * data.dim * data.X.dtype.itemsize))
        for part in np.array_split(group, -(-len(group) // per)):
            blocks.append((part, pad(data, part, int(m))))
    return blocks


def with_targets(data: RaggedData, blocks: list) -> list:
    """``blocks`` of an earlier :func:`padded_blocks` call with ``data.y`` as
    targets (only ``y`` is copied again: the same ``X`` and users)."""
    out = []
    for users, block in blocks:
        row, column, source = data.positions(users)
        y = np.zeros(block.y.shape, data.y.dtype)
        y[row, column] = data.y[source]
        out.append((users, block._replace(y=jnp.asarray(y))))
    return out


def per_block(data: RaggedData, fn, blocks: list | None = None):
    """``fn(block)`` (per-user outputs) on every block (``blocks`` of
    ``data``, default :func:`padded_blocks`), as ``(t, ...)`` numpy arrays."""
    out = None
    for users, block in padded_blocks(data) if blocks is None else blocks:
        part = jax.tree.map(np.asarray, fn(block))
        if out is None:
            out = jax.tree.map(
                lambda a: np.zeros((data.num_users,) + a.shape[1:], a.dtype), part
            )
        for buffer, value in zip(jax.tree.leaves(out), jax.tree.leaves(part)):
            buffer[users] = value
    return out


@functools.partial(jax.jit, static_argnames=("config", "steps"))
def pursue_block(data: UserData, config: AMHTConfig, steps: int) -> UserFit:
    """:func:`_sparse_fits`'s pursuit on one block (its rescue comes after,
    over all users)."""
    U = jnp.zeros((data.dim, 0), data.X.dtype)
    warm, opts = cold_supports(data, U, config), sparse_options(config, data.dim)

    def fn(args, fresh):
        X, y, mask, support = args
        fits, _ = pursue_chunk(X, y, mask, support, U, steps, config.ridge, **opts)
        return fits, None

    args = (data.X, data.y, data.mask, warm)
    return map_user_chunks(fn, args, chunk_size(data, config))[0]


@functools.partial(jax.jit, static_argnames=("config", "start"))
def rescue_block(data: UserData, fits: UserFit, config: AMHTConfig, start: str):
    """One candidate (``'cold'`` or ``'l1'``) of the rescue on one block: one
    chain of batched factorizations per program, as the streamed fit (two
    chains in one program can deadlock XLA:CPU's pool, docs/scale.md)."""
    U = jnp.zeros((data.dim, 0), data.X.dtype)

    def fn(args, fresh):
        return rescue_candidate(*args[:3], U, args[3], config, start), None

    args = (data.X, data.y, data.mask, fits)
    return map_user_chunks(fn, args, chunk_size(data, config))[0]


def sparse_fits(data: RaggedData, config: AMHTConfig, blocks=None):
    """The sparse fits of :func:`lrs.baselines.sparse_only` on ragged data:
    the pursuit block by block (``blocks``: those of ``data`` when already
    padded), then the rescue of the worst users of all (the same rule, the
    same fits)."""
    steps = config.inner_steps + 6
    pursue = functools.partial(pursue_block, config=config, steps=steps)
    fits = per_block(data, pursue, blocks)
    n = rescue_count(data.num_users, config)
    score = score_from_sums(fits.sq_residual, user_sums(data, lambda X, y, u: y * y))
    worst, run = rescue_selection(score, n)
    if n and bool(run):
        rescue_users(data, fits, np.asarray(worst), config)
    return fits.support, fits.b, fits.sq_residual


def rescue_users(data: RaggedData, fits: UserFit, worst, config) -> None:
    """The rescue of the users ``worst`` into ``fits`` (numpy, in place), by
    width class, each padded to a power-of-two number of users (repeats of
    its first user, discarded): few shapes, so few compiles over the rounds
    of :func:`lrs.baselines.global_model`; the rescue is per user, so the same fits."""
    widths = np.array([padded_width(c) for c in data.counts[worst]])
    for m in np.unique(widths):
        users = worst[widths == m]
        filled = np.concatenate([users, np.repeat(users[:1], padded_width(len(users)))])
        filled = filled[: padded_width(len(users))]
        block = pad(data, filled, int(m))
        better = jax.tree.map(lambda a: jnp.asarray(a[filled]), fits)
        for start in ("cold", "l1") if config.l1_steps > 0 else ("cold",):
            better = rescue_block(block, better, config, start)
        for buffer, value in zip(fits, better):
            buffer[users] = np.asarray(value)[: len(users)]


def ridge_fits(data: RaggedData, grid: np.ndarray):
    """The per-user ridge of :func:`lrs.baselines.local_ridge` from per-user
    sums: ``G_i = X_i^T X_i = Q S Q^T``, then each sample's leverage
    ``sum_p (q_p^T x)^2 / (s_p + lam)`` and fitted value under every penalty
    of ``grid``, summed by user."""
    dtype = data.X.dtype
    G = user_sums(data, lambda X, y, u: X[:, :, None] * X[:, None, :])
    s, Q = np.linalg.eigh(G)
    s = np.maximum(s, 0)
    scale = np.trace(G, axis1=1, axis2=2) / data.dim + np.finfo(dtype).tiny
    lam = (grid.astype(dtype) * scale[:, None])[:, :, None]  # (t, A, 1)
    c = np.einsum("tde,td->te", Q, user_sums(data, lambda X, y, u: X * y[:, None]))
    inverse = 1 / (s[:, None, :] + lam)  # (t, A, d)
    eps = np.finfo(dtype).eps

    def loo_rows(X, y, u):
        z = np.einsum("nd,nde->ne", X, Q[u])
        leverage = np.einsum("ne,nae->na", z * z, inverse[u])
        fitted = np.einsum("ne,nae->na", z * c[u], inverse[u])
        gap = np.maximum(1 - leverage, eps)
        return ((y[:, None] - fitted) / gap) ** 2

    err = user_sums(data, loo_rows) / np.maximum(data.counts, 1)[:, None]
    best = np.argmin(err, axis=1)
    t = np.arange(data.num_users)
    coef = np.einsum("tde,te->td", Q, c * inverse[t, best])
    return jnp.asarray(coef), jnp.asarray(grid[best], dtype), err[t, best]
