"""Low-rank plus sparse parameters: theta_i = U v_i + b_i, with b_i stored compactly."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SparseRows(NamedTuple):
    """``t`` rows of a ``(t, d)`` matrix with ``k`` stored entries each; a pytree.

    Attributes:
      indices: ``(t, k)`` int32 column of each stored entry (distinct per row).
      values: ``(t, k)`` value of each stored entry.
      dim: number of columns ``d`` of the dense matrix (static).
    """

    indices: jax.Array
    values: jax.Array
    dim: int

    def dense(self) -> jax.Array:
        """The ``(t, d)`` dense matrix."""
        return scatter_rows(self.indices, self.values, self.dim)


jax.tree_util.register_pytree_node(
    SparseRows,
    lambda s: ((s.indices, s.values), s.dim),
    lambda dim, children: SparseRows(*children, dim),
)


def scatter_rows(indices: jax.Array, values: jax.Array, dim: int) -> jax.Array:
    """Dense ``(..., dim)`` rows from ``(..., k)`` indices and values."""
    zeros = jnp.zeros(indices.shape[:-1] + (dim,), values.dtype)
    if indices.shape[-1] == 0:
        return zeros
    batch = indices.shape[:-1]
    flat = zeros.reshape(-1, dim)
    rows = jnp.arange(flat.shape[0])[:, None]
    flat = flat.at[rows, indices.reshape(-1, indices.shape[-1])].add(
        values.reshape(-1, indices.shape[-1])
    )
    return flat.reshape(batch + (dim,))


class LRSParams(NamedTuple):
    """Per-user models ``theta_i = U v_i + b_i``; a pytree.

    Attributes:
      U: ``(d, r)`` shared factor with orthonormal columns.
      V: ``(t, r)`` per-user coordinates in ``U``.
      B: ``SparseRows`` with ``(t, k)`` indices and values: the sparse parts.
    """

    U: jax.Array
    V: jax.Array
    B: SparseRows


def weights(params: LRSParams) -> jax.Array:
    """The ``(t, d)`` per-user weights ``W = V U^T + B``."""
    return params.V @ params.U.T + params.B.dense()


def predict(params: LRSParams, X: jax.Array, user_ids: jax.Array) -> jax.Array:
    """Predictions ``<x_j, theta_{user_ids[j]}>`` for samples ``X (N, d)``.

    Only the users present are touched: cost O(N (d r + k)), no ``(t, d)`` matrix.
    """
    X = jnp.asarray(X)
    user_ids = jnp.asarray(user_ids)
    if X.ndim != 2 or X.shape[1] != params.U.shape[0]:
        raise ValueError(f"X must have shape (N, {params.U.shape[0]}); got {X.shape}")
    if user_ids.shape != X.shape[:1]:
        raise ValueError(
            f"user_ids must have shape ({X.shape[0]},) to match X; got {user_ids.shape}"
        )
    if not isinstance(user_ids, jax.core.Tracer) and user_ids.size:
        t = params.V.shape[0]
        if not jnp.issubdtype(user_ids.dtype, jnp.integer):
            raise ValueError(f"user_ids must be integers; got {user_ids.dtype}")
        low, high = int(user_ids.min()), int(user_ids.max())
        if low < 0 or high >= t:
            raise ValueError(
                f"user_ids must lie in [0, {t}) (the fitted users); got [{low}, {high}]"
            )
    low_rank = jnp.einsum("nd,dr,nr->n", X, params.U, params.V[user_ids])
    idx, val = params.B.indices[user_ids], params.B.values[user_ids]
    sparse = jnp.sum(jnp.take_along_axis(X, idx, axis=1) * val, axis=1)
    return low_rank + sparse
