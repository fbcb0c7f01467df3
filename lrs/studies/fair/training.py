"""The protocol's training phases: pretraining, then one method's shared phase
and cold start (and the small pieces the DP part shares with them)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrs.nn.nnx_personalize import adapter_layers
from lrs.studies.fair.method_table import Method, personalize, storage
from lrs.studies.fair.model import Classifier, make_rngs
from lrs.studies.fair.programs import make_pretrain, make_program, sparse_layers, split
from lrs.studies.fair.setup import Setup
from lrs.studies.fair.stats import choose, t_interval


def stack_trees(trees):
    """Stacks pytrees of the same structure along a new leading (seed) axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _pick(tree, *index):
    return jax.tree.map(lambda a: a[index], tree)


def key_for(seed_key, what: str):
    """The key of ``what`` (a name) under one seed's key."""
    return jax.random.fold_in(seed_key, sum(map(ord, what)))


class Clock:
    """Wall and CPU seconds since creation (and the machine's load)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def seconds(self) -> float:
        return time.perf_counter() - self.wall

    def cpu_seconds(self) -> float:
        return time.process_time() - self.cpu


def print_line(line: str) -> None:
    """The default ``log`` of the study's runs: prints and flushes."""
    print(line, flush=True)


def pretrain(setup: Setup, tasks, tokens, labels, seed_keys, cache) -> dict:
    """Global pretraining (one base per seed) and the ``global`` row's accuracies.

    The base is trained on the public pool of each seed's task (labelled by
    the teacher without user effects) and validated on its held-out part;
    ``cache`` keeps the compiled program across teachers.
    """
    n, h, m, v = setup.users, setup.users // 2, setup.samples, setup.eval_samples
    models = [Classifier(setup, rngs=make_rngs(key_for(k, "base"))) for k in seed_keys]
    graphdef = nnx.split(models[0])[0]
    params = stack_trees([nnx.state(mdl) for mdl in models])
    T = setup.seq_len
    cut = setup.public
    pub_x = np.stack([t["public_tokens"] for t in tasks])
    pub_y = np.stack([t["public_labels"] for t in tasks])
    data = (pub_x[:, :cut], pub_y[:, :cut], pub_x[:, cut:], pub_y[:, cut:])
    keys = jnp.stack([key_for(k, "pretrain") for k in seed_keys])
    clock = Clock()
    if "pretrain" not in cache:
        cache["pretrain"] = make_pretrain(graphdef, setup)
    best, val, step = cache["pretrain"](params, keys, data)

    @jax.jit
    def accuracy(p, tok, lab):
        out = jax.vmap(lambda q, x: nnx.merge(graphdef, q)(x))(
            p, tok.reshape(tok.shape[0], -1, T)
        )
        return (out.argmax(-1) == lab.reshape(lab.shape[0], -1)).mean(-1)

    test = slice(m + v, m + 2 * v)
    trained = accuracy(best, tokens[:, :n, test], labels[:, :n, test])
    held = slice(m, m + 2 * v)  # a new user's two held-out halves, as in run_method
    new = accuracy(best, tokens[:, n + h :, held], labels[:, n + h :, held])
    return dict(
        states=[_pick(best, s) for s in range(len(seed_keys))],
        val=np.asarray(val).tolist(),
        step=np.asarray(step).tolist(),
        trained=np.asarray(trained).tolist(),
        new=np.asarray(new).tolist(),
        seconds=clock.seconds(),
    )


def initial_params(setup: Setup, method: Method, bases, seed_keys):
    """Each seed's personalized model from its pretrained base (stacked)."""
    params, graphdef, info = [], None, None
    for base, key in zip(bases, seed_keys):
        model = Classifier(setup, rngs=make_rngs(key_for(key, "base")))
        nnx.update(model, base)
        personalize(model, method, setup.users, key_for(key, method.label))
        graphdef, p = split(model)
        if method.stochastic:
            p["key"] = jax.random.key_data(key_for(key, "dropout " + method.label))
        params.append(p)
        info = info or dict(
            storage(model),
            sparsity={
                path: layer.sparsity for path, layer in sparse_layers(model).items()
            },
        )
    return graphdef, stack_trees(params), info


def _cold_params(graphdef, chosen, setup: Setup, method: Method, seed_keys):
    """Each seed's chosen model with fresh rows for the cold-start users."""
    out = []
    for s, key in enumerate(seed_keys):
        p = _pick(chosen, s)
        model = nnx.merge(graphdef, p["base"], p["shared"], p["rows"], p["frozen"])
        rngs = make_rngs(key_for(key, "cold " + method.label))
        for layer in adapter_layers(model).values():
            for name, rows in layer.new_rows(setup.users, rngs).items():
                getattr(layer, name)[...] = rows
        p = split(model)[1]
        if method.stochastic:
            p["key"] = jax.random.key_data(key_for(key, "cold dropout " + method.label))
        out.append(p)
    return stack_trees(out)


def run_method(setup, method, variant, bases, seed_keys, splits, compiled) -> dict:
    """The shared phase then the cold start of one method, size and variant."""
    clock = Clock()
    graphdef, params, info = initial_params(setup, method, bases, seed_keys)
    grid = jnp.asarray(setup.grid, jnp.float32)
    compile_seconds = 0.0
    if method.label not in compiled:
        program = make_program(graphdef, info["sparsity"], setup, mi_weight=method.mi)
        lowered = program.lower(
            params, grid, jnp.ones(2, jnp.float32), splits["trained"]
        )
        compiled[method.label] = lowered.compile()
        compile_seconds = clock.seconds()
    program = compiled[method.label]
    flags = jnp.asarray([1.0 if variant == "joint" else 0.0, 1.0], jnp.float32)
    acc_a, acc_b, _, best = program(params, grid, flags, splits["trained"])
    val = np.asarray(acc_a).mean(-1)  # (S, L, checks)
    chosen = choose(val, setup.grid, setup.eval_every)
    S = len(seed_keys)
    trained = np.asarray(acc_b).mean(-1)[range(S), chosen["lr_index"], chosen["check"]]
    start = _pick(best, np.arange(S), np.asarray(chosen["lr_index"]))
    cold = _cold_params(graphdef, start, setup, method, seed_keys)
    c_a, c_b = program(cold, grid, jnp.zeros(2, jnp.float32), splits["cold"])[:2]
    h = setup.users // 2
    cal = np.asarray(c_a)[..., :h].mean(-1)  # calibration users' validation
    new = (np.asarray(c_a)[..., h:].mean(-1) + np.asarray(c_b)[..., h:].mean(-1)) / 2
    cold_choice = choose(cal, setup.grid, setup.eval_every)
    new_acc = new[range(S), cold_choice["lr_index"], cold_choice["check"]]
    zero = new[:, 0, 0] if method.zero_shot else None
    return dict(
        method=method.name,
        size=method.size,
        label=method.label,
        options=dict(method.options, **({"mi": method.mi} if method.mi else {})),
        variant=variant,
        **{k: v for k, v in info.items() if k != "sparsity"},
        trained=dict(
            acc=trained.tolist(),
            ci=t_interval(trained),
            val=val[range(S), chosen["lr_index"], chosen["check"]].tolist(),
            **chosen,
        ),
        new=dict(
            acc=new_acc.tolist(),
            ci=t_interval(new_acc),
            val=cal[range(S), cold_choice["lr_index"], cold_choice["check"]].tolist(),
            zero_shot=None
            if zero is None
            else dict(acc=zero.tolist(), ci=t_interval(zero)),
            **cold_choice,
        ),
        budget=dict(
            grid=np.asarray(grid).tolist(),
            steps=setup.steps,
            eval_every=setup.eval_every,
            checks=int(acc_a.shape[2]),
            cold_checks=int(c_a.shape[2]),
            seeds=S,
        ),
        compile_seconds=compile_seconds,
        seconds=clock.seconds(),
    )
