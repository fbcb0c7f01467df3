"""Benchmark of the Flax NNX adapters (issue 17): forward and training step.

    python experiments/bench_nnx.py --quick          # under a minute on 2 cores
    python experiments/bench_nnx.py --out lrs-out/nnx

Forward: a mixed-user batch (ids drawn from 1,000 users) through the small
NNX GPT (``lrs.nn.nnx_model.GPTConfig()``: d=64, 2 blocks, T=16) with every
block's q, v, up and down maps personalized, for four variants: the base model,
LRS (rank r, k sparse entries, never a per-user kernel), LRS with the
per-row kernels materialized (``LRSLinear.materialize``), and per-user LoRA
(rank 1, the smallest LoRA; its bytes per user are reported next to LRS's).
For each batch size: best-of-``reps`` wall time of the jitted forward and
the compiled program's temporary bytes (``memory_analysis()``).

Training: time of one LRS training step (``lrs.nn.nnx_train``, batch 32,
shared adapters and rows trained) against the number of users; the step
donates its state so the tables are updated in place.

Writes ``bench_nnx.json`` under ``--out`` and prints one summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from lrs._xla import avoid_cpu_deadlock

DEADLOCK_FLAG_SET = avoid_cpu_deadlock()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lrs.nn import layers, nnx_model, nnx_train  # noqa: E402

TARGETS = r".*attn/(q|v)|.*mlp/(up|down)"
TRAIN_TARGETS = r".*attn/(q|v)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sweeps, < 1 minute")
    p.add_argument("--out", default="./lrs-out/nnx", help="output folder")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--sparsity", type=int, default=16)
    p.add_argument("--lora-rank", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p


def _model(config, method, rank, sparsity, num_users, targets=TARGETS):
    model = nnx_model.GPT(config, rngs=nnx.Rngs(0))
    if method != "base":
        kw = dict(sparsity=sparsity) if method.startswith("lrs") else {}
        name = "lrs" if method.startswith("lrs") else "lora"
        layers.personalize(
            model, targets, rank=rank, num_users=num_users, rngs=nnx.Rngs(1),
            method=name, **kw,
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


def _best_time(fn, reps) -> float:
    jax.block_until_ready(fn())  # compile / warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def bytes_per_user(model) -> int:
    return sum(
        int(np.prod(v.shape[1:])) * v.dtype.itemsize
        for v in jax.tree.leaves(nnx.state(model, layers.UserTable))
    )


def shared_bytes(model) -> int:
    return sum(v.nbytes for v in jax.tree.leaves(nnx.state(model, layers.SharedParam)))


def forward_sweep(args, config, batches, reps, num_users=1000) -> dict:
    key = jax.random.key(args.seed)
    out = {}
    for method in ("base", "lrs", "lrs_materialized", "lora"):
        rank = args.lora_rank if method == "lora" else args.rank
        model = _model(config, method, rank, args.sparsity, num_users)
        run, state = _forward(model)
        rows = []
        for b in batches:
            k1, k2 = jax.random.split(jax.random.fold_in(key, b))
            tokens = jax.random.randint(k1, (b, config.seq_len), 0, config.vocab)
            ids = jax.random.randint(k2, (b,), 0, num_users)
            temp = run.lower(state, tokens, ids).compile().memory_analysis()
            seconds = _best_time(lambda: run(state, tokens, ids), reps)
            rows.append(dict(batch=b, seconds=seconds,
                             temp_bytes=int(temp.temp_size_in_bytes)))  # fmt: skip
        out[method] = dict(
            rows=rows,
            bytes_per_user=bytes_per_user(model),
            shared_adapter_bytes=shared_bytes(model),
        )
    return out


def train_sweep(args, config, user_counts, batch=32, steps=5) -> list:
    rows = []
    step_config = nnx_train.StepConfig(train="adapters")
    for n in user_counts:
        model = _model(config, "lrs", args.rank, args.sparsity, n, TRAIN_TARGETS)
        graphdef, state, opt = nnx_train.init(model, step_config)
        del model
        step = nnx_train.make_step(graphdef, step_config, opt)
        key = jax.random.fold_in(jax.random.key(args.seed), n)
        tokens = jax.random.randint(key, (batch, config.seq_len), 0, config.vocab)
        ids = jax.random.randint(key, (batch,), 0, n)
        state, loss = step(state, tokens, tokens, ids)  # compile
        jax.block_until_ready(loss)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, loss = step(state, tokens, tokens, ids)
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - start)
        rows.append(dict(num_users=n, batch=batch, seconds=float(np.median(times))))
        del state
    return rows


def run(args) -> dict:
    config = nnx_model.GPTConfig()
    batches = (1, 8, 64) if args.quick else (1, 4, 16, 64, 256, 1024)
    users = (1_000, 100_000) if args.quick else (1_000, 100_000, 1_000_000)
    start = time.perf_counter()
    forward = forward_sweep(args, config, batches, reps=3 if args.quick else 10)
    train = train_sweep(args, config, users)
    largest = batches[-1]

    def at(method, field="seconds"):
        return next(r[field] for r in forward[method]["rows"] if r["batch"] == largest)

    summary = dict(
        batch=largest,
        lrs_over_base=at("lrs") / at("base"),
        lrs_over_lora=at("lrs") / at("lora"),
        lrs_over_materialized=at("lrs") / at("lrs_materialized"),
        temp_bytes={m: at(m, "temp_bytes") for m in forward},
        train_slowest_over_fastest=max(r["seconds"] for r in train)
        / min(r["seconds"] for r in train),
    )
    return dict(
        args=vars(args),
        model=vars(config) | dict(targets=TARGETS, train_targets=TRAIN_TARGETS),
        forward=forward,
        train=train,
        summary=summary,
        platform=dict(backend=jax.default_backend(), machine=platform.machine(),
                      jax=jax.__version__, deadlock_flag_set=DEADLOCK_FLAG_SET),
        seconds=time.perf_counter() - start,
    )  # fmt: skip


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_nnx.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    s = result["summary"]
    print(json.dumps(result))
    print(
        f"bench_nnx: batch {s['batch']}: LRS / base {s['lrs_over_base']:.2f}, "
        f"LRS / LoRA {s['lrs_over_lora']:.2f}, LRS / materialized "
        f"{s['lrs_over_materialized']:.2f}; train step slowest / fastest over "
        f"{[r['num_users'] for r in result['train']]} users "
        f"{s['train_slowest_over_fastest']:.2f}; wrote {path}",
        file=sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
