"""Personalization methods as adapters of one transformer, trained by one loop.

An adapter is a frozen (hashable) dataclass with

* ``init(key, num_users) -> (shared, users)``: pytrees; every ``users`` leaf has
  a leading axis of length ``num_users``;
* ``init_users(key, num_users) -> users``: fresh users (cold start);
* ``personalize(shared, users_g) -> (deltas, prefix)``: for ``G`` gathered users
  (training form, see ``expand``), ``deltas {name: (G, p, q)}`` added to the
  named weights and ``prefix (G, P, d_model)`` or None;
* ``expand`` / ``compress``: stored form <-> training form of gathered users
  (identity except for LRS, whose sparse part is trained dense and projected);
* ``freeze_base``: the base transformer stays fixed in the shared phase;
* ``sparsity``: k > 0 means ``users_g["b"]`` is trained by hard thresholding;
* ``per_user_floats`` / ``per_user_ints``: storage of one user.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lrs.nn.model import TransformerConfig, weight_shape
from lrs.nn.personalized import flat_size, project_sparse, split_flat
from lrs.params import scatter_rows

__all__ = [
    "FullFineTune",
    "GlobalModel",
    "LRS",
    "PerUserHead",
    "PerUserLoRA",
    "SoftPrompt",
    "UserConditionedLoRA",
    "UserToken",
    "per_user_bytes",
]


def per_user_bytes(adapter, float_bytes: int = 4) -> int:
    """Bytes one user costs: floats at ``float_bytes`` each, int32 indices."""
    return float_bytes * adapter.per_user_floats + 4 * adapter.per_user_ints


@dataclasses.dataclass(frozen=True)
class _Adapter:
    model: TransformerConfig
    layers: tuple[str, ...] = ("block1/mlp_out", "head")

    freeze_base = False
    sparsity = 0
    per_user_ints = 0

    def __post_init__(self):
        flat_size(self.model, self.layers)  # ValueError for an unknown layer

    def init(self, key, num_users):
        k_shared, k_users = jax.random.split(key)
        return self.init_shared(k_shared), self.init_users(k_users, num_users)

    def init_shared(self, key):
        return {}

    def init_users(self, key, num_users):
        return {}

    def expand(self, users_g):
        return users_g

    def compress(self, users_g):
        return users_g

    def personalize(self, shared, users_g):
        return {}, None


@dataclasses.dataclass(frozen=True)
class LRS(_Adapter):
    """Low-rank plus sparse deltas ``reshape(U v_i + b_i)`` on ``layers``."""

    rank: int = 4
    sparsity: int = 8
    scale: float = 0.1

    name = "lrs"

    @property
    def size(self):
        return flat_size(self.model, self.layers)

    @property
    def per_user_floats(self):
        return self.rank + self.sparsity

    @property
    def per_user_ints(self):
        return self.sparsity

    def init_shared(self, key):
        return {"U": self.scale * jax.random.normal(key, (self.size, self.rank))}

    def init_users(self, key, num_users):
        k = self.sparsity
        return {
            "v": jnp.zeros((num_users, self.rank)),
            "b_idx": jnp.tile(jnp.arange(k, dtype=jnp.int32), (num_users, 1)),
            "b_val": jnp.zeros((num_users, k)),
        }

    def expand(self, users_g):
        b = scatter_rows(users_g["b_idx"], users_g["b_val"], self.size)
        return {"v": users_g["v"], "b": b}

    def compress(self, users_g):
        idx, val = project_sparse(users_g["b"], self.sparsity)
        return {"v": users_g["v"], "b_idx": idx, "b_val": val}

    def personalize(self, shared, users_g):
        flat = users_g["v"] @ shared["U"].T + users_g["b"]
        return split_flat(flat, self.model, self.layers), None


@dataclasses.dataclass(frozen=True)
class FullFineTune(_Adapter):
    """A dense per-user delta on every personalized weight (storage worst case)."""

    name = "full_finetune"

    @property
    def per_user_floats(self):
        return flat_size(self.model, self.layers)

    def init_users(self, key, num_users):
        return {"delta": jnp.zeros((num_users, self.per_user_floats))}

    def personalize(self, shared, users_g):
        return split_flat(users_g["delta"], self.model, self.layers), None


@dataclasses.dataclass(frozen=True)
class GlobalModel(_Adapter):
    """No personalization: every user gets the shared transformer."""

    name = "global"
    per_user_floats = 0


@dataclasses.dataclass(frozen=True)
class PerUserHead(_Adapter):
    """A per-user classification head on a frozen base (delta on ``head``)."""

    name = "per_user_head"
    freeze_base = True

    @property
    def per_user_floats(self):
        p, q = weight_shape(self.model, "head")
        return p * q

    def init_users(self, key, num_users):
        return {"head": jnp.zeros((num_users,) + weight_shape(self.model, "head"))}

    def personalize(self, shared, users_g):
        return {"head": users_g["head"]}, None


@dataclasses.dataclass(frozen=True)
class PerUserLoRA(_Adapter):
    """Per-user rank-``rank`` factors ``A_i B_i`` on each personalized weight."""

    rank: int = 1
    scale: float = 0.1

    name = "per_user_lora"

    @property
    def per_user_floats(self):
        return sum(sum(weight_shape(self.model, n)) * self.rank for n in self.layers)

    def init_users(self, key, num_users):
        users = {}
        for name, k in zip(self.layers, jax.random.split(key, len(self.layers))):
            p, q = weight_shape(self.model, name)
            a = self.scale * jax.random.normal(k, (num_users, p, self.rank))
            users[name] = {"A": a, "B": jnp.zeros((num_users, self.rank, q))}
        return users

    def personalize(self, shared, users_g):
        deltas = {n: users_g[n]["A"] @ users_g[n]["B"] for n in self.layers}
        return deltas, None


@dataclasses.dataclass(frozen=True)
class UserConditionedLoRA(_Adapter):
    """Shared ``A_l``; user embedding ``e_i`` mapped to ``B_l(e_i) = M_l e_i``.

    Delta on layer l: ``A_l reshape(M_l e_i)``, with ``e_i (embed_dim,)`` the only
    per-user parameters (personalized-LoRA style).
    """

    rank: int = 4
    embed_dim: int = 8
    scale: float = 0.1

    name = "user_conditioned_lora"

    @property
    def per_user_floats(self):
        return self.embed_dim

    def init_shared(self, key):
        shared = {}
        for name, k in zip(self.layers, jax.random.split(key, len(self.layers))):
            p, q = weight_shape(self.model, name)
            ka, km = jax.random.split(k)
            a = jax.random.normal(ka, (p, self.rank)) / jnp.sqrt(p)
            m = self.scale * jax.random.normal(km, (self.embed_dim, self.rank * q))
            shared[name] = {"A": a, "M": m / jnp.sqrt(self.embed_dim)}
        return shared

    def init_users(self, key, num_users):
        return {"e": jnp.zeros((num_users, self.embed_dim))}

    def personalize(self, shared, users_g):
        deltas = {}
        for name in self.layers:
            q = weight_shape(self.model, name)[1]
            b = (users_g["e"] @ shared[name]["M"]).reshape(-1, self.rank, q)
            deltas[name] = shared[name]["A"] @ b
        return deltas, None


@dataclasses.dataclass(frozen=True)
class SoftPrompt(_Adapter):
    """``length`` per-user prompt embeddings put before the tokens."""

    length: int = 1
    scale: float = 0.1

    name = "soft_prompt"

    @property
    def per_user_floats(self):
        return self.length * self.model.d_model

    def init_users(self, key, num_users):
        shape = (num_users, self.length, self.model.d_model)
        return {"prompt": self.scale * jax.random.normal(key, shape)}

    def personalize(self, shared, users_g):
        return {}, users_g["prompt"]


@dataclasses.dataclass(frozen=True)
class UserToken(_Adapter):
    """A user embedding ``e_i`` projected by a shared map to one input token."""

    embed_dim: int = 8

    name = "user_token"

    @property
    def per_user_floats(self):
        return self.embed_dim

    def init_shared(self, key):
        d = self.model.d_model
        proj = jax.random.normal(key, (self.embed_dim, d)) / jnp.sqrt(self.embed_dim)
        return {"proj": proj}

    def init_users(self, key, num_users):
        return {"e": jnp.zeros((num_users, self.embed_dim))}

    def personalize(self, shared, users_g):
        return {}, (users_g["e"] @ shared["proj"])[:, None, :]
