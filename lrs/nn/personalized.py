"""Low-rank plus sparse personalized layers.

The chosen weight matrices ``W_l (p_l, q_l)`` are flattened and concatenated
into one vector of length ``P = sum_l p_l q_l``. User ``i``'s weights are

    W_l + reshape_l(U v_i + b_i),

with ``U (P, r)`` shared, ``v_i (r,)`` and ``b_i`` ``k``-sparse (``k`` values at
``k`` positions of the ``P``). This is the core model ``theta_i = U v_i + b_i``
of :mod:`lrs`, with ``theta_i`` the user's weight deltas. A user costs ``r + k``
numbers and ``k`` int32 indices.

Only the users of a batch are gathered: :func:`user_deltas` builds ``(G, p, q)``
deltas for ``G`` gathered users; nothing of size ``(num_users, P)`` exists.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrs.linalg import hard_threshold
from lrs.nn.model import TransformerConfig, apply, weight_shape
from lrs.params import scatter_rows
from lrs.validation import check_integer

__all__ = [
    "LRSLayerConfig",
    "LRSUsers",
    "check_user_ids",
    "flat_size",
    "gather_users",
    "personalized_apply",
    "project_sparse",
    "split_flat",
    "user_deltas",
]


@dataclasses.dataclass(frozen=True)
class LRSLayerConfig:
    """Which weights are personalized, and the rank and sparsity of the deltas.

    Attributes:
      layers: names of the personalized weights (see ``model.weight_names``).
      rank: r, columns of the shared ``U``.
      sparsity: k, nonzeros of each user's ``b_i``.
    """

    layers: tuple[str, ...] = ("block1/mlp_out", "head")
    rank: int = 4
    sparsity: int = 8

    def __post_init__(self):
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ValueError(f"layers must be a non-empty tuple; got {self.layers!r}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct; got {self.layers!r}")
        for name in ("rank", "sparsity"):
            check_integer(name, getattr(self, name), 0)

    def check(self, model: TransformerConfig) -> int:
        """Validates the layers against ``model``; returns ``P`` (ValueError)."""
        size = flat_size(model, self.layers)
        if self.sparsity > size:
            raise ValueError(
                f"sparsity must be <= P = {size} personalized weights; "
                f"got {self.sparsity}"
            )
        return size


class LRSUsers(NamedTuple):
    """Per-user parameters of the LRS layers, for ``n`` users (a pytree)."""

    v: jax.Array  # (n, r) coordinates in U
    b_indices: jax.Array  # (n, k) int32 positions in [0, P)
    b_values: jax.Array  # (n, k)


def flat_size(model: TransformerConfig, layers: tuple[str, ...]) -> int:
    """``P``, the number of weights in ``layers``."""
    return sum(int(np.prod(weight_shape(model, name))) for name in layers)


def split_flat(
    flat: jax.Array, model: TransformerConfig, layers: tuple[str, ...]
) -> dict[str, jax.Array]:
    """``flat (..., P)`` -> ``{name: (..., p, q)}`` in the order of ``layers``."""
    out, start = {}, 0
    for name in layers:
        p, q = weight_shape(model, name)
        out[name] = flat[..., start : start + p * q].reshape(flat.shape[:-1] + (p, q))
        start += p * q
    return out


def user_deltas(
    U: jax.Array,
    users: LRSUsers,
    model: TransformerConfig,
    layers: tuple[str, ...],
) -> dict[str, jax.Array]:
    """``{name: (G, p, q)}`` deltas ``reshape(U v_i + b_i)`` of ``G`` gathered users."""
    flat = users.v @ U.T + scatter_rows(users.b_indices, users.b_values, U.shape[0])
    return split_flat(flat, model, layers)


def project_sparse(b: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Hard thresholding: the ``k`` largest-magnitude entries of ``b (..., P)``.

    Returns ``(indices (..., k) int32, values (..., k))``; scattered back, the rows
    have at most ``k`` nonzeros (exactly ``k`` when ``b`` has ``>= k``).
    """
    return hard_threshold(b, k)


def check_user_ids(user_ids, num_users: int, *, unseen: str = "error") -> np.ndarray:
    """Host-side check of concrete ``user_ids (B,)``; returns them as int32 numpy.

    ``unseen="error"`` raises ValueError for an id outside ``[0, num_users)``;
    ``unseen="global"`` lets them through (they get the shared weights).
    """
    if unseen not in ("error", "global"):
        raise ValueError(f"unseen must be 'error' or 'global'; got {unseen!r}")
    ids = np.asarray(user_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"user_ids must be a 1-d integer array; got shape {ids.shape}, "
            f"dtype {ids.dtype}"
        )
    bad = (ids < 0) | (ids >= num_users)
    if unseen == "error" and bad.any():
        raise ValueError(
            f"user_ids must be in [0, {num_users}) (the trained users); got "
            f"{ids[bad][:5].tolist()} (pass unseen='global' to use the shared "
            "weights for users without parameters)"
        )
    return ids.astype(np.int32)


def gather_users(users, user_ids: jax.Array, num_users: int):
    """Rows ``user_ids`` of every leaf; unseen ids get all-zero rows.

    Returns ``(gathered pytree with leading axis B, known (B,) bool)``. With
    zero rows an LRS user (or any additive adapter) has the shared weights.
    """
    known = (user_ids >= 0) & (user_ids < num_users)
    safe = jnp.where(known, user_ids, 0)

    def take(leaf):
        rows = jnp.take(leaf, safe, axis=0)
        mask = known.reshape((-1,) + (1,) * (rows.ndim - 1))
        return jnp.where(mask, rows, jnp.zeros_like(rows))

    return jax.tree.map(take, users), known


def personalized_apply(
    base: dict,
    U: jax.Array,
    users: LRSUsers,
    user_ids,
    tokens: jax.Array,
    model: TransformerConfig,
    config: LRSLayerConfig,
    *,
    unseen: str = "error",
) -> jax.Array:
    """Logits ``(B, C)`` of ``tokens (B, T)``, each sequence with its user's weights.

    Repeated ids are fine (each row uses its own user's weights). An id outside
    ``[0, n)`` raises ValueError, or with ``unseen="global"`` gets the shared
    weights ``W`` (no delta). Memory grows with ``B``, not with ``n``.
    """
    n = users.v.shape[0]
    ids = jnp.asarray(check_user_ids(user_ids, n, unseen=unseen))
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] != ids.shape[0]:
        raise ValueError(
            f"tokens must have shape (B, T) with B = len(user_ids) = {ids.shape[0]}; "
            f"got {tokens.shape}"
        )
    _check_tokens(tokens, model)
    return _personalized_apply(base, U, users, ids, tokens, model, config)


def _check_tokens(tokens, model: TransformerConfig) -> None:
    """Integer token ids in ``[0, vocab)`` and at most ``seq_len`` per sequence."""
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids; got dtype {tokens.dtype}")
    if tokens.shape[-1] > model.seq_len:
        raise ValueError(
            f"tokens must have at most seq_len = {model.seq_len} positions; "
            f"got {tokens.shape[-1]}"
        )
    if tokens.size and not (0 <= int(tokens.min()) and int(tokens.max()) < model.vocab):
        raise ValueError(f"tokens must be ids in [0, {model.vocab})")


@functools.partial(jax.jit, static_argnames=("model", "config"))
def _personalized_apply(base, U, users, ids, tokens, model, config):
    gathered, _ = gather_users(users, ids, users.v.shape[0])
    deltas = user_deltas(U, gathered, model, config.layers)
    one = lambda d, x: apply(base, x[None], model, deltas=d)[0]  # noqa: E731
    return jax.vmap(one)(deltas, tokens)
