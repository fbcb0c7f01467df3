"""Ragged vs padded users on a MovieLens-1M-size stand-in: peak memory and time.

    python experiments/bench_ragged.py --out results/bench_ragged
    python experiments/bench_ragged.py --users 300 --items 400 --ratings 20000 \\
        --num-iters 2 --out /tmp/bench_ragged          # seconds

A MovieLens-1M-format stand-in (``lrs.datasets.write_standin``; default 6,040
users, 3,706 items, 1,000,000 ratings, heavy-tailed activity) is read by
``lrs.datasets.load_ratings`` and fitted with the same ``AMHTConfig`` in each
mode, each in its own fresh process (peak RSS from ``getrusage``; no
persistent compilation cache, so each compiles what it runs):

- ``padded``: ``load_ratings`` (``t x m_max x d`` arrays) + ``lrs.fit``;
- ``padded_streamed``: the same arrays on the host + ``lrs.fit_streamed``;
- ``ragged``: ``load_ratings(ragged=True)`` (``N x d``) + ``lrs.fit_streamed``,
  users bucketed by count (chunks of ``--chunk-users``, power-of-two widths);
- ``ragged_resident``: the same with ``resident=True`` (the packed chunks
  stay on the device after the first pass).

Prints one JSON line: per mode the load and fit seconds (and the fit's
compilation seconds and the seconds of each iteration: the first one
compiles, the last one is the steady state), the peak RSS (MB) after
loading and after fitting, the largest difference of the fitted weights from
the first mode's, and the ratios first mode / ragged; writes it to
``bench_ragged.json`` under ``--out``. The ratios of one run are measured on
the same machine minutes apart (a shared machine: times vary with its load).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

MODES = ("padded", "padded_streamed", "ragged", "ragged_resident")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def measure(args) -> dict:
    """One mode in this process: ``{load_s, fit_s, peak_mb_*, ...}``; saves
    the fitted weights to ``weights_<mode>.npy`` under ``--out``."""
    import _common as c  # the deadlock work-around, before jax
    import jax
    import numpy as np

    import lrs
    from lrs._xla import CompileTimes

    c.setup(args)
    imported = _peak_mb()
    start = time.perf_counter()
    ragged = args.mode.startswith("ragged")
    tasks = lrs.datasets.load_ratings(
        args.path, embedding_dim=args.embedding_dim, seed=args.seed, ragged=ragged
    )
    train = tasks.train
    if args.mode == "padded_streamed":
        train = lrs.UserData.from_host(*(np.asarray(a) for a in train))
    load_s, loaded = time.perf_counter() - start, _peak_mb()
    config = lrs.AMHTConfig(
        args.rank, args.sparsity, num_iters=args.num_iters, tol=0.0, stall_iters=0
    )
    key = jax.random.key(args.seed)
    compiled = CompileTimes.start().record()["total_s"]
    start = time.perf_counter()
    ends = []  # when each iteration ended

    def callback(i, info):
        ends.append(time.perf_counter())

    if args.mode == "padded":
        params, info = lrs.fit(train, config, key=key, callback=callback)
    else:
        resident = args.mode == "ragged_resident"
        params, info = lrs.fit_streamed(
            train,
            config,
            chunk_users=args.chunk_users,
            key=key,
            callback=callback,
            resident=resident,
        )
    weights = np.asarray(lrs.weights(params))
    fit_s = time.perf_counter() - start
    compile_s = CompileTimes.start().record()["total_s"] - compiled
    iteration_s = np.diff([start] + ends).round(2).tolist()
    np.save(os.path.join(args.out, f"weights_{args.mode}.npy"), weights)
    shape = tuple(getattr(train, "X").shape)
    return dict(
        mode=args.mode,
        train_shape=list(shape),
        train_samples=int(tasks.counts["train"]),
        load_s=round(load_s, 2),
        fit_s=round(fit_s, 2),
        fit_compile_s=round(compile_s, 2),
        iteration_s=iteration_s,
        peak_mb_after_imports=round(imported),
        peak_mb_after_load=round(loaded),
        peak_mb=round(_peak_mb()),
        final_loss=float(np.asarray(info.loss)[-1]),
        iterations=len(info.loss) - 1,
    )


def run(args) -> dict:
    """Writes the stand-in, runs every mode in a child process, compares."""
    import numpy as np

    from lrs.standin import write_standin

    os.makedirs(args.out, exist_ok=True)
    if args.path is None:
        size = dict(users=args.users, items=args.items, ratings=args.ratings)
        folder = os.path.join(args.out, "standin")
        args.path = write_standin(folder, file_format="1m", seed=args.seed, **size)
    rows = []
    env = dict(os.environ, LRS_NO_COMPILATION_CACHE="1")
    for mode in args.modes:
        command = [sys.executable, __file__, "--mode", mode, "--path", args.path]
        command += _passed(args)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"mode {mode} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first = np.load(os.path.join(args.out, f"weights_{args.modes[0]}.npy"))
    for row in rows:
        W = np.load(os.path.join(args.out, f"weights_{row['mode']}.npy"))
        row["max_weight_difference"] = float(np.abs(W - first).max())
    by_mode = {row["mode"]: row for row in rows}
    record = dict(experiment="bench_ragged", path=args.path, modes=by_mode)
    base, record["ratios"] = by_mode[args.modes[0]], {}
    for mode in args.modes[1:]:
        row = by_mode[mode]
        for key in ("peak_mb", "load_s", "fit_s"):
            ratio = base[key] / row[key]
            record["ratios"][f"{key}_{args.modes[0]}_over_{mode}"] = round(ratio, 2)
        last = base["iteration_s"][-1] / row["iteration_s"][-1]
        record["ratios"][f"last_iteration_s_{args.modes[0]}_over_{mode}"] = round(
            last, 2
        )
    record["command"] = " ".join(["python"] + sys.argv)
    with open(os.path.join(args.out, "bench_ragged.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record))
    return record


def _passed(args) -> list[str]:
    out = ["--out", args.out, "--seed", str(args.seed)]
    for name in ("rank", "sparsity", "num_iters", "chunk_users", "embedding_dim"):
        out += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return out + (["--x64"] if args.x64 else [])


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/bench_ragged")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--x64", action="store_true", help="float64 (default float32)")
    p.add_argument("--path", default=None, help="a MovieLens file (default: stand-in)")
    p.add_argument("--users", type=int, default=6040)
    p.add_argument("--items", type=int, default=3706)
    p.add_argument("--ratings", type=int, default=1_000_000)
    p.add_argument("--rank", type=int, default=3)
    p.add_argument("--sparsity", type=int, default=2)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--chunk-users", type=int, default=512)
    p.add_argument("--embedding-dim", type=int, default=8)
    p.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=["padded", "ragged", "ragged_resident"],
    )
    p.add_argument("--mode", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode is not None:  # a child: one mode, one JSON line
        args.cheap_compiles = False
        print(json.dumps(measure(args)))
        return None
    return run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
