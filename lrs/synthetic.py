"""Planted low-rank plus sparse problems: ``y_ij = <x_ij, U* v_i* + b_i*> + noise``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lrs.chunking import map_user_chunks
from lrs.data import UserData, float_dtype
from lrs.linalg import orthonormalize
from lrs.params import LRSParams, SparseRows


def random_supports(key, t: int, d: int, k: int) -> jax.Array:
    """``(t, k)`` int32: k distinct random positions out of d for each user."""
    if k == 0:
        return jnp.zeros((t, 0), jnp.int32)
    _, idx = jax.lax.top_k(jax.random.uniform(key, (t, d)), k)
    return idx.astype(jnp.int32)


def make_problem(
    key,
    *,
    d: int,
    t: int,
    m: int,
    r: int,
    k: int,
    noise: float = 0.0,
    v_scale: float = 1.0,
    b_scale: float = 1.0,
    m_min: int | None = None,
    dtype=None,
) -> tuple[UserData, LRSParams]:
    """A random planted problem.

    ``U*`` is a uniformly random ``(d, r)`` orthonormal matrix, ``v_i* ~ N(0,
    v_scale^2 I_r)``, ``b_i*`` has ``k`` nonzeros at uniformly random positions
    with ``N(0, b_scale^2)`` values, ``x_ij ~ N(0, I_d)`` and the noise is
    ``N(0, noise^2)``.

    Args:
      key: a ``jax.random`` key.
      d: features.
      t: users.
      m: samples per user.
      r: rank.
      k: sparsity (nonzeros of each ``b_i*``).
      noise: standard deviation of the label noise.
      m_min: if given, user ``i`` has ``m_i`` samples drawn uniformly from
        ``[m_min, m]`` (ragged, padded to ``m``); otherwise all have ``m``.
      dtype: float dtype (default float32, or float64 under x64).

    Returns:
      ``(data, truth)``: a :class:`UserData` and the planted :class:`LRSParams`.
    """
    for name, value in dict(d=d, t=t, m=m).items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    if not 1 <= r < d:
        raise ValueError(f"r must satisfy 1 <= r < d = {d}; got {r}")
    if not 0 <= k < d:
        raise ValueError(f"k must satisfy 0 <= k < d = {d}; got {k}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0; got {noise}")
    if m_min is not None and not 1 <= m_min <= m:
        raise ValueError(f"m_min must satisfy 1 <= m_min <= m = {m}; got {m_min}")
    dtype = float_dtype(dtype)
    ku, kv, ks, kb, kx, kn, km = jax.random.split(key, 7)
    U, _ = orthonormalize(jax.random.normal(ku, (d, r), dtype))
    V = v_scale * jax.random.normal(kv, (t, r), dtype)
    B = SparseRows(
        random_supports(ks, t, d, k), b_scale * jax.random.normal(kb, (t, k), dtype), d
    )
    truth = LRSParams(U, V, B)
    X, y, mask = _sample(kx, kn, km, truth, m=m, noise=noise, m_min=m_min)
    return UserData(X, y, mask), truth


@functools.partial(jax.jit, static_argnames=("m", "m_min"))
def _sample(kx, kn, km, truth: LRSParams, m, noise, m_min):
    t, d = truth.V.shape[0], truth.U.shape[0]
    dtype = truth.U.dtype
    if m_min is None:
        mask = jnp.ones((t, m), bool)
    else:
        counts = jax.random.randint(km, (t,), m_min, m + 1)
        mask = jnp.arange(m)[None, :] < counts[:, None]

    def user_features(args, fresh):  # one key per user: independent of chunking
        keys, rows = args
        draw = jax.vmap(lambda k: jax.random.normal(k, (m, d), dtype))(keys)
        return jnp.where(rows[..., None], draw, 0), None

    # Chunks of users keep the peak memory near the size of X itself.
    chunk = max(1, (64 * 2**20) // (m * d * dtype.itemsize))
    X, _ = map_user_chunks(user_features, (jax.random.split(kx, t), mask), chunk)
    theta = truth.V @ truth.U.T + truth.B.dense()
    y = jnp.einsum("tmd,td->tm", X, theta)
    y = y + noise * jax.random.normal(kn, (t, m), dtype)
    return X, jnp.where(mask, y, 0), mask
