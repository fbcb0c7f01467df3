"""Personalized transformers: LRS layers and the adapters they are compared with.

Modules: :mod:`~lrs.nn.model` (the transformer), :mod:`~lrs.nn.personalized`
(low-rank plus sparse layers), :mod:`~lrs.nn.adapters` (all personalization
methods), :mod:`~lrs.nn.train` (the shared and cold-start loops),
:mod:`~lrs.nn.task` (synthetic teacher tasks) and :mod:`~lrs.nn.io` (per-user
parameters to and from ``.npz``).

Flax NNX adapters (need the ``nn`` extra: ``pip install lrs[nn]``), loaded on
first use so that ``import lrs.nn`` does not import Flax:
:mod:`~lrs.nn.layers` (:class:`LRSLinear`, :class:`UserLoRALinear`,
:func:`personalize`, :func:`users`), :mod:`~lrs.nn.baseline_layers` (the
per-user head :class:`UserHeadLinear` and PLoRA's user-conditioned LoRA
:class:`PLoRALinear`), :mod:`~lrs.nn.nnx_model` (an NNX GPT and MLP),
:mod:`~lrs.nn.nnx_train` (the training step), :mod:`~lrs.nn.cold_start`
(:func:`cold_start_exact`: new users at the output layer by AMHT's per-user
solver), :mod:`~lrs.nn.store` (grow, export / import users, Orbax
checkpoints) and :mod:`~lrs.nn.dp` (user-level DP training of the shared
parameters).
"""

import importlib

from lrs.nn import adapters, model, personalized, train
from lrs.nn.model import TransformerConfig, apply, init
from lrs.nn.personalized import LRSLayerConfig, LRSUsers, personalized_apply

# name -> module holding it; these modules import Flax, so they load on first use
_LAZY = {
    "ExactColdStart": "lrs.nn.cold_start",
    "EmbedAdapter": "lrs.nn.prompt_layers",
    "LRSLinear": "lrs.nn.lrs_linear",
    "LinearAdapter": "lrs.nn.user_state",
    "PLoRALinear": "lrs.nn.baseline_layers",
    "SharedParam": "lrs.nn.user_state",
    "UserAdapter": "lrs.nn.user_state",
    "UserHeadLinear": "lrs.nn.baseline_layers",
    "UserLoRALinear": "lrs.nn.baseline_layers",
    "UserPromptEmbed": "lrs.nn.prompt_layers",
    "UserSupport": "lrs.nn.user_state",
    "UserTable": "lrs.nn.user_state",
    "UserTokenEmbed": "lrs.nn.prompt_layers",
    "adapter_layers": "lrs.nn.nnx_personalize",
    "DPTrainConfig": "lrs.nn.dp",
    "DPTrainResult": "lrs.nn.dp",
    "train_shared_private": "lrs.nn.dp",
    "cold_start_exact": "lrs.nn.cold_start",
    "personalize": "lrs.nn.nnx_personalize",
    "users": "lrs.nn.user_state",
    "add_users": "lrs.nn.store",
    "export_user": "lrs.nn.store",
    "import_user": "lrs.nn.store",
    "baseline_layers": None,
    "cold_start": None,
    "dp": None,
    "layers": None,
    "lrs_linear": None,
    "nnx_model": None,
    "nnx_personalize": None,
    "nnx_train": None,
    "prompt_layers": None,
    "store": None,
    "user_state": None,
}

__all__ = [
    "LRSLayerConfig",
    "LRSUsers",
    "TransformerConfig",
    "adapters",
    "apply",
    "init",
    "model",
    "personalized",
    "personalized_apply",
    "train",
    *sorted(_LAZY),
]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'lrs.nn' has no attribute {name!r}")
    if _LAZY[name] is None:
        return importlib.import_module(f"lrs.nn.{name}")
    return getattr(importlib.import_module(_LAZY[name]), name)
