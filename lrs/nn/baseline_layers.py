"""The adapters LRS is compared with, as NNX layers around an ``nnx.Linear``.

* :class:`UserLoRALinear` (``personalize(..., method="lora")``): one LoRA
  pair per user, ``x @ (W + A_u B_u) + bias``; ``r (in + out)`` floats per
  user, two batched skinny matmuls with the gathered ``A_u``, ``B_u``.
* :class:`UserHeadLinear` (``personalize(..., method="head")``): a dense
  per-user copy of the layer's kernel delta, ``x @ (W + D_u) + bias``. The
  storage worst case: ``in * out`` floats per user, and its forward gathers
  the batch's ``(batch, in, out)`` deltas (the only adapter here that forms a
  per-row kernel: a dense per-user matrix has no cheaper product).
* :class:`PLoRALinear` (``method="user_lora"``): user-conditioned LoRA as in
  PLoRA (Zhang et al., AAAI 2024, the authors' ``models/ppeft/plora.py``):
  shared ``A (in, r)``, ``B (r, out)``, ``P (e, r)`` and a per-user embedding
  ``e_u (e,)``; ``x @ W + bias + scale * (x A + e_u P) B``. ``e`` floats per
  user. The user enters only through the output shift ``scale * e_u P B``,
  the same for every input of that user: the kernel ``W + scale * A B`` is
  shared, the bias is per user (:meth:`PLoRALinear.user_bias`). PLoRA keeps
  one user embedding for the whole model; wrapping layers one by one, each
  :class:`PLoRALinear` keeps its own ``(num_users, e)`` table.

Soft prompts and user tokens prepend positions to the model's input
sequence, which wrapping a Linear cannot express: they wrap the model's token
``nnx.Embed`` instead (:mod:`lrs.nn.prompt_layers`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lrs.nn.user_state import (
    LinearAdapter,
    SharedParam,
    UserTable,
    base_shape,
    gather_rows,
    resolve_ids,
)
from lrs.validation import check_integer

__all__ = ["PLoRALinear", "UserHeadLinear", "UserLoRALinear"]


class UserLoRALinear(LinearAdapter):
    """``x @ (W + A_u B_u) + bias``: one LoRA pair per user around ``nnx.Linear``.

    ``A (num_users, in, r)`` starts i.i.d. normal with standard deviation
    ``1 / sqrt(in)``, ``B (num_users, r, out)`` at zero (so the model starts at
    its base). The forward gathers the batch's ``A_u``, ``B_u`` and applies
    them as two batched matmuls; no ``(batch, in, out)`` array is formed.
    """

    method = "lora"
    tables = ("A", "B")

    def __init__(self, base, *, rank, num_users, rngs):
        d_in, d_out = base_shape(base)
        check_integer("rank", rank, 1)
        check_integer("num_users", num_users, 1)
        self.base = base
        self.in_features, self.out_features, self.rank = d_in, d_out, rank
        self.A = UserTable(self._init_a(num_users, rngs))
        self.B = UserTable(jnp.zeros((num_users, rank, d_out), base.kernel.dtype))

    def _init_a(self, count, rngs):
        shape = (count, self.in_features, self.rank)
        dtype = self.base.kernel.dtype
        return jax.random.normal(rngs.params(), shape, dtype) / float(np.sqrt(shape[1]))

    def settings(self) -> dict:
        """``{"rank": r}``."""
        return dict(rank=self.rank)

    def new_rows(self, count: int, rngs) -> dict:
        """Rows for ``count`` new users: ``A`` drawn from ``rngs``, ``B`` zero."""
        B = jnp.zeros((count,) + self.B.shape[1:], self.B.dtype)
        return dict(A=self._init_a(count, rngs), B=B)

    def user_kernel(self, user_id) -> jax.Array:
        """The dense ``(in, out)`` kernel ``W + A_u B_u`` of one user."""
        u = self.check_user(user_id)
        return self.base.kernel[...] + self.A[u] @ self.B[u]

    def __call__(self, x, user_ids=None):
        ids = resolve_ids(user_ids, x, self.num_users)
        h = jnp.einsum("b...i,bia->b...a", x, gather_rows(self.A[...], ids))
        return self.base(x) + jnp.einsum(
            "b...a,bao->b...o", h, gather_rows(self.B[...], ids)
        )


class UserHeadLinear(LinearAdapter):
    """``x @ (W + D_u) + bias``: a dense per-user kernel delta (per-user head).

    ``D (num_users, in, out)`` starts at zero. Costs ``in * out`` floats per
    user and no shared parameter; the forward gathers the batch's deltas,
    a ``(batch, in, out)`` array.

    Args:
      base: the wrapped ``nnx.Linear``.
      num_users: rows of ``D``.
      rngs: unused (the deltas start at zero); accepted for a common signature.
    """

    method = "head"
    tables = ("D",)

    def __init__(self, base, *, num_users, rngs=None):
        d_in, d_out = base_shape(base)
        check_integer("num_users", num_users, 1)
        self.base = base
        self.in_features, self.out_features = d_in, d_out
        self.D = UserTable(jnp.zeros((num_users, d_in, d_out), base.kernel.dtype))

    def new_rows(self, count: int, rngs=None) -> dict:
        """Zero deltas for ``count`` new users."""
        return dict(D=jnp.zeros((count,) + self.D.shape[1:], self.D.dtype))

    def user_kernel(self, user_id) -> jax.Array:
        """The dense ``(in, out)`` kernel ``W + D_u`` of one user."""
        return self.base.kernel[...] + self.D[self.check_user(user_id)]

    def __call__(self, x, user_ids=None):
        ids = resolve_ids(user_ids, x, self.num_users)
        delta = gather_rows(self.D[...], ids)  # (batch, in, out)
        return self.base(x) + jnp.einsum("b...i,bio->b...o", x, delta)


def _uniform(key, shape, fan_in, dtype):
    """PyTorch's default Linear init (Kaiming uniform, a = sqrt(5))."""
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class PLoRALinear(LinearAdapter):
    """``x @ W + bias + scale * (x A + e_u P) B``: user-conditioned LoRA (PLoRA).

    As PLoRA's ``Linear.forward``: ``A (in, r)`` and ``P (e, r)`` start
    uniform in ``+-1/sqrt(fan_in)``, ``B (r, out)`` and the user embeddings
    ``E (num_users, e)`` at zero, so the model starts at its base. ``A``,
    ``B``, ``P`` are :class:`~lrs.nn.user_state.SharedParam` (trained in the
    shared phase; the base stays frozen under ``StepConfig(train="adapters")``),
    ``E`` a :class:`~lrs.nn.user_state.UserTable`. The product never forms a
    ``(batch, in, out)`` array: ``x A`` is one matmul for the batch.

    Args:
      base: the wrapped ``nnx.Linear``.
      rank: r >= 1, the LoRA rank.
      embed_dim: e >= 1, floats per user.
      num_users: rows of ``E``.
      rngs: draws ``A`` and ``P``.
      scale: PLoRA's ``lora_alpha / r`` (default 1).
    """

    method = "user_lora"
    tables = ("E",)

    def __init__(self, base, *, rank, embed_dim, num_users, rngs, scale=1.0):
        d_in, d_out = base_shape(base)
        check_integer("rank", rank, 1)
        check_integer("embed_dim", embed_dim, 1)
        check_integer("num_users", num_users, 1)
        dtype = base.kernel.dtype
        self.base = base
        self.in_features, self.out_features = d_in, d_out
        self.rank, self.embed_dim, self.scale = rank, embed_dim, float(scale)
        self.A = SharedParam(_uniform(rngs.params(), (d_in, rank), d_in, dtype))
        self.P = SharedParam(
            _uniform(rngs.params(), (embed_dim, rank), embed_dim, dtype)
        )
        self.B = SharedParam(jnp.zeros((rank, d_out), dtype))
        self.E = UserTable(jnp.zeros((num_users, embed_dim), dtype))

    def settings(self) -> dict:
        """``{"rank": r, "embed_dim": e, "scale": scale}``."""
        return dict(rank=self.rank, embed_dim=self.embed_dim, scale=self.scale)

    def new_rows(self, count: int, rngs=None) -> dict:
        """Zero embeddings for ``count`` new users (PLoRA's initialization)."""
        return dict(E=jnp.zeros((count, self.embed_dim), self.E.dtype))

    def user_kernel(self, user_id) -> jax.Array:
        """The ``(in, out)`` kernel ``W + scale * A B``: the same for every user."""
        self.check_user(user_id)
        return self.base.kernel[...] + self.scale * (self.A[...] @ self.B[...])

    def user_bias(self, user_id) -> jax.Array:
        """The ``(out,)`` bias of one user: ``bias + scale * e_u P B``."""
        shift = self.scale * (self.E[self.check_user(user_id)] @ self.P[...])
        return super().user_bias(user_id) + shift @ self.B[...]

    def __call__(self, x, user_ids=None):
        ids = resolve_ids(user_ids, x, self.num_users)
        user = gather_rows(self.E[...], ids) @ self.P[...]  # (batch, r)
        h = x @ self.A[...] + user.reshape(user.shape[:1] + (1,) * (x.ndim - 2) + (-1,))
        return self.base(x) + self.scale * (h @ self.B[...])
