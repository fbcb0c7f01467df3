"""The jitted programs: one training run per method and size, vmapped over
seeds and the learning-rate grid, and the global pretraining."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lrs.nn.lrs_linear import LRSLinear
from lrs.nn.nnx_personalize import adapter_layers
from lrs.nn.user_state import SharedParam, SparseProbe, UserSupport, UserTable, users
from lrs.studies.fair.plora import objective
from lrs.studies.fair.setup import BASE_LR, PRETRAIN_LR, Setup

_FLOAT_TABLE = nnx.All(UserTable, nnx.Not(UserSupport))


def split(model) -> tuple:
    """``(graphdef, params)`` of a personalized model for :func:`make_program`.

    ``params`` is ``{"base", "shared", "rows", "frozen", "probes"}``: the base
    (``nnx.Param`` that are not adapters' shared factors), the shared factors
    (:class:`~lrs.nn.user_state.SharedParam`), the float per-user tables, the
    rest (integer supports), and for each LRS layer with ``k > 0`` a dense
    ``(users, in, out)`` training stand-in of its sparse part (zero at the
    start, ``k`` non-zeros per user after every step).
    """
    graphdef, shared, base, rows, frozen = nnx.split(
        model, SharedParam, nnx.Param, _FLOAT_TABLE, ...
    )
    probes = {
        path: jnp.zeros((layer.num_users, layer.in_features, layer.out_features))
        for path, layer in sparse_layers(model).items()
    }
    return graphdef, dict(
        base=base, shared=shared, rows=rows, frozen=frozen, probes=probes
    )


def sparse_layers(model) -> dict:
    """The LRS adapters of ``model`` with a sparse part (``k > 0``), by path."""
    return {
        p: m
        for p, m in adapter_layers(model).items()
        if isinstance(m, LRSLinear) and m.sparsity
    }


def hard_threshold(dense, k: int):
    """Keeps the ``k`` largest-magnitude entries of each user's ``(in, out)`` slice."""
    flat = dense.reshape(dense.shape[0], -1)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    keep = jnp.zeros_like(flat).at[jnp.arange(flat.shape[0])[:, None], idx].set(1.0)
    return (flat * keep).reshape(dense.shape)


def make_program(graphdef, sparsity: dict, setup: Setup, *, mi_weight: float = 0.0):
    """The jitted training run of one method, vmapped over seeds and learning rates.

    ``program(params, lrs, flags, data)``: ``params`` stacked over seeds (leading
    axis ``S``), ``lrs (L,)`` the grid, ``flags = (train base, train shared)``
    (0 or 1), ``data = (tokens (S, n, m, T), labels (S, n, m), held-out tokens
    (S, n, 2 v, T), held-out labels (S, n, 2 v))``. Each of the
    ``S x L`` runs takes ``setup.steps`` full-batch steps on the ``n`` users'
    ``m`` samples:

    * base (``flags[0]``): Adam at :data:`BASE_LR` (the same for every method);
    * shared factors (``flags[1]``) and per-user rows: Adam at the grid's rate;
    * LRS sparse parts: iterative hard thresholding, ``B_u <- H_k(B_u - lr
      g_u / rms(g_u))`` with ``g_u`` the gradient of user ``u``'s dense
      ``(in, out)`` stand-in (normalized per user, so one rate serves every
      scale, as Adam's does for the other parameters).

    With a ``"key"`` entry in ``params`` (PLoRA as published: raw key data
    per seed), every step's loss is :func:`lrs.studies.fair.plora.objective`
    under a fresh key (the same for every rate of the grid): the layers'
    dropouts, PDropout and ``mi_weight`` times the MI term, the last two
    scaled by ``flags[1]`` (on in the shared phase, off in the cold start).

    Returns ``(acc_a (S, L, checks, n), acc_b (same), loss (S, L, checks),
    best)``: each user's accuracy on the first ``v`` and on the last ``v``
    held-out draws, and the parameters at the check with the best mean
    ``acc_a`` (per run); check ``c`` is after ``c * eval_every`` steps.
    """
    n_steps, every = setup.steps, setup.eval_every

    def merged(p):
        model = nnx.merge(graphdef, p["base"], p["shared"], p["rows"], p["frozen"])
        layers = adapter_layers(model)
        for path, probe in p["probes"].items():
            layers[path].probe = SparseProbe(probe)
        return model

    def logits(p, tokens, ids):
        with users(ids):
            return merged(p)(tokens)

    def one(params, lr, flags, data):
        tok, lab, e_tok, e_lab = data
        n, m, t = tok.shape
        ids = jnp.repeat(jnp.arange(n), m)
        x, y = tok.reshape(n * m, t), lab.reshape(-1)
        opt_base, opt_adapt = optax.adam(BASE_LR), optax.adam(lr)

        def loss_fn(train, fixed, key=None):
            p = {**fixed, **train}
            if key is not None:
                model, phase = merged(p), flags[1]
                return objective(
                    model, x, y, ids, key, shared_phase=phase, mi_weight=mi_weight
                )
            out = logits(p, x, ids)
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

        def accuracy(p):  # per user: first half of the held-out draws, second half
            v2 = e_tok.shape[1]
            ids = jnp.repeat(jnp.arange(n), v2)
            out = logits(p, e_tok.reshape(n * v2, t), ids)
            hit = (out.argmax(-1) == e_lab.reshape(-1)).reshape(n, 2, v2 // 2)
            return hit.mean(2).T

        def step(carry, i):
            p, s_base, s_adapt = carry
            train = {k: p[k] for k in ("base", "shared", "rows", "probes")}
            key = None
            if "key" in p:
                key = jax.random.fold_in(jax.random.wrap_key_data(p["key"]), i)
            loss, g = jax.value_and_grad(loss_fn)(train, {"frozen": p["frozen"]}, key)
            u_base, s_base = opt_base.update(g["base"], s_base, p["base"])
            (u_shared, u_rows), s_adapt = opt_adapt.update(
                (g["shared"], g["rows"]), s_adapt, (p["shared"], p["rows"])
            )
            new = dict(p)
            new["base"] = jax.tree.map(lambda a, u: a + flags[0] * u, p["base"], u_base)
            new["shared"] = jax.tree.map(
                lambda a, u: a + flags[1] * u, p["shared"], u_shared
            )
            new["rows"] = jax.tree.map(lambda a, u: a + u, p["rows"], u_rows)
            probes = {}
            for path, dense in p["probes"].items():
                grad = g["probes"][path]
                rms = jnp.sqrt(jnp.mean(grad.reshape(n, -1) ** 2, 1)) + 1e-12
                probes[path] = hard_threshold(
                    dense - lr * grad / rms[:, None, None], sparsity[path]
                )
            new["probes"] = probes
            return (new, s_base, s_adapt), loss

        def check(carry, c):
            p, s_base, s_adapt, best, best_acc = carry
            (p, s_base, s_adapt), losses = jax.lax.scan(
                step, (p, s_base, s_adapt), c * every + jnp.arange(every)
            )
            acc_a, acc_b = accuracy(p)
            better = acc_a.mean() > best_acc
            best = jax.tree.map(lambda b, q: jnp.where(better, q, b), best, p)
            best_acc = jnp.where(better, acc_a.mean(), best_acc)
            return (p, s_base, s_adapt, best, best_acc), (acc_a, acc_b, losses[-1])

        acc0_a, acc0_b = accuracy(params)
        loss0 = loss_fn(
            {k: params[k] for k in ("base", "shared", "rows", "probes")},
            {"frozen": params["frozen"]},
        )
        carry = (
            params,
            opt_base.init(params["base"]),
            opt_adapt.init((params["shared"], params["rows"])),
            params,
            acc0_a.mean(),
        )
        carry, (acc_a, acc_b, losses) = jax.lax.scan(
            check, carry, jnp.arange(n_steps // every)
        )
        acc_a = jnp.concatenate([acc0_a[None], acc_a])
        acc_b = jnp.concatenate([acc0_b[None], acc_b])
        losses = jnp.concatenate([loss0[None], losses])
        return acc_a, acc_b, losses, carry[3]

    per_lr = jax.vmap(one, in_axes=(None, 0, None, None))
    return jax.jit(jax.vmap(per_lr, in_axes=(0, None, None, 0)))


def make_pretrain(graphdef, setup: Setup):
    """The jitted global pretraining, vmapped over seeds.

    ``pretrain(params (S, ...), keys (S,), data)`` with ``data = (tokens (S, N,
    T), labels (S, N), val tokens (S, V, T), val labels)``: Adam at
    :data:`PRETRAIN_LR` on minibatches of ``setup.pretrain_batch`` drawn with
    replacement, ``setup.pretrain_steps`` steps, validation ten times along
    the way; returns ``(best params, best validation accuracy, best step)``
    per seed.
    """
    n_steps, batch = setup.pretrain_steps, setup.pretrain_batch
    every = max(n_steps // 10, 1)
    opt = optax.adam(PRETRAIN_LR)

    def one(params, key, data):
        x, y, xv, yv = data

        def loss_fn(p, idx):
            out = nnx.merge(graphdef, p)(x[idx])
            return optax.softmax_cross_entropy_with_integer_labels(out, y[idx]).mean()

        def accuracy(p):
            return (nnx.merge(graphdef, p)(xv).argmax(-1) == yv).mean()

        def step(carry, k):
            p, s = carry
            idx = jax.random.randint(k, (batch,), 0, x.shape[0])
            u, s = opt.update(jax.grad(loss_fn)(p, idx), s, p)
            return (optax.apply_updates(p, u), s), None

        def check(carry, i):
            p, s, best, best_acc, best_step = carry
            (p, s), _ = jax.lax.scan(
                step, (p, s), jax.random.split(jax.random.fold_in(key, i), every)
            )
            acc = accuracy(p)
            better = acc > best_acc
            best = jax.tree.map(lambda b, q: jnp.where(better, q, b), best, p)
            best_step = jnp.where(better, (i + 1) * every, best_step)
            return (p, s, best, jnp.maximum(acc, best_acc), best_step), None

        carry = (params, opt.init(params), params, accuracy(params), 0)
        carry, _ = jax.lax.scan(check, carry, jnp.arange(n_steps // every))
        return carry[2], carry[3], carry[4]

    return jax.jit(jax.vmap(one))
