"""Cold start of new users at the output layer with the library's own solver.

When the personalized layer is the model's **output layer** (its output is
the model's output: an MLP's last Linear, a regression head) and the loss is
the **squared error on the model's outputs**, everything before the layer is
frozen for a new user, so the user's problem is linear. With ``x`` the
layer's input (the frozen features) and ``W``, ``bias`` its base,

    min_{v, |supp b| <= k}  sum_samples || y - bias - x @ (W + sum_j v_j U_j + B) ||^2,

which is AMHT-LRS's per-user problem ``y_s = <z_s, U v + b>`` with

* ``out = 1``: ``z_s = x_s`` (``d = in`` features, ``U`` the ``(in, r)``
  matrix of the ``r`` directions);
* ``out > 1``: one sample per (position, output) pair, ``z_{s,c} = x_s``
  placed at the flat indices ``a * out + c`` of the kernel (``d = in *
  out``; the flattened ``U (in * out, r)``). The lifted data of one user hold
  ``m * out`` rows of ``in * out`` floats: fine for small heads, heavy for a
  language model's vocabulary (use ``out = 1`` heads, or the gradient cold
  start of :mod:`lrs.nn.nnx_train`).

:func:`cold_start_exact` computes the features in one jitted forward pass,
solves every new user with :func:`lrs.personalize` (AMHT's per-user step:
subspace pursuit over the support with an exact least-squares refit of
``(v, b_S)``, as in :func:`lrs.fit`) and writes ``V``, the support and the
values into the layer's rows of those users. Each position of a sequence is
one sample. The layer must not feed anything else: the function checks that
the model's output is the layer's output, and raises ValueError otherwise.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrs.amht import personalize
from lrs.config import AMHTConfig
from lrs.data import UserData
from lrs.nn.layers import LRSLinear, adapter_layers, set_child, users

__all__ = ["ExactColdStart", "cold_start_exact"]


class ExactColdStart(NamedTuple):
    """The new users' fit, as written into the layer.

    Attributes:
      user_ids: ``(t,)`` the distinct users fitted (sorted).
      V: ``(t, r)`` their low-rank coefficients.
      indices: ``(t, k)`` int32 flat kernel indices of their sparse parts.
      values: ``(t, k)`` the sparse values.
      mse: ``(t,)`` each user's mean squared error over its samples and
        outputs after the fit.
    """

    user_ids: np.ndarray
    V: jax.Array
    indices: jax.Array
    values: jax.Array
    mse: np.ndarray


def _layer(model, path) -> LRSLinear:
    found = adapter_layers(model)
    layer = found.get(path)
    if not isinstance(layer, LRSLinear):
        lrs_paths = [p for p, m in found.items() if isinstance(m, LRSLinear)]
        raise ValueError(
            f"path must name an LRSLinear of the model; got {path!r} "
            f"(LRS layers: {lrs_paths})"
        )
    return layer


def _check_ids(user_ids, batch: int, num_users: int) -> np.ndarray:
    ids = np.asarray(user_ids)
    if ids.shape != (batch,) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"user_ids must be {batch} integers, one per row of inputs; got "
            f"shape {ids.shape}, dtype {ids.dtype}"
        )
    if ids.size and (ids.min() < 0 or ids.max() >= num_users):
        raise ValueError(
            f"user_ids must lie in [0, {num_users}); got values in "
            f"[{ids.min()}, {ids.max()}]"
        )
    return ids


def _features(model, path, inputs, ids):
    """``(x, base(x), layer(x), model output)`` of the layer at ``path``."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, inputs, ids):
        model = nnx.merge(graphdef, state)
        seen = []

        class Probe(nnx.Module):  # records what reaches the layer
            def __init__(self, layer):
                self.layer = layer

            def __call__(self, x, user_ids=None):
                y = self.layer(x, user_ids)
                seen.append((x, self.layer.base(x), y))
                return y

        keys = next(p for p, _ in nnx.iter_graph(model) if _key(p) == path)
        set_child(model, keys, Probe(adapter_layers(model)[path]))
        with users(ids):
            out = model(inputs)
        if len(seen) != 1:
            raise ValueError(
                f"the layer at {path!r} runs {len(seen)} times in one forward "
                "pass; cold_start_exact needs it to run once"
            )
        return (*seen[0], out)

    return run(state, inputs, jnp.asarray(ids))


def _key(path) -> str:
    return "/".join(str(p) for p in path)


def _lift(x, residual, out: int):
    """Per-sample features ``(m, in)`` and residuals ``(m, out)`` as AMHT data."""
    if out == 1:
        return x, residual[:, 0]
    lifted = np.einsum("sa,cd->scad", x, np.eye(out, dtype=x.dtype))
    return lifted.reshape(x.shape[0] * out, -1), residual.reshape(-1)


def _user_data(ids, x, residual, out):
    """Each distinct user's samples (every position of its rows), lifted."""
    uniq = np.unique(ids)
    Xs, ys = [], []
    for u in uniq:
        rows = ids == u
        xu = x[rows].reshape(-1, x.shape[-1])
        X, y = _lift(xu, residual[rows].reshape(-1, out), out)
        Xs.append(X)
        ys.append(y)
    return uniq, Xs, ys


def _config(layer: LRSLinear, config) -> AMHTConfig:
    if config is None:
        return AMHTConfig(rank=layer.rank, sparsity=layer.sparsity)
    if not isinstance(config, AMHTConfig):
        raise ValueError(
            f"config must be an lrs.AMHTConfig; got {type(config).__name__}"
        )
    if (config.rank, config.sparsity) != (layer.rank, layer.sparsity):
        raise ValueError(
            f"config must have the layer's rank = {layer.rank} and sparsity = "
            f"{layer.sparsity}; got {config.rank} and {config.sparsity}"
        )
    return config


def cold_start_exact(
    model, path: str, inputs, targets, user_ids, *, config=None
) -> ExactColdStart:
    """Fits the users of ``user_ids`` at the output layer ``path``, in place.

    Everything but those users' rows of the layer stays fixed (the shared
    ``U``, the base, other layers and users). Uses all of each user's rows.

    Args:
      model: a personalized NNX model whose output is the output of ``path``.
      path: the LRS layer's path (a key of :func:`lrs.nn.adapter_layers`).
      inputs: the model's input, ``(batch, ...)``.
      targets: the outputs to fit, the model output's shape ``(batch, ..., out)``.
      user_ids: ``(batch,)`` the owner of each row (new users, typically from
        :func:`lrs.nn.add_users`).
      config: an :class:`lrs.AMHTConfig` with the layer's rank and sparsity
        (ridge, rescue settings...); default ``AMHTConfig(rank, sparsity)``.

    Returns:
      An :class:`ExactColdStart` with what was written.

    Raises:
      ValueError: ``path`` is not an LRS layer, the model's output is not the
        layer's output, or shapes and ids do not fit.
    """
    layer = _layer(model, path)
    config = _config(layer, config)
    ids = _check_ids(user_ids, np.shape(inputs)[0], layer.num_users)
    x, base, y, out = _features(model, path, inputs, ids)
    if y.shape != out.shape or not np.allclose(y, out, rtol=1e-5, atol=1e-6):
        raise ValueError(
            f"the layer at {path!r} is not the model's output layer: the model "
            f"returns {out.shape}, the layer {y.shape}"
        )
    targets = np.asarray(targets, dtype=out.dtype)
    if targets.shape != out.shape:
        raise ValueError(
            f"targets must have the model output's shape {out.shape}; got "
            f"{targets.shape}"
        )
    x, residual = np.asarray(x), targets - np.asarray(base)
    uniq, Xs, ys = _user_data(ids, x, residual, layer.out_features)
    U = np.asarray(layer.U[...]).reshape(layer.rank, -1).T  # (in * out, r)
    V, rows = personalize(U, UserData.from_ragged(Xs, ys), config)
    layer.V[...] = layer.V[...].at[uniq].set(V)
    layer.indices[...] = layer.indices[...].at[uniq].set(rows.indices)
    layer.values[...] = layer.values[...].at[uniq].set(rows.values)
    theta = U @ np.asarray(V).T + np.asarray(rows.dense()).T  # (d, t)
    mse = np.array([np.mean((y - X @ theta[:, i]) ** 2) for i, (X, y) in
                    enumerate(zip(Xs, ys))])  # fmt: skip
    return ExactColdStart(uniq, V, rows.indices, rows.values, mse)
