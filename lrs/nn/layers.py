"""Per-user adapters for Flax NNX models, in one namespace.

:func:`personalize` replaces every ``nnx.Linear`` (or, for the prompt
methods, ``nnx.Embed``) of a model whose path matches a regular expression
by an adapter around it, in place:

* ``method="lrs"``: :class:`LRSLinear`, the shared low-rank plus per-user
  sparse layer, ``W + sum_j V[u, j] U_j + B_u``;
* ``method="lora"``: :class:`UserLoRALinear`, one LoRA pair per user,
  ``W + A_u B_u``;
* ``method="head"`` and ``method="user_lora"``: a dense per-user kernel delta
  (:class:`UserHeadLinear`) and PLoRA's user-conditioned LoRA
  (:class:`PLoRALinear`);
* ``method="prompt"`` and ``method="user_token"``: a per-user soft prompt
  (:class:`UserPromptEmbed`) and a user token (:class:`UserTokenEmbed`) put
  before the token embeddings.

The code lives in one module per concept; this module re-exports it:
:mod:`lrs.nn.user_state` (the :func:`users` context, the variable types
:class:`SharedParam`, :class:`UserTable`, :class:`UserSupport`, the adapter
bases), :mod:`lrs.nn.lrs_linear` (:class:`LRSLinear`),
:mod:`lrs.nn.baseline_layers` (the Linear adapters LRS is compared with),
:mod:`lrs.nn.prompt_layers` (the embedding adapters) and
:mod:`lrs.nn.nnx_personalize` (:func:`personalize`, :func:`adapter_layers`).

No LRS, LoRA or PLoRA forward builds a ``(batch, in, out)`` array (the
per-user head gathers one: its rows are dense kernels).

This module imports Flax; ``import lrs`` and ``import lrs.nn`` do not import
it (``lrs.nn`` loads it on first access of one of its names).
"""

from __future__ import annotations

from lrs.nn.baseline_layers import PLoRALinear, UserHeadLinear, UserLoRALinear
from lrs.nn.lrs_linear import LRSLinear, sparse_dense, sparse_matmul
from lrs.nn.nnx_personalize import (
    EMBED_METHODS,
    LINEAR_METHODS,
    METHODS,
    adapter_layers,
    embed_paths,
    linear_paths,
    personalize,
    set_child,
)
from lrs.nn.prompt_layers import EmbedAdapter, UserPromptEmbed, UserTokenEmbed
from lrs.nn.user_state import (
    LinearAdapter,
    SharedParam,
    SparseProbe,
    UserAdapter,
    UserSupport,
    UserTable,
    apply,
    base_shape,
    gather_rows,
    resolve_ids,
    users,
)

__all__ = [
    "EMBED_METHODS",
    "LINEAR_METHODS",
    "METHODS",
    "EmbedAdapter",
    "LRSLinear",
    "LinearAdapter",
    "PLoRALinear",
    "SharedParam",
    "SparseProbe",
    "UserAdapter",
    "UserHeadLinear",
    "UserLoRALinear",
    "UserPromptEmbed",
    "UserSupport",
    "UserTable",
    "UserTokenEmbed",
    "adapter_layers",
    "apply",
    "base_shape",
    "embed_paths",
    "gather_rows",
    "linear_paths",
    "personalize",
    "resolve_ids",
    "set_child",
    "sparse_dense",
    "sparse_matmul",
    "users",
]
