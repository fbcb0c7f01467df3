"""A per-user class bias: the cheapest personalization of an output layer.

:class:`UserBiasLinear` wraps an ``nnx.Linear`` (typically a classifier's
head) and adds a learned per-user vector to its output, ``x @ W + bias +
c_u``: ``out`` floats per user (a shift of the class scores that ignores the
input), nothing shared. It is the baseline a per-user effect that is mostly a
per-user label prior should be measured against (issue 18): any adapter that
does not beat it learns nothing input-dependent about its users.

:func:`~lrs.nn.nnx_personalize.personalize` does not know this method; wrap a
layer with :func:`~lrs.nn.nnx_personalize.set_child`::

    set_child(model, ("head",), UserBiasLinear(model.head, num_users=n))

It is a :class:`~lrs.nn.user_state.LinearAdapter` with one
:class:`~lrs.nn.user_state.UserTable` (``c``), so the training step
(:mod:`lrs.nn.nnx_train`) and the store (:mod:`lrs.nn.store`) treat it as any
other adapter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lrs.nn.user_state import (
    LinearAdapter,
    UserTable,
    base_shape,
    gather_rows,
    resolve_ids,
)
from lrs.validation import check_integer

__all__ = ["UserBiasLinear"]


class UserBiasLinear(LinearAdapter):
    """``x @ W + bias + c_u``: a per-user output shift around an ``nnx.Linear``.

    ``c (num_users, out)`` starts at zero (the model starts at its base). The
    kernel is the base's for every user; the user enters through
    :meth:`user_bias` only.

    Args:
      base: the wrapped ``nnx.Linear`` (kept as ``self.base``).
      num_users: rows of ``c``.
      rngs: unused (the shifts start at zero); accepted for a common signature.
    """

    method = "class_bias"
    tables = ("c",)

    def __init__(self, base, *, num_users, rngs=None):
        d_in, d_out = base_shape(base)
        check_integer("num_users", num_users, 1)
        self.base = base
        self.in_features, self.out_features = d_in, d_out
        self.c = UserTable(jnp.zeros((num_users, d_out), base.kernel.dtype))

    def new_rows(self, count: int, rngs=None) -> dict:
        """Zero shifts for ``count`` new users."""
        return dict(c=jnp.zeros((count, self.out_features), self.c.dtype))

    def user_kernel(self, user_id) -> jax.Array:
        """The ``(in, out)`` kernel: the base's, the same for every user."""
        self.check_user(user_id)
        return self.base.kernel[...]

    def user_bias(self, user_id) -> jax.Array:
        """The ``(out,)`` bias of one user: ``bias + c_u``."""
        return super().user_bias(user_id) + self.c[self.check_user(user_id)]

    def __call__(self, x, user_ids=None):
        ids = resolve_ids(user_ids, x, self.num_users)
        shift = gather_rows(self.c[...], ids)  # (batch, out)
        shape = shift.shape[:1] + (1,) * (x.ndim - 2) + shift.shape[1:]
        return self.base(x) + shift.reshape(shape)
