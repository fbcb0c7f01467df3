"""The Gaussian mechanisms of private AMHT-LRS, as small pure functions.

Shapes: per-user statistics carry a leading user axis ``c``; ``A (c, d, r)``
(or ``(c, d, d)``) and ``H (c, r, r)``. See docs/privacy.md for the proofs.

Floating point (docs/privacy.md, section 2.5): every noise sample is drawn in
float64 before the fit (:func:`draw_noise`; it does not depend on the data),
the noisy counts of the private quantiles are compared as integers, and a
user whose statistics are not finite (or whose norm overflows) gets clip
weight exactly 0 through a ``where``, never through a product with inf.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lrs.sharding import psum

#: Clip-level histogram: log2-spaced bins, BINS_PER_OCTAVE per octave, from
#: 2**LOG2_LOW to 2**LOG2_HIGH; values outside land in the end bins.
LOG2_LOW, LOG2_HIGH, BINS_PER_OCTAVE = -40, 40, 4
NUM_BINS = (LOG2_HIGH - LOG2_LOW) * BINS_PER_OCTAVE

#: Noisy count queries of one private quantile: a binary search over the bins.
SEARCH_LEVELS = math.ceil(math.log2(NUM_BINS))

#: Folded into the secret key: the branches of the key tree (docs/privacy.md).
INIT_BRANCH, STEP_BRANCH, BATCH_BRANCH = 0, 1, 2


def bin_upper_edges(dtype=jnp.float32) -> jax.Array:
    """``(NUM_BINS,)`` upper edge of each histogram bin."""
    steps = jnp.arange(1, NUM_BINS + 1, dtype=jnp.float32)
    return jnp.exp2(LOG2_LOW + steps / BINS_PER_OCTAVE).astype(dtype)


def histogram_bins(norms: jax.Array) -> jax.Array:
    """Bin of each norm ``(c,) -> (c,) int32``.

    Zeros and tiny norms go to bin 0; inf and NaN (a statistic that overflowed)
    to the last bin.
    """
    norms = jnp.where(jnp.isnan(norms), jnp.inf, norms).astype(jnp.float32)
    tiny = jnp.exp2(jnp.asarray(LOG2_LOW, jnp.float32))
    position = jnp.ceil(
        (jnp.log2(jnp.maximum(norms, tiny)) - LOG2_LOW) * BINS_PER_OCTAVE
    )
    return jnp.clip(position - 1, 0, NUM_BINS - 1).astype(jnp.int32)


# ------------------------------------------------------------------ the noise


class NoiseDraws(NamedTuple):
    """Every noise sample of one private fit, drawn before it (float64).

    Standard normal draws (the clip level and ``z`` scale them in the fit) and
    the quantiles' integer thresholds. Built by :func:`draw_noise`.
    """

    init_levels: jax.Array  # (SEARCH_LEVELS, 1) int32: moment clip quantile
    init_moment: jax.Array  # (d, d) symmetric N(0, 1): moment matrix
    step_levels: jax.Array  # (T, SEARCH_LEVELS, 2) int32: (G, H) clip quantiles
    step_G: jax.Array  # (T, d, r) N(0, 1)
    step_H: jax.Array  # (T, r, r) symmetric N(0, 1)


class StepDraws(NamedTuple):
    """The draws of one shared step (a slice of :class:`NoiseDraws`)."""

    levels: jax.Array  # (SEARCH_LEVELS, 2) int32
    G: jax.Array  # (d, r)
    H: jax.Array  # (r, r)


def step_draws(draws: NoiseDraws, i) -> StepDraws:
    """The draws of shared step ``i`` (may be traced)."""
    return StepDraws(draws.step_levels[i], draws.step_G[i], draws.step_H[i])


def symmetric_normal(key, n: int, dtype) -> jax.Array:
    """``(n, n)`` symmetric matrix with iid N(0, 1) upper triangle (mirrored)."""
    upper = jnp.triu(jax.random.normal(key, (n, n), dtype))
    return upper + jnp.triu(upper, 1).T


def quantile_thresholds(key, columns: int, num_users, quantile, z_histogram):
    """``(SEARCH_LEVELS, columns)`` int32 thresholds of one private quantile.

    ``ceil(quantile * t - 2 z_histogram n)`` with ``n ~ N(0, 1)`` drawn in
    float64 (needs 64-bit types), clipped to ``[0, 2^31 - 2]``: level ``l``
    accepts when the integer count reaches it (:func:`private_quantile`).
    """
    sigma = 2 * jnp.asarray(z_histogram, jnp.float64)
    target = jnp.asarray(quantile, jnp.float64) * jnp.asarray(num_users, jnp.float64)
    n = jax.random.normal(key, (SEARCH_LEVELS, columns), jnp.float64)
    return jnp.clip(jnp.ceil(target - sigma * n), 0, 2.0**31 - 2).astype(jnp.int32)


def draw_noise(
    key, *, steps: int, d: int, r: int, num_users, quantile, z_histogram
) -> NoiseDraws:
    """All the noise of a private fit from the secret ``key``, in float64.

    Needs 64-bit types (``jax.enable_x64``); :func:`lrs.private.fit` calls it
    under ``jax.enable_x64(True)`` outside its main program, so float32 data
    get float64-drawn noise (full Gaussian tails, no 5.2-sigma cap of float32
    sampling). The key tree: ``fold_in(key, INIT_BRANCH)`` splits into the
    moment quantile's counts and the moment matrix; ``fold_in(fold_in(key,
    STEP_BRANCH), i)`` splits into step ``i``'s quantile counts, G and H. The
    batch branch (:func:`batch_key`) is never used here.

    Args:
      key: the fit's secret ``jax.random`` key.
      steps: shared steps T (static).
      d: features (static).
      r: rank (static).
      num_users: t, the users the quantile targets count.
      quantile: the clip quantile (the target count is ``quantile * t``).
      z_histogram: noise multiplier of the counts (their noise is
        ``2 z_histogram``: two columns share one release).
    """
    if not jax.config.jax_enable_x64:
        raise RuntimeError("draw_noise needs jax.enable_x64(True)")
    counts = dict(num_users=num_users, quantile=quantile, z_histogram=z_histogram)
    k_levels, k_moment = jax.random.split(jax.random.fold_in(key, INIT_BRANCH))
    init_levels = quantile_thresholds(k_levels, 1, **counts)
    init_moment = symmetric_normal(k_moment, d, jnp.float64)
    k_steps = jax.random.fold_in(key, STEP_BRANCH)

    def one_step(i):
        k_q, k_G, k_H = jax.random.split(jax.random.fold_in(k_steps, i), 3)
        return (
            quantile_thresholds(k_q, 2, **counts),
            jax.random.normal(k_G, (d, r), jnp.float64),
            symmetric_normal(k_H, r, jnp.float64),
        )

    levels, G, H = jax.vmap(one_step)(jnp.arange(steps))
    return NoiseDraws(init_levels, init_moment, levels, G, H)


def batch_key(key, i) -> jax.Array:
    """The key of step ``i``'s batch of users (secret: subsampling amplifies
    privacy only while the batch stays hidden)."""
    return jax.random.fold_in(jax.random.fold_in(key, BATCH_BRANCH), i)


# ----------------------------------------------------------- the quantiles


def private_quantile(levels, norms: jax.Array, *, valid=None, axis=None) -> jax.Array:
    """Noisy quantile of each column of ``norms (t, s)``: ``(s,)`` bin edges.

    A binary search over the fixed log2 bins: level ``l`` compares, per column,
    the integer count of users whose norm's bin is at most the midpoint with
    the threshold ``levels[l]`` (:func:`quantile_thresholds`), which is the
    noisy count ``count + sigma n >= quantile * t`` decided exactly. Replacing
    one user changes each count by at most 1 (L2 at most sqrt(s) <= 2 over the
    columns for s <= 4), so with ``sigma = 2 z_h`` every level is a Gaussian
    mechanism with noise multiplier at least ``z_h``.

    Sharded (inside ``shard_map``, ``axis`` an :class:`lrs.sharding.UserAxis`):
    ``norms`` holds this device's users, ``valid (t_local,)`` marks the real
    ones (padding counts nowhere), and each level's counts are summed over the
    devices before the comparison, so every device takes the same decisions as
    the single-device fit.
    """
    bins = histogram_bins(norms)  # (t, s)
    s = norms.shape[1]
    if valid is not None:  # padded users fall past the last bin: never counted
        bins = jnp.where(valid[:, None], bins, NUM_BINS)

    def level(i, bounds):
        low, high = bounds  # (s,) each: the answer lies in [low, high]
        mid = (low + high) // 2
        count = psum(jnp.sum(bins <= mid, axis=0, dtype=jnp.int32), axis)
        enough = count >= levels[i]
        return jnp.where(enough, low, mid + 1), jnp.where(enough, mid, high)

    start = (jnp.zeros((s,), jnp.int32), jnp.full((s,), NUM_BINS - 1, jnp.int32))
    _, high = jax.lax.fori_loop(0, SEARCH_LEVELS, level, start)
    return bin_upper_edges()[high]


# ----------------------------------------------------------- the clipping


def safe_norm(a: jax.Array, axes) -> jax.Array:
    """Frobenius norm over ``axes`` that does not overflow on finite entries.

    ``max|a| * ||a / max|a|||``: finite for any finite ``a`` whose norm is
    representable; inf or NaN when an entry is.
    """
    scale = jnp.max(jnp.abs(a), axis=axes, keepdims=True)
    safe = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1)
    norm = jnp.sqrt(jnp.sum(jnp.square(a / safe), axis=axes))
    return jnp.squeeze(scale, axes) * norm


def clip_weights(norms: jax.Array, clips: jax.Array) -> jax.Array:
    """``c_i = min(1, 1 / ||norms_i / clips||)`` for ``norms (c, s)``, ``clips (s,)``.

    Scaling user i's statistics by ``c_i`` bounds the normalized contribution
    ``(c_i A_i / C_A, c_i H_i / C_H)`` by 1 in L2 norm (Lemma 1). A user whose
    joint norm is not finite (a statistic overflowed, or is NaN) or so large
    that ``c_i`` would be subnormal gets ``c_i = 0`` exactly; weighted sums
    must zero such users' statistics with :func:`weighted` (``0 * inf`` is NaN).
    """
    joint = safe_norm(norms / clips, -1)
    tiny = jnp.finfo(norms.dtype).tiny
    usable = jnp.isfinite(joint) & (joint < 1 / tiny)
    big = usable & (joint > 1)
    return jnp.where(big, 1 / jnp.where(big, joint, 1), jnp.where(usable, 1, 0)).astype(
        norms.dtype
    )


def weighted(stat: jax.Array, weights: jax.Array) -> jax.Array:
    """``weights_i * stat_i`` for ``stat (c, ...)``; exactly 0 where ``weights_i = 0``.

    The product is taken only after the zero-weight rows are replaced by 0.
    """
    shape = (-1,) + (1,) * (stat.ndim - 1)
    w = weights.reshape(shape)
    return jnp.where(w > 0, stat, 0) * w


# ----------------------------------------------------------- the releases


def noisy_sum(total: jax.Array, normal: jax.Array, clip, z) -> jax.Array:
    """``total + clip * 2 z normal``: the Gaussian mechanism of Lemma 1.

    ``total`` is a sum of user contributions each of Frobenius norm at most
    ``clip`` (jointly with the other statistic of the same release);
    ``normal`` are the release's N(0, 1) draws (float64-drawn, see
    :func:`draw_noise`), symmetric for a symmetric statistic.
    """
    scale = (2 * jnp.asarray(z) * jnp.asarray(clip)).astype(total.dtype)
    return total + scale * normal.astype(total.dtype)
