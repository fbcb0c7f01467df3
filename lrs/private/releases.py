"""The releases of private AMHT-LRS: clip levels, clip weights, noisy sums and
the released U of the initialization and of each shared step.

With ``axis`` (an :class:`lrs.sharding.UserAxis`, inside ``shard_map``) the
functions see this device's users and reduce every count and sum over the
devices before its noise, so every device releases the single-device value.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lrs.linalg import orthonormalize
from lrs.private import mechanism as mech
from lrs.private.statistics import (
    moment_norms,
    moment_sum,
    step_norms,
    step_sums,
)
from lrs.sharding import UserAxis, first_user, psum


class NoiseLevels(NamedTuple):
    """The noise and clip levels of a fit (traced arguments of the jitted fit)."""

    z: jax.Array  # statistic noise multiplier (0: none)
    z_histogram: jax.Array
    clip_moment: jax.Array  # NaN: choose privately
    clip_step: jax.Array  # (2,) for (G, H); NaN: choose privately


# ------------------------------------------------------------ the releases


def valid_users(t_local: int, axis: UserAxis | None):
    """``(t_local,)`` True for this device's real users; None on one device."""
    if axis is None:
        return None
    return first_user(t_local, axis) + jnp.arange(t_local) < axis.num_users


def _clip_level(levels, norms, fixed, axis=None):
    """Fixed clip levels, or the private quantile of ``norms (t, s)`` per column
    (binary search with the integer thresholds ``levels``)."""
    valid = valid_users(norms.shape[0], axis)
    chosen = mech.private_quantile(levels, norms, valid=valid, axis=axis)
    return jnp.where(jnp.isnan(fixed), chosen.astype(norms.dtype), fixed)


def init_clip(levels, norms, eligible, noise: NoiseLevels, axis=None):
    """The initialization's clip level from the ``(t,)`` moment norms (users
    not ``eligible`` count as norm 0)."""
    norms = jnp.where(eligible, norms, 0)
    return _clip_level(levels, norms[:, None], noise.clip_moment[None], axis)[0]


def init_release(M, normal, clip, z, rank: int):
    """The noisy moment sum ``(d, d)`` and the released ``U_0 (d, r)`` from the
    clipped sum ``M`` and the release's symmetric N(0, 1) draws ``normal``."""
    M = mech.noisy_sum(M, normal, clip, z)
    _, vectors = jnp.linalg.eigh(M)
    return M, orthonormalize(vectors[:, ::-1][:, :rank])[0]


def release_init(data, eligible, config, noise, draws, chunk, non_private, axis):
    """Released ``U_0 (d, r)``, the moment clip level and the noisy moment sum."""
    norms = moment_norms(data, chunk)
    clip = init_clip(draws.init_levels, norms, eligible, noise, axis)
    scale = eligible.astype(norms.dtype)
    M = moment_sum(data, sum_clips(clip, non_private), scale, chunk, axis=axis)
    M, U = init_release(M, draws.init_moment, clip, noise.z, config.rank)
    return U, clip, M


def _newton_direction(G, H, noise_std) -> jax.Array:
    """``G H^-1``, H's eigenvalues floored where its noise could flip them.

    The floor is the larger of 1e-6 of H's largest eigenvalue magnitude and
    twice the typical spectral norm of H's symmetric noise, ``2 sqrt(r)
    noise_std``: a function of released values only (post-processing).
    """
    lam, Q = jnp.linalg.eigh((H + H.T) / 2)
    r = H.shape[0]
    floor = jnp.maximum(1e-6 * jnp.max(jnp.abs(lam)), 2 * math.sqrt(r) * noise_std)
    lam = jnp.maximum(lam, jnp.maximum(floor, jnp.finfo(H.dtype).tiny))
    return (G @ Q / lam) @ Q.T


def step_selection(levels, batch_key, norms, eligible, noise, batch, axis=None):
    """A step's clip levels ``(2,)``, ``(t,)`` selection and clipped fraction.

    From the ``(t, 2)`` norms of ``(G_i, H_i)`` (users not ``eligible`` count
    as norm 0): the clip levels (fixed, or the private quantile); the
    selection, 1 for eligible users in the step's batch and 0 otherwise; the
    fraction of users these clip levels scale down (not released). With
    ``axis``, this device's users.
    """
    t_local = norms.shape[0]
    t = t_local if axis is None else axis.num_users
    norms = jnp.where(eligible[:, None], norms, 0)
    clips = _clip_level(levels, norms, noise.clip_step, axis)
    scaled = jnp.sum((mech.clip_weights(norms, clips) < 1) & eligible, dtype=jnp.int32)
    clipped = psum(scaled, axis) / t
    selection = eligible.astype(norms.dtype)
    if batch < t:
        # The batch is drawn over all t users, as on one device; each device
        # keeps the chosen users it holds.
        chosen = jax.random.permutation(batch_key, t)[:batch]
        if axis is not None:
            local = chosen - first_user(t_local, axis)
            mine = (local >= 0) & (local < t_local)
            chosen = jnp.where(mine, local, t_local)
        in_batch = jnp.zeros((t_local,), norms.dtype).at[chosen].set(1, mode="drop")
        selection = selection * in_batch
    return clips, selection, clipped


def sum_clips(clips, non_private: bool):
    """The clip levels the sums use: ``clips``, or inf in the non-private mode."""
    return jnp.full_like(clips, jnp.inf) if non_private else clips


def step_noise(draws: mech.StepDraws, G, H, clips, z):
    """The noisy ``(G, H)`` of a step from its N(0, 1) ``draws``."""
    return mech.noisy_sum(G, draws.G, clips[0], z), mech.noisy_sum(
        H, draws.H, clips[1], z
    )


def step_update(U, G, H, clips, z):
    """The released ``U <- orth(U + G H^-1)`` from the noisy ``(G, H)``."""
    H_noise = 2 * z * clips[1]
    return orthonormalize(U + _newton_direction(G, H, H_noise))[0]


def release_step_statistics(
    data,
    eligible,
    U,
    fits,
    draws,
    batch_key,
    noise,
    batch,
    chunk,
    non_private,
    axis=None,
):
    """The Gaussian release of one shared step; with ``axis``, on this device's
    users (every sum reduced over the devices before its noise is added).

    Returns ``(G (d, r), H (r, r), clips (2,), clipped_fraction)``.
    """
    norms = step_norms(data, U, fits, chunk)
    clips, selection, clipped = step_selection(
        draws.levels, batch_key, norms, eligible, noise, batch, axis
    )
    G, H = step_sums(
        data, U, fits, sum_clips(clips, non_private), selection, chunk, axis=axis
    )
    G, H = step_noise(draws, G, H, clips, noise.z)
    return G, H, clips, clipped
