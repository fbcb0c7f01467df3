"""Which user owns each row, and the typed per-user state of the NNX adapters.

Which user each row of the batch belongs to reaches an adapter either as its
``user_ids`` argument or, for a model that does not know about users, from
the innermost :func:`users` context around the model call (a
``contextvars.ContextVar``, so it works under ``jax.jit`` and ``nnx.jit`` as
long as the ``with`` block is inside the traced function)::

    with lrs.nn.users(user_ids):
        logits = model(tokens)

Variable types tell the state apart (``nnx.state(model, UserTable)``):
:class:`SharedParam` (a subclass of ``nnx.Param``) for the adapters' shared
factors, :class:`UserTable` for per-user rows (leading axis: user), and
:class:`UserSupport` (a subclass of ``UserTable``) for the integer support of
a sparse part, which is selected, not differentiated. The training step
(:mod:`lrs.nn.nnx_train`) and the store (:mod:`lrs.nn.store`) find every
per-user row by these types, whatever the adapter.

:class:`UserAdapter` is the base of every adapter (its tables, its number of
users, rows for new users); :class:`LinearAdapter` the base of those that
wrap an ``nnx.Linear`` (:mod:`lrs.nn.lrs_linear`, :mod:`lrs.nn.baseline_layers`),
:class:`~lrs.nn.prompt_layers.EmbedAdapter` of those that wrap an
``nnx.Embed`` (:mod:`lrs.nn.prompt_layers`).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "LinearAdapter",
    "SharedParam",
    "SparseProbe",
    "UserAdapter",
    "UserSupport",
    "UserTable",
    "apply",
    "base_shape",
    "gather_rows",
    "resolve_ids",
    "users",
]


class SharedParam(nnx.Param):
    """A factor shared by all users (trained in the shared phase only)."""


class UserTable(nnx.Variable):
    """Per-user rows: the leading axis is the user id."""


class UserSupport(UserTable):
    """Per-user integer support (flat kernel indices) of a sparse part."""


class SparseProbe(nnx.Variable):
    """Training only: a dense ``(users, in, out)`` stand-in for the sparse part."""


_USERS: contextvars.ContextVar = contextvars.ContextVar("lrs_nn_users", default=None)


@contextlib.contextmanager
def users(user_ids):
    """Within the block, personalized layers read ``user_ids`` ``(batch,)``."""
    token = _USERS.set(user_ids)
    try:
        yield
    finally:
        _USERS.reset(token)


def apply(model, inputs, user_ids, *args, **kwargs):
    """``model(inputs, *args, **kwargs)``, row ``b`` owned by user ``user_ids[b]``."""
    with users(user_ids):
        return model(inputs, *args, **kwargs)


def resolve_ids(user_ids, x, num_users: int) -> jax.Array:
    """The batch's user ids, checked on static facts (and values when concrete).

    ``user_ids`` (or, when None, the innermost :func:`users` context) must be
    a 1-D integer array with one id per row of ``x`` (``x.shape[0]``). Their
    range is checked when they are concrete, also when a jitted function
    closes over them; traced ids are not checked.
    """
    if user_ids is None:
        user_ids = _USERS.get()
    if user_ids is None:
        raise ValueError(
            "user_ids is missing: pass user_ids= or call the model inside "
            "`with lrs.nn.users(user_ids):`"
        )
    ids = jnp.asarray(user_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"user_ids must be a 1-D integer array; got shape {ids.shape}, "
            f"dtype {ids.dtype}"
        )
    if x.ndim < 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"user_ids must have one id per row of x: x has shape {x.shape}, "
            f"user_ids has shape {ids.shape}"
        )
    if not isinstance(ids, jax.core.Tracer) and ids.size:
        # read on the host: under a trace (ids created outside a jitted
        # function and closed over), ``ids.min()`` would itself be a tracer
        host = np.asarray(ids)
        low, high = int(host.min()), int(host.max())
        if low < 0 or high >= num_users:
            raise ValueError(
                f"user_ids must lie in [0, {num_users}); got values in [{low}, {high}]"
            )
    return ids


def gather_rows(table, ids):
    """``table[ids]``; rows of out-of-range ids are NaN (floats) or clipped (ints)."""
    if jnp.issubdtype(table.dtype, jnp.integer):
        return jnp.take(table, ids, axis=0, mode="clip")
    return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)


def base_shape(base) -> tuple[int, int]:
    """``(in, out)`` of ``base``, which must be an ``nnx.Linear``."""
    if not isinstance(base, nnx.Linear):
        raise ValueError(f"base must be an nnx.Linear; got {type(base).__name__}")
    return tuple(base.kernel.shape)


class UserAdapter(nnx.Module):
    """Base of the per-user adapters: a wrapped base module plus user tables.

    A subclass keeps the wrapped module as ``base``, sets ``method`` (its name
    for :func:`~lrs.nn.nnx_personalize.personalize`) and ``tables`` (the
    attribute names of its :class:`UserTable` s, the store's per-user rows),
    and defines ``__call__(x, user_ids=None)``, ``new_rows(count, rngs)``
    (rows of new users, for ``add_users``) and ``settings()`` (what the
    checkpoint records).
    """

    method = ""
    tables: tuple[str, ...] = ()

    @property
    def num_users(self) -> int:
        """Rows of the per-user tables."""
        return getattr(self, self.tables[0]).shape[0]

    def user_tables(self) -> dict:
        """``{name: UserTable}`` of the per-user rows."""
        return {name: getattr(self, name) for name in self.tables}

    def settings(self) -> dict:
        """The sizes a checkpoint records (and ``load`` compares)."""
        return {}

    def new_rows(self, count: int, rngs=None) -> dict:
        """``{name: rows}`` of ``count`` new users for every table."""
        raise NotImplementedError

    def check_user(self, user_id) -> int:
        """``user_id`` as an int, or ValueError when outside ``[0, num_users)``."""
        if isinstance(user_id, bool) or not isinstance(user_id, int | np.integer):
            raise ValueError(f"user_id must be an integer; got {user_id!r}")
        u = int(user_id)
        if not 0 <= u < self.num_users:
            raise ValueError(f"user_id must lie in [0, {self.num_users}); got {u}")
        return u


class LinearAdapter(UserAdapter):
    """Base of the adapters around an ``nnx.Linear`` (``self.base``).

    A subclass also defines ``user_kernel(user_id)``, the dense ``(in, out)``
    kernel of one user, so that ``layer(x, ids)[b] == x[b] @
    user_kernel(ids[b]) + user_bias(ids[b])``.
    """

    def user_kernel(self, user_id) -> jax.Array:
        """The dense ``(in, out)`` kernel of one user."""
        raise NotImplementedError

    def user_bias(self, user_id) -> jax.Array:
        """The ``(out,)`` bias of one user (the base's bias, or zeros)."""
        self.check_user(user_id)
        if self.base.bias is None:
            return jnp.zeros(self.base.kernel.shape[1], self.base.kernel.dtype)
        return self.base.bias[...]
