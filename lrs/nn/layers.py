"""Per-user adapters for Flax NNX models: wrap any ``nnx.Linear`` by path.

:func:`personalize` replaces every ``nnx.Linear`` of a model whose path matches
a regular expression by an adapter around it, in place:

* ``method="lrs"``: :class:`LRSLinear`, the shared low-rank plus per-user
  sparse layer, ``W + sum_j V[u, j] U_j + B_u``;
* ``method="lora"``: :class:`UserLoRALinear`, one LoRA pair per user,
  ``W + A_u B_u``;
* ``method="head"`` and ``method="user_lora"``: a dense per-user kernel delta
  and PLoRA's user-conditioned LoRA (:mod:`lrs.nn.baseline_layers`).

Every adapter is a :class:`UserAdapter`: the wrapped Linear as ``base``, its
per-user tables named in ``tables``, ``user_kernel`` / ``user_bias`` of one
user, ``new_rows`` for new users.

Which user each row of the batch belongs to reaches the adapters either as
their ``user_ids`` argument or, for a model that does not know about users,
from the innermost :func:`users` context around the model call (a
``contextvars.ContextVar``, so it works under ``jax.jit`` and ``nnx.jit``
as long as the ``with`` block is inside the traced function)::

    with lrs.nn.users(user_ids):
        logits = model(tokens)

Variable types tell the state apart (``nnx.state(model, UserTable)``):
:class:`SharedParam` (a subclass of ``nnx.Param``) for the adapters' shared
factors, :class:`UserTable` for per-user rows (leading axis: user), and
:class:`UserSupport` (a subclass of ``UserTable``) for the integer support of
the sparse part, which is selected, not differentiated.

No LRS, LoRA or PLoRA forward builds a ``(batch, in, out)`` array (the
per-user head gathers one: its rows are dense kernels): the shared factors are
applied to the whole batch in one matmul and combined with each row's
coefficients; the sparse part is a gather of ``k`` input columns and a
scatter-add into ``k`` outputs per row. Out-of-range user ids are refused
when the ids are concrete; under ``jit`` they give NaN outputs.

This module imports Flax; ``import lrs`` and ``import lrs.nn`` do not import
it (``lrs.nn`` loads it on first access of one of its names).
"""

from __future__ import annotations

import contextlib
import contextvars
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "LRSLinear",
    "SharedParam",
    "UserAdapter",
    "UserLoRALinear",
    "UserSupport",
    "UserTable",
    "adapter_layers",
    "apply",
    "personalize",
    "users",
]

METHODS = ("lrs", "lora", "head", "user_lora")


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


def check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")


def resolve_ids(user_ids, x, num_users: int) -> jax.Array:
    """The batch's user ids, checked on static facts (and values when concrete)."""
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
        low, high = int(ids.min()), int(ids.max())
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


def base_shape(base) -> tuple[int, int]:
    """``(in, out)`` of ``base``, which must be an ``nnx.Linear``."""
    if not isinstance(base, nnx.Linear):
        raise ValueError(f"base must be an nnx.Linear; got {type(base).__name__}")
    return tuple(base.kernel.shape)


class UserAdapter(nnx.Module):
    """Base of the per-user adapters: a wrapped ``nnx.Linear`` plus user tables.

    A subclass sets ``method`` (its name for :func:`personalize`) and
    ``tables`` (the attribute names of its :class:`UserTable` s, the store's
    per-user rows) and defines ``__call__(x, user_ids=None)``,
    ``new_rows(count, rngs)`` (rows of new users, for ``add_users``),
    ``user_kernel(user_id)`` and ``settings()`` (what the checkpoint records).
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

    def check_user(self, user_id) -> int:
        """``user_id`` as an int, or ValueError when outside ``[0, num_users)``."""
        if isinstance(user_id, bool) or not isinstance(user_id, int | np.integer):
            raise ValueError(f"user_id must be an integer; got {user_id!r}")
        u = int(user_id)
        if not 0 <= u < self.num_users:
            raise ValueError(f"user_id must lie in [0, {self.num_users}); got {u}")
        return u

    def user_bias(self, user_id) -> jax.Array:
        """The ``(out,)`` bias of one user (the base's bias, or zeros)."""
        self.check_user(user_id)
        if self.base.bias is None:
            return jnp.zeros(self.base.kernel.shape[1], self.base.kernel.dtype)
        return self.base.bias[...]


class LRSLinear(UserAdapter):
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
        check_int("rank", rank, 1)
        check_int("sparsity", sparsity, 0)
        check_int("num_users", num_users, 1)
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

    def __call__(self, x, user_ids=None):
        ids = resolve_ids(user_ids, x, self.num_users)
        if self.materialize:
            y = jnp.einsum("b...i,bio->b...o", x, self.user_kernels(ids))
            return y + self.base.bias[...] if self.base.bias is not None else y
        y = self.base(x)
        z = jnp.einsum("...i,rio->...ro", x, self.U[...])  # one matmul for all
        y = y + jnp.einsum("b...ro,br->b...o", z, gather_rows(self.V[...], ids))
        probe = getattr(self, "probe", None)
        if probe is not None:  # training with support re-selection
            return y + jnp.einsum("b...i,bio->b...o", x, probe[...][ids])
        if self.sparsity:
            idx, val = (
                gather_rows(self.indices[...], ids),
                gather_rows(self.values[...], ids),
            )
            y = y + sparse_matmul(x, idx, val, self.out_features)
        return y


class UserLoRALinear(UserAdapter):
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
        check_int("rank", rank, 1)
        check_int("num_users", num_users, 1)
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


def _path_str(path) -> str:
    return "/".join(str(p) for p in path)


def adapter_layers(model) -> dict:
    """``{path: adapter}`` for every personalized layer of ``model`` (sorted)."""
    found = {
        _path_str(p): m for p, m in nnx.iter_graph(model) if isinstance(m, UserAdapter)
    }
    return dict(sorted(found.items()))


def set_child(model, path, module):
    """Replaces the node at ``path`` (a tuple of keys) of ``model`` by ``module``."""
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = module
    else:
        setattr(parent, path[-1], module)


def _check_options(method, rank, sparsity, embed_dim) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if method != "lrs" and sparsity:
        raise ValueError(f"sparsity must be 0 for method={method!r}; got {sparsity!r}")
    if method == "head" and rank is not None:
        raise ValueError(f"rank does not apply to method='head'; got {rank!r}")
    if method != "head" and rank is None:
        raise ValueError(f"rank is required for method={method!r}")
    if method != "user_lora" and embed_dim is not None:
        raise ValueError(
            f"embed_dim applies to method='user_lora' only; got {embed_dim!r}"
        )


def _wrap(method, base, *, rank, sparsity, embed_dim, num_users, rngs):
    kw = dict(num_users=num_users, rngs=rngs)
    if method == "lrs":
        return LRSLinear(base, rank=rank, sparsity=sparsity, **kw)
    if method == "lora":
        return UserLoRALinear(base, rank=rank, **kw)
    from lrs.nn import baseline_layers  # imports this module: import here

    if method == "head":
        return baseline_layers.UserHeadLinear(base, **kw)
    embed_dim = 8 if embed_dim is None else embed_dim
    return baseline_layers.PLoRALinear(base, rank=rank, embed_dim=embed_dim, **kw)


def personalize(
    model,
    targets: str,
    *,
    num_users,
    rngs,
    method="lrs",
    rank=None,
    sparsity=0,
    embed_dim=None,
) -> list[str]:
    """Wraps every ``nnx.Linear`` whose path fully matches ``targets``, in place.

    A path is the attribute names and list indices from ``model`` joined by
    ``/`` (``"blocks/0/attn/q"``); it matches when ``re.fullmatch(targets,
    path)`` does (as PEFT's ``target_modules`` regex), so ``".*attn/(q|v)"``
    picks every block's query and value maps. Linears already inside an
    adapter are never wrapped again. A Linear shared by several paths (tied
    weights) is visited once, at its first path, and replaced there only.

    Methods (per-user cost for a layer ``(in, out)``, floats unless noted):

    * ``"lrs"``: :class:`LRSLinear`, ``r + k`` and ``k`` int32; shared ``U``
      (``r`` copies of the kernel);
    * ``"lora"``: :class:`UserLoRALinear`, ``r (in + out)``;
    * ``"head"``: :class:`~lrs.nn.baseline_layers.UserHeadLinear`, ``in * out``;
    * ``"user_lora"``: :class:`~lrs.nn.baseline_layers.PLoRALinear` (PLoRA),
      ``e``; shared ``A``, ``B``, ``P``.

    Args:
      model: any ``nnx.Module``.
      targets: the regular expression.
      num_users: rows of every per-user table.
      rngs: ``nnx.Rngs`` for the new factors.
      method: one of ``"lrs"``, ``"lora"``, ``"head"``, ``"user_lora"``.
      rank: r >= 1 (LRS: shared directions; LoRA: per-user rank; PLoRA:
        shared rank); must be None for ``"head"``.
      sparsity: k >= 0 sparse entries per user (``method="lrs"`` only).
      embed_dim: e >= 1, the user embedding of ``"user_lora"`` (default 8).

    Returns:
      The sorted list of replaced paths.

    Raises:
      ValueError: an unknown ``method``, an option the method does not take,
        bad sizes, or no ``nnx.Linear`` path matches ``targets``.
    """
    _check_options(method, rank, sparsity, embed_dim)
    pattern = re.compile(targets)
    inside = {p for p, m in nnx.iter_graph(model) if isinstance(m, UserAdapter)}
    found = [
        (path, m)
        for path, m in nnx.iter_graph(model)
        if isinstance(m, nnx.Linear)
        and path
        and not any(path[: len(q)] == q for q in inside)
        and pattern.fullmatch(_path_str(path))
    ]
    if not found:
        raise ValueError(
            f"targets {targets!r} matches no nnx.Linear path of the model; "
            f"Linear paths: {linear_paths(model)}"
        )
    opts = dict(rank=rank, sparsity=sparsity, embed_dim=embed_dim)
    for path, base in sorted(found, key=lambda pm: _path_str(pm[0])):
        new = _wrap(method, base, num_users=num_users, rngs=rngs, **opts)
        set_child(model, path, new)
    return sorted(_path_str(p) for p, _ in found)


def linear_paths(model) -> list[str]:
    """The ``/``-joined paths of every ``nnx.Linear`` in ``model`` (sorted)."""
    return sorted(
        _path_str(p) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)
    )
