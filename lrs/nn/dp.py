"""User-level DP training of a personalized NNX model's shared parameters.

The linear private fit (:mod:`lrs.private`) releases only U; its analogue for
a network: every step releases a noisy sum of per-user clipped gradients of
the shared parameters (the adapters' :class:`~lrs.nn.layers.SharedParam`, and
the base too with ``train='all'``), while each user's own rows
(:class:`~lrs.nn.layers.UserTable`: ``v``, sparse values, LoRA pairs) are
trained on that user's data only and never leave it (joint DP, as in
docs/privacy.md).

One step, for a batch of ``B`` users drawn without replacement from the ``n``
with the secret key:

1. each user ``u`` of the batch: ``g_u`` = gradient of the mean loss over the
   user's ``m`` examples with respect to the shared parameters (the user's
   rows as they are);
2. ``g_u`` is scaled to norm at most ``clip_norm`` by the same overflow-proof
   weights as the linear fit (:func:`lrs.private.mechanism.clip_weights`: a
   non-finite gradient weighs exactly 0);
3. the release: ``sum_u c_u g_u + N(0, (2 z clip_norm)^2 I)`` (the noise
   drawn in float64; replace-one sensitivity ``2 clip_norm``), divided by
   ``B`` and applied with Adam (post-processing);
4. each batch user's own rows take an SGD step on its own loss (local).

Accounting: ``steps`` compositions of the subsampled Gaussian, by
``dp_accounting`` through :func:`lrs.private.calibrate` (RDP when
``users_per_step < n``, PLD otherwise), under the replace-one relation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lrs.nn.layers import SharedParam, UserSupport, UserTable, users
from lrs.private import accounting
from lrs.private import mechanism as mech
from lrs.validation import (
    check_integer,
    check_key,
    check_real,
    check_representable,
)

__all__ = ["DPTrainConfig", "DPTrainResult", "train_shared_private"]

TRAIN = ("adapters", "all")
_FLOAT_TABLE = nnx.All(UserTable, nnx.Not(UserSupport))


@dataclasses.dataclass(frozen=True)
class DPTrainConfig:
    """User-level (epsilon, delta)-DP training of the shared parameters.

    Attributes:
      epsilon: the privacy budget of the whole training (``inf``: no noise
        and no clipping, for comparison only: nothing may be released).
      delta: in (0, 1).
      steps: shared steps (releases).
      users_per_step: ``B``, users drawn without replacement per step.
      clip_norm: bound on each user's gradient norm (all shared parameters
        jointly).
      learning_rate: Adam step size of the shared parameters.
      user_lr: SGD step size of each user's own rows (local).
      train: ``'adapters'`` (only the adapters' shared factors; base frozen)
        or ``'all'`` (every ``nnx.Param``).
    """

    epsilon: float = 8.0
    delta: float = 1e-5
    steps: int = 100
    users_per_step: int = 64
    clip_norm: float = 1.0
    learning_rate: float = 1e-2
    user_lr: float = 0.1
    train: str = "adapters"

    def __post_init__(self):
        epsilon = self.epsilon
        if isinstance(epsilon, bool) or not (
            isinstance(epsilon, numbers.Real) and epsilon > 0
        ):
            raise ValueError(f"epsilon must be a number > 0 (or inf); got {epsilon!r}")
        delta = check_real("delta", self.delta, "a number in (0, 1)")
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1); got {self.delta!r}")
        for name in ("steps", "users_per_step"):
            check_integer(name, getattr(self, name), 1)
        for name in ("clip_norm", "learning_rate", "user_lr"):
            value = check_real(name, getattr(self, name), "a finite number >= 0")
            if value < 0 or (name == "clip_norm" and value == 0):
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)!r}")
        if self.train not in TRAIN:
            raise ValueError(f"train must be one of {TRAIN}; got {self.train!r}")

    @property
    def non_private(self) -> bool:
        return float(self.epsilon) == math.inf


@dataclasses.dataclass(frozen=True)
class DPTrainResult:
    """What training spent and how it went.

    Attributes:
      epsilon: epsilon spent at ``delta`` (``inf`` when non-private).
      delta: the delta of ``epsilon``.
      noise_multiplier: ``z``; each release's noise is ``2 z clip_norm``.
      accountant: ``'rdp'`` (subsampled) or ``'pld'``.
      sampling_rate: ``users_per_step / n``.
      nonprivate_losses: ``None`` unless asked for
        (``nonprivate_losses=True``): the ``(steps,)`` exact mean training loss
        of each step's batch, computed from the raw data and NOT private (a
        user's outlier loss shows which steps drew it).
    """

    epsilon: float
    delta: float
    noise_multiplier: float
    accountant: str
    sampling_rate: float
    nonprivate_losses: jax.Array | None = None


def _plan(config: DPTrainConfig, num_users: int) -> accounting.Plan:
    return accounting.Plan(
        steps=config.steps,
        private_init=False,
        moment_histogram=False,
        step_histogram=False,
        num_users=num_users,
        batch_size=min(config.users_per_step, num_users),
    )


def noise_multiplier(config: DPTrainConfig, num_users: int) -> tuple[float, str]:
    """``(z, accountant)`` calibrated so that the training spends ``epsilon``."""
    plan = _plan(config, num_users)
    name = "rdp" if plan.subsampled else "pld"
    if config.non_private:
        return 0.0, name
    # accounting.calibrate is cached: seeds and repeated runs reuse it.
    return accounting.calibrate(plan, config.epsilon, config.delta, name), name


def _check_inputs(model, inputs, targets) -> int:
    tables = nnx.state(model, UserTable)
    if not jax.tree.leaves(tables):
        raise ValueError("model has no personalized layer: call lrs.nn.personalize")
    n_users = jax.tree.leaves(tables)[0].shape[0]
    for name, tree in (("inputs", inputs), ("targets", targets)):
        for leaf in jax.tree.leaves(tree):
            if getattr(leaf, "ndim", 0) < 2:
                raise ValueError(
                    f"{name} must be arrays (n users, m examples, ...); got shape "
                    f"{getattr(leaf, 'shape', None)}"
                )
            if leaf.shape[0] != n_users:
                raise ValueError(
                    f"{name} must hold all {n_users} users of the model (row u = "
                    f"user u); got {leaf.shape[0]} rows"
                )
            if leaf.shape[1] < 1:
                raise ValueError(f"{name} must hold m >= 1 examples per user")
    m_in = {leaf.shape[1] for leaf in jax.tree.leaves(inputs)}
    m_out = {leaf.shape[1] for leaf in jax.tree.leaves(targets)}
    if len(m_in | m_out) != 1:
        raise ValueError(
            "inputs and targets must hold the same m examples per user (axis 1); "
            f"got {sorted(m_in)} and {sorted(m_out)}"
        )
    return n_users


def train_shared_private(
    model,
    inputs,
    targets,
    config: DPTrainConfig,
    *,
    key,
    loss_fn: Callable | None = None,
    progress: Callable | None = None,
    nonprivate_losses: bool = False,
) -> DPTrainResult:
    """Trains ``model``'s shared parameters with user-level DP (in place).

    Args:
      model: an NNX model with personalized layers (:func:`lrs.nn.personalize`).
      inputs: a pytree of arrays ``(n, m, ...)``: user ``u``'s ``m`` examples
        in row ``u`` (the user ids of the model's tables).
      targets: a pytree of arrays ``(n, m, ...)``.
      config: a :class:`DPTrainConfig`.
      key: the secret ``jax.random`` key of the batches and the noise
        (required, fresh, never published).
      loss_fn: ``loss_fn(outputs, targets) -> scalar`` for one user's
        examples (default: mean squared error).
      progress: an optional ``tqdm``-like wrapper of the step range.
      nonprivate_losses: also return each step's exact batch loss (NOT
        private: it tells which steps drew an outlier user).

    Returns:
      A :class:`DPTrainResult`; the model holds the trained parameters.

    Raises:
      ValueError: on a bad configuration, key or input layout.
    """
    if not isinstance(config, DPTrainConfig):
        raise ValueError(f"config must be a DPTrainConfig; got {type(config).__name__}")
    key = check_key(key)
    n = _check_inputs(model, inputs, targets)
    if loss_fn is None:
        _check_mse_targets(model, inputs, targets)
        loss_fn = _mse
    batch = min(config.users_per_step, n)
    shared_filter = SharedParam if config.train == "adapters" else nnx.Param
    graphdef, itabs, ftabs, shared, frozen = nnx.split(
        model, UserSupport, _FLOAT_TABLE, shared_filter, ...
    )
    for leaf in jax.tree.leaves(shared):
        check_representable("clip_norm", float(config.clip_norm), leaf.dtype)
    z, name = noise_multiplier(config, n)  # after the checks: it takes seconds
    step = _cached_step(
        graphdef, loss_fn, float(config.learning_rate), float(config.clip_norm),
        float(config.user_lr), not config.non_private, batch,
    )  # fmt: skip
    state = (itabs, ftabs, shared, optax.adam(config.learning_rate).init(shared))
    losses = []
    steps = range(config.steps)
    for i in progress(steps) if progress else steps:
        k_batch, k_noise = jax.random.split(jax.random.fold_in(key, i))
        normals = _normals(k_noise, shared)
        state, (loss, _) = step(state, frozen, inputs, targets, k_batch, normals, z)
        losses.append(loss)
    nnx.update(model, state[1], state[2])
    epsilon = (
        math.inf
        if config.non_private
        else accounting.epsilon_spent(_plan(config, n), z, config.delta, name)
    )
    return DPTrainResult(
        epsilon=epsilon,
        delta=config.delta,
        noise_multiplier=z,
        accountant=name,
        sampling_rate=batch / n,
        nonprivate_losses=jnp.stack(losses) if nonprivate_losses else None,
    )


def _check_mse_targets(model, inputs, targets) -> None:
    """The default loss compares outputs and targets entry by entry: their
    shapes must agree (a broadcast would silently fit something else)."""
    first = jax.tree.map(lambda a: a[0], inputs)
    m = jax.tree.leaves(first)[0].shape[0]

    def forward(x):
        with users(jnp.zeros((m,), jnp.int32)):
            return model(x)

    out = jax.eval_shape(forward, first)
    want = jax.tree.leaves(targets)[0].shape[1:]
    if getattr(out, "shape", None) != want:
        raise ValueError(
            f"targets must have the model's output shape per user, {out.shape}, "
            f"for the default squared error; got {want} (pass loss_fn= for "
            "another loss)"
        )


def _mse(outputs, targets):
    return jnp.mean(jnp.square(outputs - targets))


def _make_step(graphdef, optimizer, loss_fn, config, z, batch):
    """One jitted step with the noise multiplier ``z`` fixed (the audit's use)."""
    step = _build_step(
        graphdef, optimizer, loss_fn, float(config.clip_norm),
        float(config.user_lr), config.non_private, batch,
    )  # fmt: skip

    def fixed(state, frozen_state, inputs, targets, key, normals):
        return step(state, frozen_state, inputs, targets, key, normals, z)

    return fixed


@functools.lru_cache(maxsize=32)
def _cached_step(graphdef, loss_fn, learning_rate, clip_norm, user_lr, private, batch):
    """The jitted step of :func:`train_shared_private`, built once per model
    structure, loss and step sizes: the noise multiplier is an argument, so a
    sweep over epsilon (or seeds with the same structure) compiles once."""
    return _build_step(
        graphdef, optax.adam(learning_rate), loss_fn, clip_norm, user_lr,
        not private, batch,
    )  # fmt: skip


def _build_step(graphdef, optimizer, loss_fn, clip_norm, user_lr, non_private, batch):
    def user_loss(shared, frows, irows, frozen_state, x, y):
        """One user's mean loss; its rows are a table of one row (id 0)."""
        model = nnx.merge(graphdef, irows, frows, shared, frozen_state)
        m = jax.tree.leaves(x)[0].shape[0]
        with users(jnp.zeros((m,), jnp.int32)):
            return loss_fn(model(x), y)

    grad = jax.value_and_grad(user_loss, argnums=(0, 1))

    def step(state, frozen_state, inputs, targets, key, normals, z):
        itabs, ftabs, shared, opt_state = state
        n = jax.tree.leaves(ftabs)[0].shape[0]
        ids = jax.random.choice(key, n, (batch,), replace=False)
        x = jax.tree.map(lambda a: a[ids], inputs)
        y = jax.tree.map(lambda a: a[ids], targets)
        frows = jax.tree.map(lambda t: t[ids][:, None], ftabs)  # (B, 1, ...)
        irows = jax.tree.map(lambda t: t[ids][:, None], itabs)

        def one_user(x_u, y_u, f_u, i_u):
            return grad(shared, f_u, i_u, frozen_state, x_u, y_u)

        losses, (grads, row_grads) = jax.vmap(one_user)(x, y, frows, irows)
        leaves = jax.tree.leaves(grads)
        norms = jnp.sqrt(
            sum(jnp.square(mech.safe_norm(g, tuple(range(1, g.ndim)))) for g in leaves)
        )
        if non_private:
            weights = jnp.where(jnp.isfinite(norms), 1, 0).astype(norms.dtype)
        else:
            clip = jnp.asarray([clip_norm], norms.dtype)
            weights = mech.clip_weights(norms[:, None], clip)
        total = jax.tree.map(lambda g: jnp.sum(mech.weighted(g, weights), 0), grads)
        scale = 2.0 * z * clip_norm
        released = jax.tree.map(
            lambda s, e: (s + scale * e.astype(s.dtype)) / batch, total, normals
        )
        updates, opt_state = optimizer.update(released, opt_state, shared)
        shared = optax.apply_updates(shared, updates)
        ftabs = jax.tree.map(
            lambda t, g: t.at[ids].set(_finite_or(t[ids] - user_lr * g[:, 0], t[ids])),
            ftabs,
            row_grads,
        )
        return (itabs, ftabs, shared, opt_state), (jnp.mean(losses), released)

    return jax.jit(step)


def _finite_or(new, old):
    """``new`` where each user's row is finite, else ``old`` (a user whose own
    data are non-finite or overflow keeps its row)."""
    axes = tuple(range(1, new.ndim))
    ok = jnp.all(jnp.isfinite(new), axis=axes, keepdims=True)
    return jnp.where(ok, new, old)


@jax.jit
def _draw(key, shapes):
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(key, len(leaves))
    draws = [
        jax.random.normal(k, leaf.shape, jnp.float64)
        for k, leaf in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, draws)


def _normals(key, tree):
    """Standard normals shaped like ``tree``, drawn in float64 outside the
    step (docs/privacy.md, section 2.7), one key per leaf."""
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float64), tree)
    with jax.enable_x64(True):
        return _draw(key, shapes)
