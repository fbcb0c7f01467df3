"""User-level DP training of a personalized network's shared layers: test error
against epsilon.

    python experiments/nn_dp.py --out results/nn_dp          # ~5 min, 2 cores
    python experiments/nn_dp.py --quick --out /tmp/nn_dp     # ~1 min

Task: a teacher MLP (16 -> 32 -> 4) whose last layer each user changes by a
rank-2 plus 2-sparse kernel (a realizable LRS teacher). Student: an MLP of the
same shape, randomly initialized, its last layer wrapped by ``lrs.nn``'s LRS
adapter (rank 2, sparsity 2). The shared parameters (base and U) are trained
with :func:`lrs.nn.dp.train_shared_private` at epsilon in {1, 2, 4, 8, inf}
(inf: no clipping, no noise); then every user fits its own rows on its own
training samples with the released shared parameters fixed (local, no privacy
cost). Row ``local only``: the same local fit on the untrained shared
parameters. Test MSE on each user's held-out samples; mean and 95% interval
over seeds (t distribution).
"""

from __future__ import annotations

import math
import sys

import _common as c
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from flax import nnx

from lrs.nn import dp, layers, nnx_model

SIZES = (16, 32, 4)
FULL = dict(users=1000, m=10, batch=100, steps=200, local_steps=100, seeds=3)
QUICK = dict(users=400, m=10, batch=100, steps=60, local_steps=40, seeds=1)
EPSILONS = (1.0, 2.0, 4.0, 8.0, math.inf)


def teacher_data(key, users: int, m: int):
    """``(x, y)`` of shape ``(users, 2m, .)``: the teacher's outputs plus noise."""
    k = jax.random.split(key, 7)
    teacher = nnx_model.MLP(
        SIZES, rngs=nnx.Rngs(int(jax.random.randint(k[0], (), 0, 2**30)))
    )
    hidden_in, out = SIZES[1], SIZES[2]
    U = jax.random.normal(k[1], (2, hidden_in, out)) / math.sqrt(hidden_in)
    V = jax.random.normal(k[2], (users, 2))
    flat = jax.vmap(
        lambda kk: jax.random.choice(kk, hidden_in * out, (2,), replace=False)
    )(jax.random.split(k[3], users))
    values = jax.random.normal(k[4], (users, 2)) / math.sqrt(hidden_in)
    x = jax.random.normal(k[5], (users, 2 * m, SIZES[0]))
    h = jax.nn.gelu(teacher.layers[0](x))
    delta = jnp.einsum("ur,rio->uio", V, U) + layers.sparse_dense(
        flat, values, hidden_in, out
    )
    y = teacher.layers[1](h) + jnp.einsum("umi,uio->umo", h, delta)
    return x, y + 0.1 * jax.random.normal(k[6], y.shape)


def student(users: int, seed: int):
    model = nnx_model.MLP(SIZES, rngs=nnx.Rngs(seed))
    layers.personalize(
        model, "layers/1", rank=2, sparsity=2, num_users=users, rngs=nnx.Rngs(seed + 1)
    )
    return model


def test_mse(model, x, y) -> float:
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x, y):
        def one(u, x_u, y_u):
            with layers.users(jnp.full((x_u.shape[0],), u, jnp.int32)):
                return jnp.mean((nnx.merge(graphdef, state)(x_u) - y_u) ** 2)

        return jnp.mean(jax.vmap(one)(jnp.arange(x.shape[0]), x, y))

    return float(run(state, x, y))


def one_run(p, seed: int, epsilon: float | None):
    """Test MSE after private shared training at ``epsilon`` (None: none)."""
    key = jax.random.key(seed)
    x, y = teacher_data(jax.random.fold_in(key, 1), p["users"], p["m"])
    x_train, y_train, x_test, y_test = (
        x[:, : p["m"]],
        y[:, : p["m"]],
        x[:, p["m"] :],
        y[:, p["m"] :],
    )
    model = student(p["users"], seed)
    if epsilon is not None:
        config = dp.DPTrainConfig(
            epsilon=epsilon, delta=1e-5, steps=p["steps"], users_per_step=p["batch"],
            clip_norm=1.0, learning_rate=1e-2, user_lr=0.05, train="all",
        )  # fmt: skip
        dp.train_shared_private(
            model, x_train, y_train, config, key=jax.random.fold_in(key, 2)
        )
    local = dp.DPTrainConfig(
        epsilon=math.inf, steps=p["local_steps"], users_per_step=p["users"],
        learning_rate=0.0, user_lr=0.05, train="adapters",
    )  # fmt: skip
    dp.train_shared_private(
        model, x_train, y_train, local, key=jax.random.fold_in(key, 3)
    )
    return test_mse(model, x_test, y_test)


def interval(values):
    values = np.asarray(values, float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None
    half = (
        scipy.stats.t.ppf(0.975, len(values) - 1)
        * values.std(ddof=1)
        / math.sqrt(len(values))
    )
    return mean, float(half)


def run(args) -> dict:
    start = c.setup(args)
    p = dict(QUICK if args.quick else FULL)
    rows = {}
    settings = [("local only", None)] + [(f"eps={e:g}", e) for e in EPSILONS]
    for name, epsilon in c.progress(settings, "settings"):
        mses = [one_run(p, args.seed + s, epsilon) for s in range(p["seeds"])]
        mean, half = interval(mses)
        rows[name] = dict(epsilon=epsilon, test_mse=mses, mean=mean, ci95_half=half)
        print(f"{name:12s} test MSE {mean:.4f}" + (f" +- {half:.4f}" if half else ""))
    record = dict(experiment="nn_dp", params=p, rows=rows)
    record["environment"] = c.environment(args, start)
    c.save_json(args.out, "nn_dp.json", record)
    plot(record, f"{args.out}/nn_dp.png")
    return record


def plot(record, path: str) -> None:
    fig, axes = c.figure(1, 1)
    ax = axes[0][0]
    private = [
        (r["epsilon"], r)
        for r in record["rows"].values()
        if r["epsilon"] not in (None, math.inf)
    ]
    eps = [e for e, _ in private]
    means = [r["mean"] for _, r in private]
    errs = [r["ci95_half"] or 0 for _, r in private]
    ax.errorbar(eps, means, yerr=errs, fmt="o-", label="DP shared training")
    for name, style in (("eps=inf", "--"), ("local only", ":")):
        row = record["rows"][name]
        ax.axhline(row["mean"], ls=style, color="gray", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon (delta = 1e-5, user level)")
    ax.set_ylabel("test MSE")
    ax.legend()
    c.save(fig, path)


def main(argv=None) -> int:
    args = c.parser(__doc__.splitlines()[0], "./lrs-out/nn_dp").parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
