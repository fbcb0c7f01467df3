"""One training loop for every adapter: a shared phase and a cold-start phase.

Parameters are ``{"base": transformer, "shared": adapter's shared, "users":
adapter's per-user}``. A step samples ``G`` distinct users and ``s`` of each
user's samples, gathers those users' parameters (nothing per-user is expanded
for users outside the batch) and takes

* an Adam step (gradients clipped to norm 1) at ``lr`` on the trainable shared
  parts: the base (unless the adapter freezes it) and the adapter's shared
  parameters, in the ``"shared"`` phase only;
* an Adam step at ``lr_user`` on the gathered users' dense per-user parameters
  (users outside the batch are not moved);
* for LRS, an iterative-hard-thresholding step on each gathered ``b_i``:
  ``b_i <- H_k(b_i - lr_sparse * grad_i)``, with ``grad_i`` the gradient of the
  user's mean loss, so ``b_i`` keeps exactly ``k`` stored entries.

The ``"new_users"`` phase (cold start) trains only fresh users' parameters; the
base and the shared parts are frozen. Steps run in jitted ``lax.scan`` chunks,
one progress-bar update per chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrs.nn.model import TransformerConfig, apply
from lrs.nn.personalized import _check_tokens
from lrs.validation import check_integer, check_real

__all__ = [
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "loss_and_accuracy",
    "per_user_metrics",
    "train",
]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Budget and step sizes of one training run.

    Attributes:
      steps: optimizer steps.
      users_per_batch: G distinct users per step (capped at the number of users).
      samples_per_user: s samples of each user per step (capped at m).
      lr: Adam step size of the shared parameters.
      lr_user: Adam step size of the per-user parameters.
      lr_sparse: gradient step of LRS's sparse parts before hard thresholding.
      progress_updates: at most this many progress-bar updates (jitted chunks).
    """

    steps: int = 600
    users_per_batch: int = 64
    samples_per_user: int = 5
    lr: float = 3e-3
    lr_user: float = 0.1
    lr_sparse: float = 0.3
    progress_updates: int = 10

    def __post_init__(self):
        for name in (
            "steps",
            "users_per_batch",
            "samples_per_user",
            "progress_updates",
        ):
            check_integer(name, getattr(self, name), 1)
        for name in ("lr", "lr_user", "lr_sparse"):
            check_real(name, getattr(self, name), "a finite number >= 0", low=0)


class TrainResult(NamedTuple):
    params: dict  # {"base", "shared", "users"}; the best on ``val`` if given
    loss: np.ndarray  # (steps,) training loss of each step's batch
    seconds: float  # wall time, compilation included
    val_accuracy: np.ndarray  # (chunks,) after each chunk; empty without val
    best_step: int  # steps taken by the returned params


def _optimizer():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam())


def per_user_metrics(adapter, model, base, shared, users_g, tokens, labels):
    """Per-user mean cross-entropy and accuracy ``(G,)`` of ``tokens (G, s, T)``.

    ``users_g`` is the gathered users' training form (``adapter.expand``).
    """
    deltas, prefix = adapter.personalize(shared, users_g)

    def one(d, p, x):
        return apply(base, x, model, deltas=d, prefix=p)

    in_axes = (0, None if prefix is None else 0, 0)
    logits = jax.vmap(one, in_axes=in_axes)(deltas, prefix, tokens)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(1)
    return loss, (logits.argmax(-1) == labels).mean(1)


def loss_and_accuracy(adapter, model, base, shared, users_g, tokens, labels):
    """Mean cross-entropy and accuracy over ``G`` users (see per_user_metrics)."""
    loss, acc = per_user_metrics(adapter, model, base, shared, users_g, tokens, labels)
    return loss.mean(), acc.mean()


def _sparse_keys(adapter):
    return ("b",) if adapter.sparsity else ()


def _adam_users(adapter, users):
    return {k: v for k, v in users.items() if k not in ("b_idx", "b_val", "b")}


def _step(adapter, model, phase, carry, batch, hyper):
    params, opt_shared, opt_users = carry
    ids, tokens, labels = batch
    lr, lr_user, lr_sparse = hyper[0], hyper[1], hyper[2]
    users_g = adapter.expand(jax.tree.map(lambda a: a[ids], params["users"]))
    train_base = phase == "shared" and not adapter.freeze_base
    shared_part = {"shared": params["shared"]} if phase == "shared" else {}
    if train_base:
        shared_part["base"] = params["base"]

    def loss_fn(part, users_g):
        p = {**params, **part}
        return loss_and_accuracy(
            adapter, model, p["base"], p["shared"], users_g, tokens, labels
        )

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (loss, _), (g_part, g_users) = grad_fn(shared_part, users_g)
    u, opt_shared = _optimizer().update(g_part, opt_shared)
    new = {
        **params,
        **optax.apply_updates(shared_part, jax.tree.map(lambda x: -lr * x, u)),
    }

    full = _adam_users(adapter, params["users"])
    users = dict(params["users"])
    if full:
        g_full = jax.tree.map(
            lambda a, g: jnp.zeros_like(a).at[ids].add(g),
            full,
            _adam_users(adapter, g_users),
        )
        u, opt_users = _optimizer().update(g_full, opt_users)
        n = jax.tree.leaves(full)[0].shape[0]
        present = jnp.zeros(n).at[ids].set(1.0)

        def scale(x):  # users outside the batch do not move
            return -lr_user * x * present.reshape((-1,) + (1,) * (x.ndim - 1))

        users.update(optax.apply_updates(full, jax.tree.map(scale, u)))
    if adapter.sparsity:
        b = users_g["b"] - lr_sparse * ids.shape[0] * g_users["b"]
        sparse = adapter.compress({"v": users_g["v"], "b": b})
        users["b_idx"] = users["b_idx"].at[ids].set(sparse["b_idx"])
        users["b_val"] = users["b_val"].at[ids].set(sparse["b_val"])
    new["users"] = users
    return (new, opt_shared, opt_users), loss


@functools.partial(jax.jit, static_argnames=("adapter", "model", "phase"))
def _chunk(carry, batches, hyper, adapter, model, phase):
    step = functools.partial(_step, adapter, model, phase, hyper=hyper)
    return jax.lax.scan(lambda c, b: step(c, b), carry, batches)


@functools.partial(jax.jit, static_argnames=("steps", "G", "s"))
def _sample(key, tokens, labels, steps, G, s):
    """Batches for ``steps`` steps: ids (steps, G), tokens (steps, G, s, T), labels."""
    n, m = labels.shape

    def one(k):
        k_users, k_samples = jax.random.split(k)
        ids = jax.random.permutation(k_users, n)[:G]
        order = jnp.argsort(jax.random.uniform(k_samples, (G, m)), axis=1)[:, :s]
        return ids, tokens[ids[:, None], order], labels[ids[:, None], order]

    return jax.vmap(one)(jax.random.split(key, steps))


def warm_up_sampler(data, config: TrainConfig) -> None:
    """Compiles the batch sampler for ``data = (tokens, labels)`` (timing aid)."""
    n, m = data[1].shape
    size = config.steps // _chunks(config.steps, config.progress_updates)
    G, s = min(config.users_per_batch, n), min(config.samples_per_user, m)
    jax.block_until_ready(_sample(jax.random.key(0), *data, size, G, s))


def _chunks(steps, most):
    """The largest divisor of ``steps`` that is <= ``most``: equal jitted chunks."""
    return max(c for c in range(1, min(steps, most) + 1) if steps % c == 0)


def _check_data(tokens, labels, model):
    tokens, labels = jnp.asarray(tokens), jnp.asarray(labels)
    if tokens.ndim != 3 or labels.shape != tokens.shape[:2]:
        raise ValueError(
            "tokens must be (n, m, T) and labels (n, m); got "
            f"{tokens.shape} and {labels.shape}"
        )
    _check_tokens(tokens, model)
    if not jnp.issubdtype(labels.dtype, jnp.integer) or (
        labels.size
        and not 0 <= int(labels.min()) <= int(labels.max()) < model.num_classes
    ):
        raise ValueError(f"labels must be integer classes in [0, {model.num_classes})")
    return tokens, labels


def train(
    key: jax.Array,
    adapter,
    model: TransformerConfig,
    params: dict,
    tokens: jax.Array,
    labels: jax.Array,
    config: TrainConfig,
    *,
    phase: str = "shared",
    val: tuple[jax.Array, jax.Array] | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> TrainResult:
    """Trains ``params`` on ``tokens (n, m, T)``, ``labels (n, m)``; n = users.

    Args:
      phase: ``"shared"`` (base, shared and per-user parts) or ``"new_users"``
        (per-user parts only; ``params["users"]`` are the new users').
      val: optional ``(tokens (n, m', T), labels (n, m'))`` of the same users:
        the accuracy on it is measured after each chunk (and at step 0) and the
        best parameters are returned (early stopping).
    Returns ``TrainResult``; the inputs are not modified.
    """
    if phase not in ("shared", "new_users"):
        raise ValueError(f"phase must be 'shared' or 'new_users'; got {phase!r}")
    tokens, labels = _check_data(tokens, labels, model)
    n, m = labels.shape
    G, s = min(config.users_per_batch, n), min(config.samples_per_user, m)
    hyper = jnp.array([config.lr, config.lr_user, config.lr_sparse])
    trainable = {"shared": params["shared"]} if phase == "shared" else {}
    if phase == "shared" and not adapter.freeze_base:
        trainable["base"] = params["base"]
    carry = (
        params,
        _optimizer().init(trainable),
        _optimizer().init(_adam_users(adapter, params["users"])),
    )
    chunks = _chunks(config.steps, config.progress_updates)
    size = config.steps // chunks
    keys = jax.random.split(key, chunks)
    losses, start = [], time.perf_counter()
    if val is not None:
        val = _check_data(*val, model)
        best = (evaluate(adapter, model, params, *val)[1], params, 0)
        val_acc = []
    from tqdm import tqdm

    bar = tqdm(
        total=config.steps,
        desc=desc or f"{adapter.name} ({phase})",
        disable=not progress,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )
    with bar:
        for k in keys:
            batches = _sample(k, tokens, labels, size, G, s)
            carry, loss = _chunk(carry, batches, hyper, adapter, model, phase)
            losses.append(np.asarray(loss))
            post = {"loss": f"{losses[-1][-1]:.3f}"}
            if val is not None:
                val_acc.append(evaluate(adapter, model, carry[0], *val)[1])
                post["val_acc"] = f"{val_acc[-1]:.3f}"
                if val_acc[-1] > best[0]:
                    best = (val_acc[-1], carry[0], size * len(losses))
            bar.set_postfix(post, refresh=False)
            bar.update(size)
    seconds = time.perf_counter() - start
    if val is None:
        return TrainResult(
            carry[0], np.concatenate(losses), seconds, np.zeros(0), config.steps
        )
    return TrainResult(
        best[1], np.concatenate(losses), seconds, np.array(val_acc), best[2]
    )


@functools.partial(jax.jit, static_argnames=("adapter", "model"))
def _eval_chunk(params, ids, tokens, labels, adapter, model):
    users_g = adapter.expand(jax.tree.map(lambda a: a[ids], params["users"]))
    return per_user_metrics(
        adapter, model, params["base"], params["shared"], users_g, tokens, labels
    )


def evaluate(
    adapter, model, params, tokens, labels, *, users_per_batch: int = 64
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over all users' ``tokens (n, m, T)``."""
    tokens, labels = _check_data(tokens, labels, model)
    n = labels.shape[0]
    G = users_per_batch  # fixed chunk shape: one compilation for any n
    losses, accs = [], []
    for start in range(0, n, G):
        ids = np.arange(start, start + G) % n  # the last chunk wraps: fixed shapes
        loss, acc = _eval_chunk(params, ids, tokens[ids], labels[ids], adapter, model)
        count = min(G, n - start)
        losses.append(np.asarray(loss)[:count])
        accs.append(np.asarray(acc)[:count])
    return float(np.concatenate(losses).mean()), float(np.concatenate(accs).mean())
