"""Training personalized NNX models: one jitted step that touches the batch's users.

A step on a batch ``(inputs, targets, user_ids)``:

1. ``jnp.unique(user_ids, size=batch)`` gives the batch's distinct users; only
   their rows of every :class:`~lrs.nn.user_state.UserTable` are gathered (a
   local table of ``batch`` rows; padding slots point past the end). This
   holds for every adapter, the soft prompts and user tokens of
   :mod:`lrs.nn.prompt_layers` included: their rows are ``UserTable`` s.
2. The loss is differentiated with respect to the trained shared parameters
   and the local rows. ``StepConfig.train`` selects the shared part:
   ``"all"`` (every ``nnx.Param``: base and adapters), ``"adapters"`` (only
   :class:`~lrs.nn.user_state.SharedParam`, the base frozen) or ``"users"`` (cold
   start: nothing shared moves).
3. Shared parameters take an optax step (``optax.adam(shared_lr)`` unless
   another optimizer is given). Rows take a plain SGD step with ``user_lr``:
   no optimizer state exists for users, so nothing scales with their number.
4. Sparse parts (``StepConfig.reselect``): the step differentiates the loss
   with respect to each local user's dense sparse matrix ``B_u (in, out)``
   (the layer adds ``x @ B_u`` instead of its gather / scatter; this training
   path forms ``(batch, in, out)`` per personalized layer, the forward for
   serving never does), takes the SGD step ``B_u - user_lr * grad`` and
   hard-thresholds it back to its ``k`` largest entries in magnitude: the new
   support and values (iterative hard thresholding, as AMHT's sparse step).
   With ``reselect=False`` the support stays fixed and only the ``k`` values
   are trained. ``StepConfig.reselect_every = N`` re-selects only on the
   steps whose counter (``TrainState.count``, from 0) is a multiple of ``N``
   and trains the values on the fixed support in between: a ``lax.cond``
   chooses between the two programs, so the other steps never build the
   dense stand-in. The counter is global, not per user: a user's support
   moves only on a re-selecting step that has the user in its batch.
5. The rows are scattered back (``mode="drop"`` skips the padding); the
   step donates its state, so the tables are updated in place and a step's
   cost does not grow with the number of users.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lrs.nn.lrs_linear import LRSLinear, sparse_dense
from lrs.nn.nnx_model import next_token_loss
from lrs.nn.nnx_personalize import adapter_layers
from lrs.nn.user_state import SharedParam, SparseProbe, UserSupport, UserTable, users
from lrs.validation import check_integer

__all__ = ["StepConfig", "TrainState", "evaluate", "init", "make_step", "update_model"]

TRAIN_MODES = ("all", "adapters", "users")
_FLOAT_TABLE = nnx.All(UserTable, nnx.Not(UserSupport))


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What a step trains and how far.

    Attributes:
      train: ``"all"``, ``"adapters"`` or ``"users"`` (see the module doc).
      shared_lr: Adam step size of the default shared optimizer.
      user_lr: SGD step size of the per-user rows.
      reselect: re-select each sparse support by hard thresholding.
      reselect_every: with ``reselect``, re-select only on every
        ``reselect_every``-th step (counted from 0; ``1``: every step) and
        train only the values in between (see the module doc).
    """

    train: str = "adapters"
    shared_lr: float = 1e-3
    user_lr: float = 0.1
    reselect: bool = True
    reselect_every: int = 1

    def __post_init__(self):
        if self.train not in TRAIN_MODES:
            raise ValueError(f"train must be one of {TRAIN_MODES}; got {self.train!r}")
        check_integer("reselect_every", self.reselect_every, 1)
        for name in ("shared_lr", "user_lr"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}")


class TrainState(NamedTuple):
    """A personalized model split for training (a pytree; donated by the step)."""

    tables: nnx.State  # every UserTable, leading axis users
    shared: nnx.State  # trained shared parameters
    frozen: nnx.State  # everything else
    opt_state: Any  # optax state of ``shared``
    count: jax.Array  # shape=(), dtype=int32: steps taken


def _shared_filter(config: StepConfig):
    return {"all": nnx.Param, "adapters": SharedParam, "users": nnx.Nothing}[
        config.train
    ]


def init(model, config: StepConfig, optimizer=None):
    """``(graphdef, state, optimizer)`` to train ``model`` under ``config``."""
    if not adapter_layers(model):
        raise ValueError("model has no personalized layer: call lrs.nn.personalize")
    optimizer = optax.adam(config.shared_lr) if optimizer is None else optimizer
    graphdef, tables, shared, frozen = nnx.split(
        model, UserTable, _shared_filter(config), ...
    )
    return (
        graphdef,
        TrainState(
            tables, shared, frozen, optimizer.init(shared), jnp.zeros((), jnp.int32)
        ),
        optimizer,
    )


def update_model(model, state: TrainState) -> None:
    """Writes the trained state back into ``model`` (in place)."""
    nnx.update(model, state.tables, state.shared, state.frozen)


def _num_users(tables) -> int:
    return jax.tree.leaves(tables)[0].shape[0]


def _sparse_layers(model) -> dict:
    return {
        p: m
        for p, m in adapter_layers(model).items()
        if isinstance(m, LRSLinear) and m.sparsity
    }


def _hard_threshold(dense, k):
    flat = dense.reshape(dense.shape[0], -1)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    return idx.astype(jnp.int32), jnp.take_along_axis(flat, idx, 1)


def make_step(graphdef, config: StepConfig, optimizer, loss_fn: Callable = None):
    """A jitted ``step(state, inputs, targets, user_ids) -> (state, loss)``.

    ``loss_fn(outputs, targets) -> scalar`` defaults to
    :func:`~lrs.nn.nnx_model.next_token_loss`. The state argument is donated.
    """
    loss_fn = next_token_loss if loss_fn is None else loss_fn

    def objective(shared, ftabs, probes, itabs, frozen, inputs, targets, local_ids):
        model = nnx.merge(graphdef, itabs, ftabs, shared, frozen)
        for path, layer in _sparse_layers(model).items():
            if path in probes:
                layer.probe = SparseProbe(probes[path])
        with users(local_ids):
            return loss_fn(model(inputs), targets)

    def rows_step(reselect, shared, local, frozen, inputs, targets, local_ids):
        """Loss, shared gradient and the updated local rows (step 2 to 4)."""
        itabs, ftabs = local.split(UserSupport, _FLOAT_TABLE)
        probes = {}
        if reselect:
            model = nnx.merge(graphdef, local, shared, frozen)
            for path, m in _sparse_layers(model).items():
                probes[path] = sparse_dense(
                    m.indices[...], m.values[...], m.in_features, m.out_features
                )
        loss, (g_shared, g_rows, g_probes) = jax.value_and_grad(
            objective, argnums=(0, 1, 2)
        )(shared, ftabs, probes, itabs, frozen, inputs, targets, local_ids)
        ftabs = jax.tree.map(lambda t, g: t - config.user_lr * g, ftabs, g_rows)
        model = nnx.merge(graphdef, itabs, ftabs, shared, frozen)
        for path, m in _sparse_layers(model).items():
            if path in probes:
                dense = probes[path] - config.user_lr * g_probes[path]
                idx, val = _hard_threshold(dense, m.sparsity)
                m.indices[...], m.values[...] = idx, val
        return loss, g_shared, nnx.state(model, UserTable)

    def step(state: TrainState, inputs, targets, user_ids):
        n, b = _num_users(state.tables), user_ids.shape[0]
        uniq, local_ids = jnp.unique(
            user_ids, size=b, fill_value=n, return_inverse=True
        )
        local = jax.tree.map(lambda t: jnp.take(t, uniq, 0, mode="clip"), state.tables)
        args = (state.shared, local, state.frozen, inputs, targets,
                local_ids.reshape(-1))  # fmt: skip
        if config.reselect and config.reselect_every > 1:
            loss, g_shared, local = jax.lax.cond(
                state.count % config.reselect_every == 0,
                functools.partial(rows_step, True),
                functools.partial(rows_step, False),
                *args,
            )
        else:
            loss, g_shared, local = rows_step(config.reselect, *args)
        shared, opt_state = state.shared, state.opt_state
        if config.train != "users":
            updates, opt_state = optimizer.update(g_shared, opt_state, shared)
            shared = optax.apply_updates(shared, updates)
        tables = jax.tree.map(
            lambda t, rows: t.at[uniq].set(rows, mode="drop"), state.tables, local
        )
        new = TrainState(tables, shared, state.frozen, opt_state, state.count + 1)
        return new, loss

    return jax.jit(step, donate_argnums=0)


def evaluate(model, inputs, targets, user_ids, loss_fn: Callable = None):
    """``loss_fn(model(inputs), targets)`` with the rows owned by ``user_ids``."""
    loss_fn = next_token_loss if loss_fn is None else loss_fn
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, inputs, targets, user_ids):
        with users(user_ids):
            return loss_fn(nnx.merge(graphdef, state)(inputs), targets)

    return run(state, inputs, targets, jnp.asarray(user_ids))
