"""Per-user statistics of private AMHT-LRS and the data domain of a private fit.

Every function is per user (vmap over a leading user axis ``c`` or ``t``) or a
clipped sum over users; none reads another user's data to decide about one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lrs import peruser
from lrs.chunking import map_user_chunks
from lrs.data import UserData
from lrs.params import SparseRows
from lrs.private import mechanism as mech
from lrs.shared import sparse_predictions

# ------------------------------------------------------------- the data domain


def usable_users(data: UserData, min_samples: int) -> tuple[UserData, jax.Array]:
    """``(data, eligible (t,))``: users that can take part, the others emptied.

    A user takes part when every one of its samples (where ``mask``) is finite
    and it has at least ``min_samples`` of them; any other user's mask is
    cleared, so it contributes exactly nothing to any release and its local fit
    is zeros. Per-user and local: the decision about one user never depends on
    another user's data, and no value of the data refuses the fit.
    """
    mask = data.mask
    finite_x = jnp.all(jnp.isfinite(data.X) | ~mask[..., None], axis=(1, 2))
    finite_y = jnp.all(jnp.isfinite(data.y) | ~mask, axis=1)
    enough = jnp.sum(mask, axis=1) >= min_samples
    eligible = finite_x & finite_y & enough
    return UserData(data.X, data.y, mask & eligible[:, None]), eligible


# ------------------------------------------------------------- statistics


def _masked(data: UserData):
    X = jnp.where(data.mask[..., None], data.X, 0)
    return X, jnp.where(data.mask, data.y, 0)


def _moment_vectors(X, y, mask) -> jax.Array:
    """``(c, d)`` a_i = X_i^T y_i / m_i."""
    count = jnp.maximum(jnp.sum(mask, axis=1), 1).astype(X.dtype)
    return jnp.einsum("cmd,cm->cd", X, y) / count[:, None]


def moment_norms(data: UserData, chunk: int | None) -> jax.Array:
    """``(t,)`` Frobenius norms ``||a_i a_i^T|| = ||a_i||^2`` (inf on overflow)."""

    def fn(args, fresh):
        X, y, mask = args
        a = _moment_vectors(*_masked(UserData(X, y, mask)), mask)
        return mech.safe_norm(a, -1) ** 2, None

    return map_user_chunks(fn, tuple(data), chunk)[0]


def moment_sum(data: UserData, clip, scale, chunk: int | None, *, axis=None):
    """``(d, d)`` clipped sum ``sum_i scale_i c_i a_i a_i^T`` (all devices' users
    with ``axis``), ``c_i = min(1, clip / ||a_i||^2)``.

    The clip weight is computed here, from the very ``a_i`` that is summed
    (recomputing a statistic can round differently), as ``sum_i s_i s_i^T``
    with ``s_i = sqrt(scale_i c_i) a_i``, exactly 0 where the weight is 0 (an
    overflowed ``a_i`` never meets a zero weight in a product). ``clip = inf``:
    no clipping (non-finite users still add 0).
    """

    def fn(args, fresh):
        X, y, mask, scale = args
        a = _moment_vectors(*_masked(UserData(X, y, mask)), mask)
        norms = mech.safe_norm(a, -1)[:, None] ** 2
        w = mech.clip_weights(norms, jnp.reshape(clip, (1,))) * scale * fresh
        s = mech.weighted(a, jnp.sqrt(w))
        return None, s.T @ s

    return map_user_chunks(fn, (*data, scale), chunk, axis=axis)[1]


def user_statistics(X, y, mask, U, fit: peruser.UserFit):
    """Per-user ``G_i = X_i^T res_i v_i^T (c, d, r)`` and ``H_i = m_i v_i v_i^T``."""
    X = jnp.where(mask[..., None], X, 0)
    pred = jnp.einsum("cmd,dr,cr->cm", X, U, fit.v) + sparse_predictions(
        X, fit.support, fit.b
    )
    res = jnp.where(mask, y - pred, 0)
    G = jnp.einsum("cmd,cm,cr->cdr", X, res, fit.v)
    count = jnp.sum(mask, axis=1).astype(X.dtype)
    H = count[:, None, None] * fit.v[:, :, None] * fit.v[:, None, :]
    return G, H


def step_norms(data: UserData, U, fits: peruser.UserFit, chunk) -> jax.Array:
    """``(t, 2)`` norms of each user's ``(G_i, H_i)`` (inf or NaN on overflow)."""

    def fn(args, fresh):
        X, y, mask, fit = args
        G, H = user_statistics(X, y, mask, U, fit)
        return jnp.stack(
            [mech.safe_norm(G, (1, 2)), mech.safe_norm(H, (1, 2))], 1
        ), None

    return map_user_chunks(fn, (*data, fits), chunk)[0]


def step_sums(
    data: UserData, U, fits: peruser.UserFit, clips, scale, chunk, *, axis=None
):
    """Clipped ``(sum_i scale_i c_i G_i, sum_i scale_i c_i H_i)``: ``(d, r), (r, r)``.

    ``c_i`` (:func:`lrs.private.mechanism.clip_weights` at ``clips (2,)``) is
    computed here from the very ``G_i, H_i`` that are summed; users with weight
    0 add exactly 0. ``clips = inf``: no clipping. With ``axis`` (inside
    ``shard_map``) the sums run over all devices' users.
    """

    def fn(args, fresh):
        X, y, mask, fit, scale = args
        G, H = user_statistics(X, y, mask, U, fit)
        norms = jnp.stack([mech.safe_norm(G, (1, 2)), mech.safe_norm(H, (1, 2))], 1)
        w = mech.clip_weights(norms, clips) * scale * fresh
        return None, (mech.weighted(G, w).sum(0), mech.weighted(H, w).sum(0))

    return map_user_chunks(fn, (*data, fits, scale), chunk, axis=axis)[1]


def local_outputs(fits: peruser.UserFit, eligible, d: int):
    """``(V, SparseRows, excluded)``: each user's own fit, zeros where the user
    took no part or its fit is not finite (its data overflowed)."""
    finite = jnp.all(jnp.isfinite(fits.v), 1) & jnp.all(jnp.isfinite(fits.b), 1)
    ok = eligible & finite
    V = jnp.where(ok[:, None], fits.v, 0)
    b = jnp.where(ok[:, None], fits.b, 0)
    return V, SparseRows(fits.support, b, d), ~ok
