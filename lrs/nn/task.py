"""Synthetic personalized sequence classification from a teacher transformer.

Tokens are uniform on the vocabulary. User i's label is the argmax of a teacher
transformer whose personalized weights are ``W_l + reshape_l(delta_i) * s_l``,
``s_l`` the initial weight scale of layer l (so deltas are in units of each
layer's weights). Two kinds of ``delta_i (P,)``:

* ``"lrs"`` (realizable by LRS): ``strength * (U* v_i + b_i)`` with ``U* (P, r)``
  Gaussian with unit-variance entries of ``U* v_i``, and ``b_i`` ``k`` entries of
  magnitude ``spike`` at random positions;
* ``"dense"`` (misspecified): ``strength`` times a full-rank Gaussian vector
  with the same expected norm as the ``"lrs"`` delta.

The teacher's head bias centres its logits, so the classes are balanced.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrs.nn.model import TransformerConfig, apply, init, weight_shape
from lrs.nn.personalized import flat_size, split_flat
from lrs.validation import check_integer

__all__ = ["Split", "Task", "TaskConfig", "make_task"]


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The teacher and the data sizes.

    Attributes:
      kind: ``"lrs"`` (realizable) or ``"dense"`` (misspecified).
      num_users / num_new_users: trained users and cold-start users.
      samples_per_user: m training samples of each user.
      test_samples / val_samples: unseen samples per user for test / tuning.
      layers, rank, sparsity: where the user deltas live, r and k of the teacher.
      strength: size of the deltas in units of the layer's weights.
      spike: magnitude of the sparse entries (before ``strength``).
      teacher_scale: ``init_scale`` of the teacher (larger: sharper function).
    """

    kind: str = "lrs"
    num_users: int = 1000
    num_new_users: int = 200
    samples_per_user: int = 10
    test_samples: int = 20
    val_samples: int = 20
    layers: tuple[str, ...] = ("block1/mlp_out", "head")
    rank: int = 4
    sparsity: int = 8
    strength: float = 0.5
    spike: float = 6.0
    teacher_scale: float = 1.0

    def __post_init__(self):
        if self.kind not in ("lrs", "dense"):
            raise ValueError(f"kind must be 'lrs' or 'dense'; got {self.kind!r}")
        for name in ("num_users", "num_new_users", "samples_per_user", "test_samples"):
            check_integer(name, getattr(self, name), 1)
        for name in ("val_samples", "rank", "sparsity"):
            check_integer(name, getattr(self, name), 0)


class Split(NamedTuple):
    tokens: jax.Array  # (n, m, T) int32
    labels: jax.Array  # (n, m) int32


class Task(NamedTuple):
    train: Split  # trained users, m samples each
    val: Split  # same users, fresh samples (for tuning)
    test: Split  # same users, fresh samples
    new_train: Split  # new users, m samples each (cold start)
    new_val: Split  # new users, fresh samples (for early stopping)
    new_test: Split  # new users, fresh samples
    teacher: dict  # teacher base parameters
    deltas: jax.Array  # (num_users + num_new_users, P) user deltas (flat)
    info: dict  # label statistics (host floats)


def _layer_scales(model, layers, scale):
    """``(P,)``: the initial weight standard deviation of each flat entry."""
    parts = []
    for name in layers:
        p, q = weight_shape(model, name)
        parts.append(np.full(p * q, scale / np.sqrt(p)))
    return jnp.asarray(np.concatenate(parts), jnp.float32)


def _user_deltas(key, config, size, num):
    k_u, k_v, k_pos, k_sign, k_dense = jax.random.split(key, 5)
    if config.kind == "dense":
        energy = size + config.sparsity * config.spike**2
        g = jax.random.normal(k_dense, (num, size))
        return g * jnp.sqrt(energy / size)
    U = jax.random.normal(k_u, (size, config.rank)) / np.sqrt(max(config.rank, 1))
    low_rank = jax.random.normal(k_v, (num, config.rank)) @ U.T
    scores = jax.random.uniform(k_pos, (num, size))
    idx = jnp.argsort(scores, axis=1)[:, : config.sparsity]
    signs = jnp.where(jax.random.bernoulli(k_sign, 0.5, idx.shape), 1.0, -1.0)
    rows = jnp.arange(num)[:, None]
    return low_rank.at[rows, idx].add(config.spike * signs)


@functools.partial(jax.jit, static_argnames=("model", "layers"))
def _labels(teacher, model, layers, deltas, tokens):
    """Labels ``(n, m)`` of ``tokens (n, m, T)``; user i's teacher has ``deltas[i]``."""

    def one(args):
        delta, x = args
        return apply(teacher, x, model, deltas=split_flat(delta, model, layers))

    logits = jax.lax.map(one, (deltas, tokens), batch_size=100)
    return logits.argmax(-1).astype(jnp.int32)


def make_task(key: jax.Array, model: TransformerConfig, config: TaskConfig) -> Task:
    """Draws the teacher, the users' deltas and every split.

    Each user draws ``m + val_samples + test_samples`` sequences at once (new
    users' validation draws are unused), so the teacher and the users only
    depend on ``key`` and the sizes, not on ``samples_per_user``.
    """
    size = flat_size(model, config.layers)
    tmodel = dataclasses.replace(model, init_scale=config.teacher_scale)
    k_teacher, k_users, k_calib, k_data = jax.random.split(key, 4)
    teacher = init(k_teacher, tmodel)
    calib = jax.random.randint(k_calib, (4096, model.seq_len), 0, model.vocab)
    teacher["head_b"] = -apply(teacher, calib, model).mean(0)
    n, num = config.num_users, config.num_users + config.num_new_users
    scales = _layer_scales(model, config.layers, config.teacher_scale)
    deltas = config.strength * _user_deltas(k_users, config, size, num) * scales
    m, mv, mt = config.samples_per_user, max(config.val_samples, 1), config.test_samples
    shape = (num, m + mv + mt, model.seq_len)
    tokens = jax.random.randint(k_data, shape, 0, model.vocab).astype(jnp.int32)
    labels = _labels(teacher, model, config.layers, deltas, tokens)
    global_labels = _labels(teacher, model, config.layers, 0 * deltas, tokens)

    def split(users, start, stop):
        return Split(tokens[users, start:stop], labels[users, start:stop])

    old, new = slice(0, n), slice(n, num)
    test_labels = np.asarray(labels[old, m + mv :])
    freq = np.bincount(test_labels.ravel(), minlength=model.num_classes)
    info = {
        "personal_label_fraction": float(
            (np.asarray(global_labels[old, m + mv :]) != test_labels).mean()
        ),
        "class_frequencies": (freq / freq.sum()).tolist(),
        "flat_size": size,
    }
    return Task(
        train=split(old, 0, m),
        val=split(old, m, m + mv),
        test=split(old, m + mv, None),
        new_train=split(new, 0, m),
        new_val=split(new, m, m + mv),
        new_test=split(new, m + mv, None),
        teacher=teacher,
        deltas=deltas,
        info=info,
    )
