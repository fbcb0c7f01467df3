"""Personalized transformers: LRS layers and the adapters they are compared with.

Modules: :mod:`~lrs.nn.model` (the transformer), :mod:`~lrs.nn.personalized`
(low-rank plus sparse layers), :mod:`~lrs.nn.adapters` (all personalization
methods), :mod:`~lrs.nn.train` (the shared and cold-start loops),
:mod:`~lrs.nn.task` (synthetic teacher tasks) and :mod:`~lrs.nn.io` (per-user
parameters to and from ``.npz``).
"""

from lrs.nn import adapters, model, personalized, train
from lrs.nn.model import TransformerConfig, apply, init
from lrs.nn.personalized import LRSLayerConfig, LRSUsers, personalized_apply

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
]
