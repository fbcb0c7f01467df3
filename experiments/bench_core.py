"""Benchmark of the core targets: P0 accuracy and time, noise slope, P1 memory.

    python experiments/bench_core.py --out bench-out       # P0 + noise, x64 and f32
    python experiments/bench_core.py --p1 --out bench-out  # + P1 (4 GB, minutes)
    python experiments/bench_core.py --quick --out /tmp/b  # smoke test

Prints one summary line per target and writes ``bench_core.json`` under ``--out``.
Times are wall-clock on whatever machine runs this; the portable figure is the
ratio to one *data pass* (X_i^T (X_i w_i) for all users), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

from lrs._xla import avoid_cpu_deadlock

DEADLOCK_FLAG_SET = avoid_cpu_deadlock()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lrs  # noqa: E402

P0 = dict(d=100, t=1000, m=40, r=5, k=5)
P1 = dict(d=1000, t=20000, m=50, r=10, k=10)
QUICK = dict(d=40, t=200, m=30, r=3, k=3)


def _timed(fn, *args, repeats=5):
    """Median wall time of ``fn(*args)`` after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


@jax.jit
def _data_pass(X, W):
    return jnp.einsum("tmd,tm->td", X, jnp.einsum("tmd,td->tm", X, W))


def data_pass_seconds(data, repeats=7) -> float:
    """Time of one jitted pass computing X_i^T (X_i w_i) for all users."""
    W = jnp.ones((data.num_users, data.dim), data.X.dtype)
    return _timed(_data_pass, data.X, W, repeats=repeats)


def _fit_and_pass_seconds(data, config, rounds=5):
    """Median fit time and median data-pass time, measured interleaved.

    Each round times one fit and three data passes, so a change in machine load
    during the measurement affects both alike; the ratio is the portable figure.
    """
    W = jnp.ones((data.num_users, data.dim), data.X.dtype)
    jax.block_until_ready(lrs.fit(data, config)[0])
    jax.block_until_ready(_data_pass(data.X, W))
    fits, passes = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(lrs.fit(data, config)[0])
        fits.append(time.perf_counter() - start)
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(_data_pass(data.X, W))
            passes.append(time.perf_counter() - start)
    return float(np.median(fits)), float(np.median(passes))


def _first_below(errors, level):
    hits = np.flatnonzero(np.asarray(errors) <= level)
    return int(hits[0]) if hits.size else None


def p0_seed(sizes, seed, dtype, max_iters):
    """Fits one seed; returns iterations to 1e-4/1e-5, time to 1e-4, final error."""
    data, truth = lrs.synthetic.make_problem(jax.random.key(seed), **sizes, dtype=dtype)
    config = lrs.AMHTConfig(rank=sizes["r"], sparsity=sizes["k"], num_iters=max_iters)
    params, diag = lrs.fit(data, config, truth=truth)
    err = diag.relative_error
    it4, it5 = _first_below(err, 1e-4), _first_below(err, 1e-5)
    seconds, unit = None, None
    if it4 is not None:  # time a fit that stops exactly at the iteration reaching 1e-4
        timed = lrs.AMHTConfig(
            rank=sizes["r"], sparsity=sizes["k"], num_iters=it4, tol=0.0
        )
        seconds, unit = _fit_and_pass_seconds(data, timed)
    logs = np.log10(err[(err < 1e-1) & (err > 1e-8)])
    rate = (
        float(10 ** np.polyfit(np.arange(logs.size), logs, 1)[0])
        if logs.size > 2
        else None
    )
    return dict(
        seed=seed,
        iters_to_1e4=it4,
        iters_to_1e5=it5,
        seconds_to_1e4=seconds,
        data_pass_seconds=unit,
        final_error=float(err[-1]),
        iterations=len(err) - 1,
        rate=rate,
        support_recovery=float(lrs.metrics.support_recovery(params, truth)),
    ), data


def run_p0(sizes, seeds, dtype, max_iters):
    rows, pass_times = [], []
    for seed in seeds:
        row, data = p0_seed(sizes, seed, dtype, max_iters)
        unit = row["data_pass_seconds"]
        if unit is not None:
            pass_times.append(unit)
        row["units_to_1e4"] = (
            None if row["seconds_to_1e4"] is None else row["seconds_to_1e4"] / unit
        )
        rows.append(row)
        print(f"  {dtype} seed {seed}: {row}", flush=True)
    target = 1e-5 if dtype == "float64" else 1e-4
    reached = sum(r["final_error"] <= target and r["iterations"] <= 30 for r in rows)
    units = [r["units_to_1e4"] for r in rows if r["units_to_1e4"] is not None]
    return dict(
        dtype=dtype,
        sizes=sizes,
        data_pass_seconds=float(np.median(pass_times)),
        seeds=rows,
        target_error=target,
        seeds_reaching_target=reached,
        num_seeds=len(rows),
        median_units_to_1e4=float(np.median(units)) if units else None,
        max_units_to_1e4=float(np.max(units)) if units else None,
        median_seconds_to_1e4=float(
            np.median([r["seconds_to_1e4"] for r in rows if r["seconds_to_1e4"]])
        )
        if units
        else None,
        median_rate=float(np.median([r["rate"] for r in rows if r["rate"]])),
    )


def run_oracle(sizes, seeds, dtype):
    """Per-user step alone with the true U: fraction of users with exact support."""
    fractions = []
    for seed in seeds:
        data, truth = lrs.synthetic.make_problem(
            jax.random.key(seed), **sizes, dtype=dtype
        )
        config = lrs.AMHTConfig(rank=sizes["r"], sparsity=sizes["k"])
        V, B = lrs.personalize(truth.U, data, config)
        fit = lrs.LRSParams(truth.U, V, B)
        fractions.append(float(lrs.metrics.support_recovery(fit, truth)))
    return dict(dtype=dtype, support_recovery=fractions, minimum=min(fractions))


def run_noise(sizes, sigmas, seed, max_iters):
    errors = []
    for sigma in sigmas:
        data, truth = lrs.synthetic.make_problem(
            jax.random.key(seed), **sizes, noise=sigma, dtype="float64"
        )
        config = lrs.AMHTConfig(
            rank=sizes["r"], sparsity=sizes["k"], num_iters=max_iters
        )
        params, _ = lrs.fit(data, config)
        errors.append(float(lrs.metrics.relative_error(params, truth)))
        print(f"  noise {sigma:g}: relative error {errors[-1]:.3e}", flush=True)
    slope = float(np.polyfit(np.log(sigmas), np.log(errors), 1)[0])
    return dict(sigmas=list(sigmas), errors=errors, slope=slope)


def run_p1(sizes, seed, iters):
    data, truth = lrs.synthetic.make_problem(
        jax.random.key(seed), **sizes, dtype="float32"
    )
    jax.block_until_ready(data)
    data_bytes = data.X.nbytes + data.y.nbytes + data.mask.nbytes
    unit = data_pass_seconds(data, repeats=3)
    config = lrs.AMHTConfig(
        rank=sizes["r"], sparsity=sizes["k"], num_iters=iters, tol=0.0
    )
    start = time.perf_counter()
    params, diag = lrs.fit(data, config, truth=truth)
    total = time.perf_counter() - start
    zero = lrs.AMHTConfig(rank=sizes["r"], sparsity=sizes["k"], num_iters=0)
    start = time.perf_counter()
    lrs.fit(data, zero)
    init_seconds = time.perf_counter() - start  # includes its own compilation
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    per_iter = (total - init_seconds) / iters
    return dict(
        sizes=sizes,
        data_bytes=int(data_bytes),
        peak_rss_bytes=int(peak),
        peak_over_data=peak / data_bytes,
        fit_seconds=total,
        iterations=iters,
        seconds_per_iteration_estimate=per_iter,
        data_pass_seconds=unit,
        units_per_iteration=per_iter / unit,
        relative_error=[float(e) for e in diag.relative_error],
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 seeds")
    parser.add_argument("--p1", action="store_true", help="also run P1 (4 GB of data)")
    parser.add_argument("--p1-only", action="store_true")
    parser.add_argument("--p1-iters", type=int, default=3)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    sizes = QUICK if args.quick else P0
    seeds = range(2 if args.quick else args.seeds)
    out = dict(
        args=vars(args),
        jax=jax.__version__,
        backend=jax.default_backend(),
        machine=platform.machine(),
        cpus=os.cpu_count(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        deadlock_flag=DEADLOCK_FLAG_SET,
    )
    if not args.p1_only:
        for dtype in ("float64", "float32"):
            res = run_p0(sizes, seeds, dtype, 30)
            out[f"p0_{dtype}"] = res
            print(
                f"P0 {dtype}: {res['seeds_reaching_target']}/{res['num_seeds']} seeds "
                f"reach "
                f"{res['target_error']:g} within 30 iterations; time to 1e-4: median "
                f"{res['median_units_to_1e4']:.0f} data-pass units (max "
                f"{res['max_units_to_1e4']:.0f}; target <= 300), "
                f"{res['median_seconds_to_1e4']:.2f} s; data pass "
                f"{1e3 * res['data_pass_seconds']:.2f} ms; "
                f"rate {res['median_rate']:.3f}/iter"
            )
        oracle = run_oracle(sizes, seeds, "float32")
        out["oracle_per_user_step"] = oracle
        print(
            f"per-user step with the true U: exact support for >= "
            f"{100 * oracle['minimum']:.2f}% of users on every seed (target >= 99%)"
        )
        noise = run_noise(sizes, [1e-3, 1e-2, 1e-1], 0, 30)
        out["noise"] = noise
        print(f"noise: error ~ sigma^{noise['slope']:.3f} (target 1 +- 0.1)")
    if args.p1 or args.p1_only:
        p1 = run_p1(QUICK if args.quick else P1, 0, args.p1_iters)
        out["p1"] = p1
        print(
            f"P1: {p1['data_bytes'] / 2**30:.2f} GiB data, peak RSS "
            f"{p1['peak_rss_bytes'] / 2**30:.2f} GiB "
            f"({p1['peak_over_data']:.2f}x data; "
            f"target <= 2x); {p1['seconds_per_iteration_estimate']:.1f} s/iteration "
            f"({p1['units_per_iteration']:.0f} data passes)"
        )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_core.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
