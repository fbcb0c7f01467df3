"""The Gaussian mechanisms of private AMHT-LRS, as small pure functions.

Shapes: per-user statistics carry a leading user axis ``c``; ``A (c, d, r)``
(or ``(c, d, d)``) and ``H (c, r, r)``. See docs/privacy.md for the proofs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lrs.sharding import psum

#: Clip-level histogram: log2-spaced bins, BINS_PER_OCTAVE per octave, from
#: 2**LOG2_LOW to 2**LOG2_HIGH; values outside land in the end bins.
LOG2_LOW, LOG2_HIGH, BINS_PER_OCTAVE = -40, 40, 4
NUM_BINS = (LOG2_HIGH - LOG2_LOW) * BINS_PER_OCTAVE


def bin_upper_edges(dtype=jnp.float32) -> jax.Array:
    """``(NUM_BINS,)`` upper edge of each histogram bin."""
    steps = jnp.arange(1, NUM_BINS + 1, dtype=jnp.float32)
    return jnp.exp2(LOG2_LOW + steps / BINS_PER_OCTAVE).astype(dtype)


def histogram_bins(norms: jax.Array) -> jax.Array:
    """Bin of each norm ``(c,) -> (c,) int32`` (zeros and tiny norms -> bin 0)."""
    tiny = jnp.exp2(jnp.asarray(LOG2_LOW, jnp.float32))
    safe = jnp.maximum(norms.astype(jnp.float32), tiny)
    position = jnp.ceil((jnp.log2(safe) - LOG2_LOW) * BINS_PER_OCTAVE) - 1
    return jnp.clip(position, 0, NUM_BINS - 1).astype(jnp.int32)


#: Noisy count queries of one private quantile: a binary search over the bins.
SEARCH_LEVELS = math.ceil(math.log2(NUM_BINS))


def private_quantile(
    key, norms: jax.Array, quantile, sigma, *, valid=None, axis=None
) -> jax.Array:
    """Noisy ``quantile`` of each column of ``norms (t, s)``: ``(s,)`` bin edges.

    A binary search over the fixed log2 bins: each of :data:`SEARCH_LEVELS`
    levels releases, per column, the count of users whose norm's bin is at most
    the midpoint, plus N(0, sigma^2) noise. Replacing one user changes each
    count by at most 1 (L2 at most sqrt(s) <= 2 over the columns for s <= 4),
    so with ``sigma = 2 z_h`` every level is a Gaussian mechanism with noise
    multiplier at least ``z_h``. Unlike a noisy histogram, whose cumulative
    noise grows with the number of empty bins below the quantile, each level's
    error is one draw of the noise.

    Sharded (inside ``shard_map``, ``axis`` an :class:`lrs.sharding.UserAxis`):
    ``norms`` holds this device's users, ``valid (t_local,)`` marks the real
    ones (padding counts nowhere), each level's counts are summed over the
    devices *before* the noise is added, and the noise comes from the same
    ``key`` on every device, so every device releases the same value, equal to
    the single-device one; the target is ``quantile`` of all ``axis.num_users``.
    """
    bins = histogram_bins(norms)  # (t, s)
    num_users = norms.shape[0] if axis is None else axis.num_users
    target = quantile * num_users
    s = norms.shape[1]
    if valid is not None:  # padded users fall past the last bin: never counted
        bins = jnp.where(valid[:, None], bins, NUM_BINS)

    def level(i, bounds):
        low, high = bounds  # (s,) each: the answer lies in [low, high]
        mid = (low + high) // 2
        count = jnp.sum(bins <= mid, axis=0).astype(jnp.float32)
        count = psum(count, axis)  # the exact integer count over all devices
        noisy = count + sigma * jax.random.normal(jax.random.fold_in(key, i), (s,))
        enough = noisy >= target
        return jnp.where(enough, low, mid + 1), jnp.where(enough, mid, high)

    start = (jnp.zeros((s,), jnp.int32), jnp.full((s,), NUM_BINS - 1, jnp.int32))
    _, high = jax.lax.fori_loop(0, SEARCH_LEVELS, level, start)
    return bin_upper_edges()[high]


def histogram(norms: jax.Array, weight: jax.Array) -> jax.Array:
    """``(NUM_BINS,)`` counts of ``norms (c,)``, each user counted ``weight (c,)``."""
    one_hot = jax.nn.one_hot(histogram_bins(norms), NUM_BINS, dtype=jnp.float32)
    return jnp.einsum("cb,c->b", one_hot, weight.astype(jnp.float32))


def clip_weights(norms: jax.Array, clips: jax.Array) -> jax.Array:
    """``c_i = min(1, 1 / ||norms_i / clips||)`` for ``norms (c, s)``, ``clips (s,)``.

    Scaling user i's statistics by ``c_i`` bounds the normalized contribution
    ``(c_i A_i / C_A, c_i H_i / C_H)`` by 1 in L2 norm (Lemma 1).
    """
    joint = jnp.sqrt(jnp.sum((norms / clips) ** 2, axis=-1))
    return jnp.where(joint > 1, 1 / jnp.where(joint > 1, joint, 1), 1)


def symmetric_noise(key, n: int, dtype) -> jax.Array:
    """``(n, n)`` symmetric matrix with iid N(0, 1) upper triangle (mirrored)."""
    upper = jnp.triu(jax.random.normal(key, (n, n), dtype))
    return upper + jnp.triu(upper, 1).T


def noisy_sum(key, total: jax.Array, clip, z, symmetric: bool = False) -> jax.Array:
    """``total + clip * 2 z N(0, I)``: the Gaussian mechanism of Lemma 1.

    ``total`` is a sum of user contributions each of Frobenius norm at most
    ``clip`` (jointly with the other statistic of the same release);
    ``symmetric`` releases the upper triangle and mirrors it.
    """
    if symmetric:
        noise = symmetric_noise(key, total.shape[-1], total.dtype)
    else:
        noise = jax.random.normal(key, total.shape, total.dtype)
    return total + (clip * 2 * z).astype(total.dtype) * noise
