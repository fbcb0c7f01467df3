"""Benchmark of the Flax NNX adapters (issue 17): forward, training step, storage.

    python experiments/bench_nnx.py --quick          # 10-20 minutes on 2 shared cores
    python experiments/bench_nnx.py --out lrs-out/nnx

Forward: a mixed-user batch (ids drawn from 1,000 users) through the small
NNX GPT (``lrs.nn.nnx_model.GPTConfig()``: d=64, 2 blocks, T=16) with every
block's q, v, up and down maps personalized, for every method of
``lrs.nn.personalize``: the base model, LRS (rank r, k sparse entries, never a
per-user kernel), LRS with the per-row kernels materialized
(``LRSLinear.materialize``), per-user LoRA (rank 1, the smallest LoRA), the
per-user head (a dense per-user kernel delta on the same layers: the storage
worst case), PLoRA's user-conditioned LoRA (shared rank 4, 8 floats per
user and layer), and, on the token embedding instead of the Linear maps, a
soft prompt per user (``method="prompt"``) and a user token
(``method="user_token"``), both sized to LRS's bytes per user unless
``--prompt-length`` / ``--token-dim`` say otherwise (a prompt of ``p``
positions holds ``p * d`` floats, a user token ``e``). For each batch size:
the median wall time of the jitted forward over ``reps`` rounds (the methods
interleaved round by round, so a change of the machine's load hits all
alike) and the compiled program's temporary bytes (``memory_analysis()``).

Training: time of one training step (``lrs.nn.nnx_train``, batch 32, shared
adapters and rows trained, q and v personalized, or the token embedding for
the prompt methods, sized to LRS's bytes per user on q and v; median of 11
rounds, the configurations interleaved round by round, after one uncounted
warm-up round) against the number of users, per method, with the compiled
step's temporary and aliased (updated in place) bytes; a method whose tables
would pass ``--table-budget`` bytes is skipped (the per-user head beyond a
few thousand users).

Storage: bytes per user and shared bytes (U counted: r copies of each
personalized kernel) of every method on the forward's layers.

Cold start: an MLP personalized at its last layer (32 -> 16 -> 1, r = 2,
k = 2), teacher = base + a planted LRS change for 4 new users with ``m``
samples each: :func:`lrs.nn.cold_start_exact` against 300 full-batch steps of
the gradient cold start (``StepConfig(train="users")``), train and held-out
mean squared error.

Training cost (``train_cost``): LRS's step re-selecting its supports every
step, every ``--reselect-every`` steps (``StepConfig.reselect_every``) or
never, against per-user LoRA, 1,000 users, batch 32: seconds per step
amortized over blocks of ``--reselect-every`` consecutive steps, medians of
``--cost-rounds`` interleaved rounds. ``--train-cost-only`` runs only this::

    python experiments/bench_nnx.py --train-cost-only --out lrs-out/nnx-cost

Writes ``bench_nnx.json`` and ``bench_nnx.png`` under ``--out`` and prints
one summary line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

from lrs._xla import avoid_cpu_deadlock

DEADLOCK_FLAG_SET = avoid_cpu_deadlock()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lrs.nn import cold_start, layers, nnx_model, nnx_train, store  # noqa: E402

TARGETS = r".*attn/(q|v)|.*mlp/(up|down)"
TRAIN_TARGETS = r".*attn/(q|v)"
EMBED_TARGETS = "embed"  # the soft prompt and the user token wrap the token Embed
EMBED = ("prompt", "user_token")
FORWARD = ("base", "lrs", "lrs_materialized", "lora", "head", "user_lora", *EMBED)
TRAIN = ("lrs", "lora", "user_lora", "head", *EMBED)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sweeps, ~2 minutes")
    p.add_argument("--out", default="./lrs-out/nnx", help="output folder")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--sparsity", type=int, default=16)
    p.add_argument("--lora-rank", type=int, default=1)
    p.add_argument("--plora-rank", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=8)
    p.add_argument(
        "--prompt-length",
        type=int,
        default=None,
        help="soft prompt positions (default: LRS's bytes per user)",
    )
    p.add_argument(
        "--token-dim",
        type=int,
        default=None,
        help="user token floats (default: LRS's bytes per user)",
    )
    p.add_argument(
        "--table-budget",
        type=float,
        default=2e9,
        help="skip a training run whose user tables pass this many bytes",
    )
    p.add_argument("--batches", type=int, nargs="*", help="override the batch sizes")
    p.add_argument("--users", type=int, nargs="*", help="override the user counts")
    p.add_argument(
        "--reselect-every",
        type=int,
        default=8,
        help="train cost: LRS re-selects its supports every N steps",
    )
    p.add_argument(
        "--cost-rounds",
        type=int,
        default=9,
        help="train cost: interleaved rounds (median)",
    )
    p.add_argument(
        "--train-cost-only",
        action="store_true",
        help="run only the train-cost comparison",
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p  # fmt: skip


def _lrs_bytes(args, config, targets) -> int:
    """LRS's bytes per user on ``targets``: what the prompt methods are sized to."""
    model = nnx_model.GPT(config, rngs=nnx.Rngs(0))
    layers.personalize(model, targets, num_users=1, rngs=nnx.Rngs(1),
                       rank=args.rank, sparsity=args.sparsity)  # fmt: skip
    return storage(model)["bytes_per_user"]


def _options(args, config, method, targets) -> dict:
    """``personalize`` 's options; a soft prompt of ``p`` positions holds ``p *
    d`` floats per user, a user token ``e``: unless given, both are sized to
    LRS's bytes per user on ``targets`` (the nearest whole prompt length)."""
    if method in EMBED:
        itemsize = jnp.dtype(jnp.float32).itemsize
        floats = _lrs_bytes(args, config, targets) // itemsize
        if method == "prompt":
            length = args.prompt_length or max(1, round(floats / config.d_model))
            return dict(length=length)
        return dict(embed_dim=args.token_dim or floats)
    return {
        "lrs": dict(rank=args.rank, sparsity=args.sparsity),
        "lrs_materialized": dict(rank=args.rank, sparsity=args.sparsity),
        "lora": dict(rank=args.lora_rank),
        "head": {},
        "user_lora": dict(rank=args.plora_rank, embed_dim=args.embed_dim),
    }[method]


def _model(args, config, method, num_users, targets=TARGETS):
    model = nnx_model.GPT(config, rngs=nnx.Rngs(0))
    if method != "base":
        layers.personalize(
            model, EMBED_TARGETS if method in EMBED else targets,
            num_users=num_users, rngs=nnx.Rngs(1),
            method=method.removesuffix("_materialized"),
            **_options(args, config, method, targets),
        )  # fmt: skip
    for layer in layers.adapter_layers(model).values():
        layer.materialize = method == "lrs_materialized"
    return model


def _forward(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, ids):
        return layers.apply(nnx.merge(graphdef, state), tokens, ids)

    return run, state


def _median_times(fns: dict, reps) -> dict:
    """Median seconds of each ``fn`` over ``reps`` interleaved rounds: round
    after round calls every fn once, so a change of the machine's load hits
    all alike (the first round, which compiles, is not counted)."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile / warm up
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def _nbytes(variables, per_row=False) -> int:
    leaves = jax.tree.leaves(variables)
    if per_row:
        return sum(int(np.prod(v.shape[1:])) * v.dtype.itemsize for v in leaves)
    return sum(int(v.size) * v.dtype.itemsize for v in leaves)


def storage(model) -> dict:
    """Bytes per user, shared adapter bytes (U counted) and base bytes."""
    return dict(
        bytes_per_user=_nbytes(nnx.state(model, layers.UserTable), per_row=True),
        shared_adapter_bytes=_nbytes(nnx.state(model, layers.SharedParam)),
        base_bytes=_nbytes(
            nnx.state(model, nnx.All(nnx.Param, nnx.Not(layers.SharedParam)))
        ),
    )


def forward_sweep(args, config, batches, reps, num_users=1000) -> dict:
    key = jax.random.key(args.seed)
    runs, out = {}, {}
    for m in FORWARD:
        model = _model(args, config, m, num_users)
        runs[m], out[m] = _forward(model), dict(rows=[], **storage(model))
    for b in batches:
        k1, k2 = jax.random.split(jax.random.fold_in(key, b))
        tokens = jax.random.randint(k1, (b, config.seq_len), 0, config.vocab)
        ids = jax.random.randint(k2, (b,), 0, num_users)
        fns = {m: functools.partial(run, state, tokens, ids)
               for m, (run, state) in runs.items()}  # fmt: skip
        seconds = _median_times(fns, reps)
        for m, (run, state) in runs.items():
            temp = run.lower(state, tokens, ids).compile().memory_analysis()
            row = dict(batch=b, seconds=seconds[m], temp_bytes=temp.temp_size_in_bytes)
            out[m]["rows"].append(row)
    return out


def _train_step(args, config, method, n, batch, **step_options):
    """A compiled training step of ``method`` for ``n`` users and its inputs."""
    step_config = nnx_train.StepConfig(train="adapters", **step_options)
    model = _model(args, config, method, n, TRAIN_TARGETS)
    graphdef, state, opt = nnx_train.init(model, step_config)
    step = nnx_train.make_step(graphdef, step_config, opt)
    key = jax.random.fold_in(jax.random.key(args.seed), n)
    tokens = jax.random.randint(key, (batch, config.seq_len), 0, config.vocab)
    ids = jax.random.randint(key, (batch,), 0, n)
    memory = step.lower(state, tokens, tokens, ids).compile().memory_analysis()
    state, loss = step(state, tokens, tokens, ids)  # compile
    jax.block_until_ready(loss)
    # temporary bytes do not grow with the users, and the donated tables are
    # updated in place (aliased: no copy of a table per step)
    compiled = dict(temp_bytes=memory.temp_size_in_bytes,
                    alias_bytes=memory.alias_size_in_bytes)  # fmt: skip
    return [step, state, tokens, ids], compiled


def train_sweep(args, config, user_counts, batch=32, steps=11) -> list:
    """Median step time per (method, users) over ``steps`` interleaved rounds
    (after one uncounted warm-up round)."""
    rows, live = [], {}
    for method in TRAIN:
        per_user = storage(_model(args, config, method, 1, TRAIN_TARGETS))
        for n in user_counts:
            table_bytes = per_user["bytes_per_user"] * n
            rows.append(dict(method=method, num_users=n, batch=batch,
                             table_bytes=table_bytes, seconds=None))  # fmt: skip
            if table_bytes > args.table_budget:
                rows[-1]["skipped"] = "tables over --table-budget"
            else:
                run, compiled = _train_step(args, config, method, n, batch)
                live[len(rows) - 1] = run
                rows[-1].update(compiled)
    times = {i: [] for i in live}
    for round_ in range(steps + 1):
        for i, run in live.items():
            step, state, tokens, ids = run
            start = time.perf_counter()
            run[1], loss = step(state, tokens, tokens, ids)
            jax.block_until_ready(loss)
            if round_:
                times[i].append(time.perf_counter() - start)
    for i, t in times.items():
        rows[i]["seconds"] = float(np.median(t))
    return rows


def train_cost(args, config, n=1000, batch=32) -> dict:
    """LRS's training step, re-selecting every step, every ``N`` steps
    (``--reselect-every``) or never, against per-user LoRA: seconds per step,
    amortized over blocks of ``N`` consecutive steps of each configuration
    (each block holds exactly one re-selecting step), median over
    ``--cost-rounds`` interleaved rounds after one uncounted warm-up round."""
    every = args.reselect_every
    configs = {
        "lrs_every_1": ("lrs", dict(reselect_every=1)),
        f"lrs_every_{every}": ("lrs", dict(reselect_every=every)),
        "lrs_fixed_support": ("lrs", dict(reselect=False)),
        "lora": ("lora", {}),
    }
    runs, rows = {}, {}
    for name, (method, options) in configs.items():
        runs[name], rows[name] = _train_step(args, config, method, n, batch, **options)
    times = {name: [] for name in runs}
    for round_ in range(args.cost_rounds + 1):
        for name, run in runs.items():
            step, _, tokens, ids = run
            start = time.perf_counter()
            for _ in range(every):
                run[1], loss = step(run[1], tokens, tokens, ids)
            jax.block_until_ready(loss)
            if round_:
                times[name].append((time.perf_counter() - start) / every)
    for name, t in times.items():
        rows[name].update(seconds_per_step=float(np.median(t)), rounds=t)
    lora, paired = rows["lora"]["seconds_per_step"], np.asarray(times["lora"])
    return dict(
        num_users=n, batch=batch, reselect_every=every, steps_per_block=every,
        configs=rows,
        over_lora={m: r["seconds_per_step"] / lora for m, r in rows.items()},
        # the median of each round's ratio: robust to load that shifts rounds
        over_lora_paired={m: float(np.median(np.asarray(t) / paired))
                          for m, t in times.items()},
    )  # fmt: skip


def _planted_mlp(seed, m, t=4, d_in=32, hidden=16, rank=2, k=2):
    """Student (new users at zero), teacher rows, train and held-out data."""
    mlp = nnx_model.MLP([d_in, hidden, 1], rngs=nnx.Rngs(seed))
    layers.personalize(mlp, "layers/1", rank=rank, sparsity=k, num_users=1,
                       rngs=nnx.Rngs(seed + 1))  # fmt: skip
    new = np.asarray(store.add_users(mlp, t))
    teacher = nnx.clone(mlp)
    layer, rng = teacher.layers[1], np.random.default_rng(seed)
    planted = dict(
        V=rng.normal(size=(t, rank)),
        indices=np.stack([rng.choice(hidden, k, replace=False) for _ in range(t)]),
        values=rng.normal(size=(t, k)),
    )
    for name, rows in planted.items():
        table = getattr(layer, name)
        table[...] = table[...].at[new].set(rows.astype(table.dtype))
    graphdef, state = nnx.split(teacher)
    forward = jax.jit(lambda s, x, i: layers.apply(nnx.merge(graphdef, s), x, i))

    def samples(count, salt):
        key = jax.random.fold_in(jax.random.key(seed), salt)
        x = jax.random.normal(key, (t * count, d_in), jnp.float32)
        ids = jnp.repeat(jnp.asarray(new), count)
        return x, forward(state, x, ids), ids

    return mlp, samples(m, 1), samples(200, 2)


def _mse(outputs, targets):
    return jnp.mean((outputs - targets) ** 2)


def cold_start_sweep(args, samples, steps=300, lr=0.3) -> list:
    rows = []
    for m in samples:
        mlp, train, test = _planted_mlp(args.seed, m)
        exact_s = []
        for _ in range(2):  # the first call compiles the solver for these shapes
            exact = nnx.clone(mlp)
            start = time.perf_counter()
            cold_start.cold_start_exact(exact, "layers/1", *train)
            exact_s.append(time.perf_counter() - start)
        grad = nnx.clone(mlp)
        nnx.update(grad, jax.tree.map(jnp.copy, nnx.state(grad)))
        config = nnx_train.StepConfig(train="users", user_lr=lr)
        graphdef, state, opt = nnx_train.init(grad, config)
        step = nnx_train.make_step(graphdef, config, opt, loss_fn=_mse)
        start = time.perf_counter()
        for _ in range(steps):
            state, loss = step(state, *train[:2], train[2])
        jax.block_until_ready(loss)
        grad_s = time.perf_counter() - start  # the first step compiles
        nnx_train.update_model(grad, state)
        row = dict(m=m, exact_seconds_first=exact_s[0], exact_seconds=exact_s[1],
                   gradient_seconds=grad_s, gradient_steps=steps,
                   gradient_lr=lr)  # fmt: skip
        for name, model in (("base", mlp), ("exact", exact), ("gradient", grad)):
            row[f"{name}_train_mse"] = float(nnx_train.evaluate(model, *train, _mse))
            row[f"{name}_test_mse"] = float(nnx_train.evaluate(model, *test, _mse))
        rows.append(row)
    return rows


def run(args) -> dict:
    config = nnx_model.GPTConfig()
    if args.train_cost_only:
        start = time.perf_counter()
        cost = train_cost(args, config)
        seconds = time.perf_counter() - start
        return dict(args=vars(args), train_cost=cost, platform=_platform(),
                    seconds=seconds)  # fmt: skip
    batches = args.batches or ((1, 8, 64) if args.quick else (1, 4, 16, 64, 256, 1024))
    users = args.users or (
        (1_000, 100_000) if args.quick else (1_000, 100_000, 1_000_000)
    )
    start = time.perf_counter()
    forward = forward_sweep(args, config, batches, reps=5 if args.quick else 11)
    train = train_sweep(args, config, users)
    cold = cold_start_sweep(args, (8, 12, 16))
    cost = train_cost(args, config)
    return dict(
        args=vars(args),
        model=vars(config) | dict(targets=TARGETS, train_targets=TRAIN_TARGETS),
        forward=forward,
        train=train,
        cold_start=cold,
        train_cost=cost,
        summary=summarize(forward, train) | {"train_cost_over_lora": cost["over_lora"]},
        platform=_platform(),
        seconds=time.perf_counter() - start,
    )  # fmt: skip


def _platform() -> dict:
    return dict(backend=jax.default_backend(), machine=platform.machine(),
                jax=jax.__version__, deadlock_flag_set=DEADLOCK_FLAG_SET)  # fmt: skip


def summarize(forward, train) -> dict:
    """LRS's forward time over each method's at the largest batch, and how flat
    each method's step time is over the user counts."""
    largest = forward["base"]["rows"][-1]["batch"]

    def at(method, field="seconds"):
        return next(r[field] for r in forward[method]["rows"] if r["batch"] == largest)

    flat = {}
    for method in TRAIN:
        times = [r["seconds"] for r in train if r["method"] == method and r["seconds"]]
        if len(times) > 1:
            flat[method] = max(times) / min(times)
    by_batch = {
        m: {r["batch"]: a["seconds"] / r["seconds"]
            for a, r in zip(forward["lrs"]["rows"], forward[m]["rows"])}
        for m in ("base", "lora")
    }  # fmt: skip
    return dict(
        batch=largest,
        lrs_over={m: at("lrs") / at(m) for m in forward if m != "lrs"},
        lrs_over_by_batch=by_batch,
        temp_bytes={m: at(m, "temp_bytes") for m in forward},
        train_slowest_over_fastest=flat,
    )


def plot(result, path) -> None:
    """Forward time and temporary memory vs batch; step time vs users."""
    from lrs.studies import plotting

    fig, axes = plotting.figure(3)
    ax_time, ax_mem, ax_train = axes[0]
    for i, (method, entry) in enumerate(result["forward"].items()):
        batch = [r["batch"] for r in entry["rows"]]
        style = dict(marker="o", color=f"C{i}", label=method)
        ax_time.loglog(batch, [r["seconds"] * 1e3 for r in entry["rows"]], **style)
        mem = [max(r["temp_bytes"], 1) / 2**20 for r in entry["rows"]]
        ax_mem.loglog(batch, mem, **style)
    for i, method in enumerate(TRAIN):
        rows = [r for r in result["train"] if r["method"] == method and r["seconds"]]
        color = f"C{FORWARD.index(method)}"
        if rows:
            ax_train.semilogx([r["num_users"] for r in rows],
                              [r["seconds"] * 1e3 for r in rows], marker="o",
                              color=color, label=method)  # fmt: skip
    ax_time.set(xlabel="batch", ylabel="forward ms", title="forward time (GPT)")
    ax_mem.set(xlabel="batch", ylabel="temporary MiB", title="compiled temp memory")
    ax_train.set(xlabel="users", ylabel="step ms", title="training step (batch 32)")
    ax_train.set_ylim(bottom=0)
    for ax in (ax_time, ax_mem, ax_train):
        ax.legend(fontsize=7)
    plotting.save(fig, path)


def _cost_line(cost) -> str:
    ms = ", ".join(f"{m} {r['seconds_per_step'] * 1e3:.1f}"
                   for m, r in cost["configs"].items())  # fmt: skip
    over = ", ".join(f"{m} {v:.2f}" for m, v in cost["over_lora"].items())
    size = f"{cost['num_users']} users, batch {cost['batch']}"
    return f"train step ms ({size}): {ms}; over LoRA: {over}"


def _line(result, path) -> str:
    if "summary" not in result:
        return f"bench_nnx: {_cost_line(result['train_cost'])}; wrote {path}"
    s = result["summary"]
    ratios = ", ".join(f"{m} {v:.2f}" for m, v in s["lrs_over"].items())
    flat = ", ".join(f"{m} {v:.2f}" for m, v in s["train_slowest_over_fastest"].items())
    cold = "; ".join(
        f"m={r['m']}: exact {r['exact_test_mse']:.2g} vs gradient "
        f"{r['gradient_test_mse']:.2g}"
        for r in result["cold_start"]
    )
    return (
        f"bench_nnx: batch {s['batch']}: LRS time over {ratios}; train step "
        f"slowest / fastest over users: {flat}; cold start held-out mse {cold}; "
        f"{_cost_line(result['train_cost'])}; wrote {path}"
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_nnx.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    if not args.no_plot and not args.train_cost_only:
        plot(result, os.path.join(args.out, "bench_nnx.png"))
    print(json.dumps(result.get("summary", result["train_cost"]["over_lora"])))
    print(_line(result, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
