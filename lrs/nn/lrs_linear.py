"""The low-rank plus sparse NNX layer: :class:`LRSLinear` around an ``nnx.Linear``.

``x @ (W + sum_j V[u, j] U_j + B_u) + bias`` for row ``b`` owned by user
``u``, without forming any ``(batch, in, out)`` array, by one of two routes
chosen from the shapes at trace time:

* rows of one token (decoding, ``x (batch, in)`` or ``(batch, 1, in)``):
  ``x @ [U_1 .. U_r]`` as one matmul shared by the batch, combined with each
  row's coefficients, plus a gather of ``k`` input columns and a
  scatter-add into ``k`` outputs per row for the sparse part;
* rows of ``t >= 2`` tokens: each row's kernel ``W + sum_j V[u, j] U_j +
  B_u`` is built and applied to its ``t`` tokens, a few rows at a time
  (``jax.lax.map`` over chunks of at most ``_CHUNK_ELEMENTS`` kernel
  entries, so memory does not grow with the batch). Building a kernel costs
  ``r * in * out`` multiply-adds per row, the shared matmul ``t * r * in *
  out``: with ``t = 16`` tokens and ``r = 4`` the per-row route does about a
  quarter of the shared route's work (measured in ``experiments/bench_nnx.py``).

Out-of-range user ids are refused when the ids are concrete; under ``jit``
they give NaN outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lrs.nn.user_state import (
    LinearAdapter,
    SharedParam,
    UserSupport,
    UserTable,
    base_shape,
    gather_rows,
    resolve_ids,
)
from lrs.validation import check_integer

__all__ = ["LRSLinear", "sparse_dense", "sparse_matmul"]

# Rows of at least this many tokens go through per-row kernels (see LRSLinear).
_PER_ROW_TOKENS = 2
# Per-row kernels are built at most this many elements at a time (128 KiB in
# float32): chunk = max(1, _CHUNK_ELEMENTS // (in * out)) rows.
_CHUNK_ELEMENTS = 2**15


def sparse_matmul(x, indices, values, out_features: int) -> jax.Array:
    """Row ``b`` of ``x (batch, ..., in)`` times its own sparse ``(in, out)`` matrix.

    ``indices (batch, k)`` are flat indices ``a * out + c`` into the kernel,
    ``values (batch, k)`` its entries (repeated indices add up). Costs a gather
    of ``k`` input columns and a scatter-add into ``k`` outputs per row.
    """
    rows, cols = indices // out_features, indices % out_features

    def one(xb, rb, cb, vb):
        contrib = jnp.take(xb, rb, axis=-1) * vb  # (..., k)
        zeros = jnp.zeros(xb.shape[:-1] + (out_features,), contrib.dtype)
        return zeros.at[..., cb].add(contrib)

    return jax.vmap(one)(x, rows, cols, values)


def sparse_dense(indices, values, in_features: int, out_features: int) -> jax.Array:
    """The dense ``(users, in, out)`` matrices of sparse rows (repeats add up)."""
    dense = jnp.zeros((indices.shape[0], in_features * out_features), values.dtype)
    dense = jax.vmap(lambda d, i, v: d.at[i].add(v))(dense, indices, values)
    return dense.reshape(indices.shape[0], in_features, out_features)


class LRSLinear(LinearAdapter):
    """``x @ (W + sum_j V[u, j] U_j + B_u) + bias`` around a base ``nnx.Linear``.

    Args:
      base: the wrapped ``nnx.Linear`` (kernel ``(in, out)``, optional bias);
        kept as ``self.base`` with its own ``nnx.Param`` s.
      rank: r >= 1, the number of shared directions ``U (r, in, out)``.
      sparsity: k >= 0 entries per user in the sparse part ``B_u``
        (``indices (num_users, k)`` flat into ``in * out``, ``values``).
      num_users: rows of the per-user tables (``add_users`` grows them).
      rngs: draws ``U``: i.i.d. normal with standard deviation
        ``init_scale / sqrt(in)`` (a fresh kernel's scale for the default 1).
      init_scale: see ``rngs``.

    ``V`` and the sparse values start at zero, so a freshly personalized model
    computes what its base computed. The initial support of every user is
    ``0 .. k-1`` (values zero); training re-selects it (:mod:`lrs.nn.nnx_train`).
    """

    method = "lrs"
    tables = ("V", "indices", "values")

    def __init__(self, base, *, rank, sparsity, num_users, rngs, init_scale=1.0):
        d_in, d_out = base_shape(base)
        check_integer("rank", rank, 1)
        check_integer("sparsity", sparsity, 0)
        check_integer("num_users", num_users, 1)
        if sparsity > d_in * d_out:
            raise ValueError(
                f"sparsity must be <= in * out = {d_in * d_out}; got {sparsity}"
            )
        dtype = base.kernel.dtype
        self.base = base
        self.in_features, self.out_features = d_in, d_out
        self.rank, self.sparsity = rank, sparsity
        self.materialize = False  # benchmark only: build per-row kernels
        scale = float(init_scale / np.sqrt(d_in))
        self.U = SharedParam(
            scale * jax.random.normal(rngs.params(), (rank, d_in, d_out), dtype)
        )
        self.V = UserTable(jnp.zeros((num_users, rank), dtype))
        self.indices = UserSupport(
            jnp.broadcast_to(
                jnp.arange(sparsity, dtype=jnp.int32), (num_users, sparsity)
            )
        )
        self.values = UserTable(jnp.zeros((num_users, sparsity), dtype))

    def settings(self) -> dict:
        """``{"rank": r, "sparsity": k}``."""
        return dict(rank=self.rank, sparsity=self.sparsity)

    def new_rows(self, count: int, rngs=None) -> dict:
        """Rows for ``count`` new users: zero ``V`` and values, support ``0..k-1``."""
        k = self.sparsity
        return dict(
            V=jnp.zeros((count, self.rank), self.V.dtype),
            indices=jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (count, k)),
            values=jnp.zeros((count, k), self.values.dtype),
        )

    def user_kernel(self, user_id) -> jax.Array:
        """The dense ``(in, out)`` kernel of one user (for checks and export)."""
        u = self.check_user(user_id)
        low_rank = jnp.einsum("r,rio->io", self.V[u], self.U[...])
        sparse = sparse_dense(
            self.indices[u][None], self.values[u][None], *self.U.shape[1:]
        )[0]
        return self.base.kernel[...] + low_rank + sparse

    def user_kernels(self, ids) -> jax.Array:
        """The ``(batch, in, out)`` kernels of ``ids`` (materialized; benchmark)."""
        low_rank = jnp.einsum("br,rio->bio", gather_rows(self.V[...], ids), self.U[...])
        sparse = sparse_dense(
            gather_rows(self.indices[...], ids),
            gather_rows(self.values[...], ids),
            *self.U.shape[1:],
        )
        return self.base.kernel[...] + low_rank + sparse

    def _low_rank_shared(self, x, ids):
        """``x @ W + sum_j v_j (x @ U_j)``: one matmul ``x @ [U_1 .. U_r]``."""
        z = jnp.einsum("...i,rio->...ro", x, self.U[...])
        v = gather_rows(self.V[...], ids)
        return self.base(x) + jnp.einsum("b...ro,br->b...o", z, v)

    def _per_row(self, x, ids):
        """Each row times its own kernel, ``chunk`` rows' kernels at a time."""
        r, d_in, d_out = self.U.shape
        v = gather_rows(self.V[...], ids)
        idx = gather_rows(self.indices[...], ids)
        val = gather_rows(self.values[...], ids)
        factors, kernel = self.U[...].reshape(r, -1), self.base.kernel[...].ravel()
        bias = self.base.bias[...] if self.base.bias is not None else None
        dtype = self.base.dtype or jnp.result_type(
            x, kernel, *(() if bias is None else (bias,))
        )

        @jax.checkpoint  # differentiated, rebuild the kernel rather than keep it
        def one(row):
            xb, vb, ib, wb = row
            k = (kernel + vb @ factors).at[ib].add(wb).reshape(d_in, d_out)
            return xb.astype(dtype) @ k.astype(dtype)

        chunk = max(1, min(x.shape[0], _CHUNK_ELEMENTS // (d_in * d_out)))
        y = jax.lax.map(one, (x, v, idx, val), batch_size=chunk)
        return y if bias is None else y + bias.astype(dtype)

    def __call__(self, x, user_ids=None):
        ids = resolve_ids(user_ids, x, self.num_users)
        if self.materialize:
            y = jnp.einsum("b...i,bio->b...o", x, self.user_kernels(ids))
            return y + self.base.bias[...] if self.base.bias is not None else y
        probe = getattr(self, "probe", None)
        if probe is not None:  # training with support re-selection
            y = self._low_rank_shared(x, ids)
            return y + jnp.einsum("b...i,bio->b...o", x, probe[...][ids])
        if int(np.prod(x.shape[1:-1])) >= _PER_ROW_TOKENS:
            return self._per_row(x, ids)
        y = self._low_rank_shared(x, ids)
        if self.sparsity:
            idx, val = (
                gather_rows(self.indices[...], ids),
                gather_rows(self.values[...], ids),
            )
            y = y + sparse_matmul(x, idx, val, self.out_features)
        return y
