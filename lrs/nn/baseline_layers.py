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
  :class:`PLoRALinear` keeps its own ``(num_users, e)`` table. In training
  (a dropout key, see :func:`plora_mode`) it applies PLoRA's dropouts: the
  ``lora_dropout`` on ``x`` and ``e_u`` and the personalized dropout
  (PDropout) that removes a row's whole user term; ``zero_shot`` runs it
  without any user (the shared LoRA only).

Soft prompts and user tokens prepend positions to the model's input
sequence, which wrapping a Linear cannot express: they wrap the model's token
``nnx.Embed`` instead (:mod:`lrs.nn.prompt_layers`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrs.nn.user_state import (
    LinearAdapter,
    SharedParam,
    UserTable,
    base_shape,
    gather_rows,
    resolve_ids,
)
from lrs.validation import check_integer, check_real

__all__ = ["PLoRALinear", "UserHeadLinear", "UserLoRALinear", "plora_mode"]


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


@dataclasses.dataclass(frozen=True)
class _Mode:
    rngs: nnx.Rngs | None = None
    user_dropout_scale: object = 1.0
    zero_shot: bool = False
    record: list | None = None


_MODE: contextvars.ContextVar = contextvars.ContextVar(
    "lrs_plora_mode", default=_Mode()
)


@contextlib.contextmanager
def plora_mode(*, rngs=None, user_dropout_scale=1.0, zero_shot=False, record=None):
    """Within the block, every :class:`PLoRALinear` call runs in this mode.

    For a model that does not pass arguments down to its layers (as
    :func:`lrs.nn.users` does for the user ids); a call's own ``rngs`` /
    ``zero_shot`` arguments take precedence.

    Args:
      rngs: ``nnx.Rngs`` (or a PRNG key) whose ``dropout`` stream draws the
        masks: the layers are in training mode (dropouts on) unless their
        ``deterministic`` attribute is set (``model.eval()``). None: no dropout.
      user_dropout_scale: multiplies every layer's ``user_dropout`` rate (a
        number or a traced scalar; 0 turns PDropout off, as PLoRA's few-shot
        phase does).
      zero_shot: run without the user (no ``e_u`` term, no user ids needed).
      record: a list; each call appends ``(with_user, without_user)``, the
        layer's adapter output ``scale (x A + e_u P) B`` and the same without
        the user, ``scale x' A B`` (``x'`` under a fresh dropout mask, as in
        PLoRA's code), for PLoRA's layer-wise mutual-information term.
    """
    if rngs is not None and not isinstance(rngs, nnx.Rngs):
        rngs = nnx.Rngs(dropout=rngs)
    token = _MODE.set(_Mode(rngs, user_dropout_scale, bool(zero_shot), record))
    try:
        yield
    finally:
        _MODE.reset(token)


class PLoRALinear(LinearAdapter):
    """``x @ W + bias + scale * (x A + e_u P) B``: user-conditioned LoRA (PLoRA).

    As PLoRA's ``Linear.forward``: ``A (in, r)`` and ``P (e, r)`` start
    uniform in ``+-1/sqrt(fan_in)``, ``B (r, out)`` and the user embeddings
    ``E (num_users, e)`` at zero, so the model starts at its base. ``A``,
    ``B``, ``P`` are :class:`~lrs.nn.user_state.SharedParam` (trained in the
    shared phase; the base stays frozen under ``StepConfig(train="adapters")``),
    ``E`` a :class:`~lrs.nn.user_state.UserTable`. The product never forms a
    ``(batch, in, out)`` array: ``x A`` is one matmul for the batch.

    In training (a dropout key from the call's ``rngs`` or :func:`plora_mode`,
    and ``deterministic`` False) the forward is, per row ``b`` of user ``u``,

    ``x W + bias + s (drop(x) A + m_b drop(e_u) P) B``, with ``m_b ~
    Bernoulli(1 - user_dropout)``,

    as in the authors' code: ``drop`` is inverted dropout at rate ``dropout``
    (their ``lora_dropout``, applied to both the input and the embedding) and
    ``m_b`` the personalized dropout (PDropout, their ``p_mask``: the row's
    user term removed whole, not rescaled), so the shared ``A B`` learns to
    serve users without an embedding. Without a key, or with
    ``deterministic`` True, the forward is deterministic (``m_b = 1``, no
    dropout). ``zero_shot=True`` drops the user for every row: ``x W + bias
    + s x A B``, PLoRA's zero-shot model; it needs no user ids.

    Args:
      base: the wrapped ``nnx.Linear``.
      rank: r >= 1, the LoRA rank.
      embed_dim: e >= 1, floats per user.
      num_users: rows of ``E``.
      rngs: draws ``A`` and ``P`` (not the dropout masks).
      scale: PLoRA's ``lora_alpha / r`` (default 1).
      dropout: the input and embedding dropout rate in ``[0, 1)`` (default
        0.1, the authors' ``lora_dropout``).
      user_dropout: the PDropout rate in ``[0, 1]`` (default 0, the authors'
        ``p_rate`` default; 1 always drops the user).

    References:
      Zhang, Wang, Yu, Xu, Zhang, "Personalized LoRA for Human-Centered Text
      Understanding", AAAI 2024 (arXiv 2403.06208); github.com/yoyo-yun/PLoRA,
      ``models/ppeft/plora.py`` (``Linear.forward``), ``trainer/trainer.py``
      (``get_personality_mask``), ``models/ppeft/peft_model.py`` (``p_mask``).
    """

    method = "user_lora"
    tables = ("E",)

    def __init__(
        self,
        base,
        *,
        rank,
        embed_dim,
        num_users,
        rngs,
        scale=1.0,
        dropout=0.1,
        user_dropout=0.0,
    ):
        d_in, d_out = base_shape(base)
        check_integer("rank", rank, 1)
        check_integer("embed_dim", embed_dim, 1)
        check_integer("num_users", num_users, 1)
        rate = "a number in [0, 1)"
        self.dropout = check_real(
            "dropout", dropout, rate, low=0, high=1, open_high=True
        )
        self.user_dropout = check_real(
            "user_dropout", user_dropout, "a number in [0, 1]", low=0, high=1
        )
        self.deterministic = False
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

    def _drop(self, v, key):
        """Inverted dropout at ``self.dropout`` (identity when ``key`` is None)."""
        if key is None or self.dropout == 0.0:
            return v
        keep = jax.random.bernoulli(key, 1.0 - self.dropout, v.shape)
        return jnp.where(keep, v / (1.0 - self.dropout), jnp.zeros_like(v))

    def __call__(self, x, user_ids=None, *, rngs=None, zero_shot=False):
        """The layer's output; ``rngs`` (training) and ``zero_shot`` as above."""
        mode = _MODE.get()
        zero_shot = zero_shot or mode.zero_shot
        if rngs is None:
            rngs = mode.rngs
        elif not isinstance(rngs, nnx.Rngs):
            rngs = nnx.Rngs(dropout=rngs)
        if self.deterministic:
            rngs = None
        k_x = None if rngs is None else rngs.dropout()
        h = self._drop(x, k_x) @ self.A[...]
        if not zero_shot:
            ids = resolve_ids(user_ids, x, self.num_users)
            e = gather_rows(self.E[...], ids)
            e = self._drop(e, None if rngs is None else rngs.dropout())
            if rngs is not None and self.user_dropout > 0.0:
                rate = self.user_dropout * mode.user_dropout_scale
                keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, ids.shape)
                e = e * keep[:, None].astype(e.dtype)
            user = e @ self.P[...]  # (batch, r)
            h = h + user.reshape(user.shape[:1] + (1,) * (x.ndim - 2) + (-1,))
        delta = self.scale * (h @ self.B[...])
        if mode.record is not None and not zero_shot:
            k_alone = None if k_x is None else jax.random.fold_in(k_x, 1)
            alone = self.scale * ((self._drop(x, k_alone) @ self.A[...]) @ self.B[...])
            mode.record.append((delta, alone))
        return self.base(x) + delta
