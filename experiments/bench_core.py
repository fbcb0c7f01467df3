"""Benchmark of the core targets: P0 accuracy and time, noise slope, P1 memory.

    python experiments/bench_core.py --out bench-out       # P0 + noise, x64 and f32
    python experiments/bench_core.py --p1 --out bench-out  # + P1 (4 GB, minutes)
    python experiments/bench_core.py --quick --out /tmp/b  # smoke test
    python experiments/bench_core.py --parts --out /tmp/b  # where a P0 fit's time goes

Prints one summary line per target and writes ``bench_core.json`` under ``--out``.
Times are wall-clock on whatever machine runs this; the portable figure is the
ratio to one *data pass* (X_i^T (X_i w_i) for all users), measured in the same run.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import platform
import re
import resource
import sys
import tempfile
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


# ------------------------------------------------- where a fit's time goes

# The parts of a fit, each named by functions of lrs that the XLA ops' source
# stacks pass through; an op counts for the first part any of whose functions
# is on its stack (so the rescue's own pursuit counts as rescue).
PARTS = (
    ("per-user: rescue", ("rescue", "_rescue_worst", "rescue_masked", "l1_support")),
    ("diagnostics vs truth", ("_with_truth",)),
    ("shared: right-hand side, A(U)", ("_rhs", "rhs_and_product")),
    ("shared: CG products", ("normal_operator", "_dense_normal_matrix")),
    ("shared: CG, QR, rest", ("_shared_update", "update_U")),
    ("init: moment matrix, SVD", ("initial_U", "moment_init")),
    ("init: cold supports", ("cold_supports",)),
    ("per-user: pursuit steps", ("_pursuit_step", "pursuit_step")),
    ("per-user: refit on the warm support", ("_pursue", "pursue")),
    ("per-user: X_i U and the rest", ("per_user_step", "fit_users", "pursue_chunk")),
    ("loop, state, U change", ("_state", "_iterate", "iterate")),
)
UNATTRIBUTED = "ops without a source stack (made by XLA: mostly CG products)"
EXECUTOR = "XLA runtime: dispatch of ops, thread pool"


def _hlo_stacks(text: str) -> dict:
    """``{instruction name: [function names, innermost first]}`` from a
    compiled module's text (its FileNames / FunctionNames / FileLocations /
    StackFrames tables)."""

    def table(name):
        start = text.find("\n" + name + "\n")
        rows = {}
        if start < 0:
            return rows
        for line in text[start + len(name) + 2 :].splitlines():
            row = re.match(r"^(\d+) (.*)$", line)
            if not row:
                break
            rows[int(row.group(1))] = row.group(2)
        return rows

    functions = {k: v.strip('"') for k, v in table("FunctionNames").items()}
    locations = {
        k: int(re.search(r"function_name_id=(\d+)", v).group(1))
        for k, v in table("FileLocations").items()
    }
    frames = {
        k: (
            int(re.search(r"file_location_id=(\d+)", v).group(1)),
            int(re.search(r"parent_frame_id=(\d+)", v).group(1)) - 1,
        )
        for k, v in table("StackFrames").items()
    }

    def stack(frame):
        names = []
        while frame > 0 and len(names) < 100:
            location, frame = frames[frame]
            names.append(functions[locations[location]])
        return names

    stacks = {}
    for line in text.splitlines():
        inst = re.match(r"^\s*(?:ROOT )?%(\S+) = .*?stack_frame_id=(\d+)", line)
        if inst:
            stacks[inst.group(1)] = stack(int(inst.group(2)))
    return stacks


def _part(stack) -> str:
    if not stack:
        return UNATTRIBUTED
    for label, names in PARTS:
        if any(f == n or f.startswith(n + ".") for f in stack for n in names):
            return label
    return "other"


def _self_times(path: str, window: str) -> collections.Counter:
    """Milliseconds of XLA op self time (nested ops excluded) by op name,
    over the ops that start inside a ``jax.profiler.TraceAnnotation(window)``."""
    profile = jax.profiler.ProfileData.from_file(path)
    spans = [
        (e.start_ns, e.end_ns)
        for plane in profile.planes
        for line in plane.lines
        for e in line.events
        if e.name == window
    ]
    out = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:
                continue
            events = sorted(line.events, key=lambda e: (e.start_ns, -e.duration_ns))
            open_, own = [], {}
            for i, event in enumerate(events):
                while open_ and events[open_[-1]].end_ns <= event.start_ns:
                    open_.pop()
                if open_:
                    parent = open_[-1]
                    own[parent] = own.get(parent, events[parent].duration_ns)
                    own[parent] -= event.duration_ns
                own.setdefault(i, event.duration_ns)
                open_.append(i)
            for i, event in enumerate(events):
                if any(a <= event.start_ns < b for a, b in spans):
                    out[event.name] += own[i] / 1e6
    return out


def fit_parts(sizes, seed, dtype, rounds=3):
    """Data-pass units of each part of a fit to the iteration reaching 1e-4.

    Traces ``rounds`` fits and ``3 rounds`` data passes with the JAX profiler
    and attributes each XLA op's self time to a part of the algorithm by the
    functions on its source stack (``PARTS``). Op times add up to about the
    wall time on 2 cores; the split is the figure, not the sum.
    """
    data, truth = lrs.synthetic.make_problem(jax.random.key(seed), **sizes, dtype=dtype)
    r, k = sizes["r"], sizes["k"]
    _, diag = lrs.fit(data, lrs.AMHTConfig(rank=r, sparsity=k), truth=truth)
    iters = _first_below(diag.relative_error, 1e-4) or len(diag.relative_error) - 1
    config = lrs.AMHTConfig(rank=r, sparsity=k, num_iters=iters, tol=0.0)
    key = jax.random.key(0)
    program = jax.jit(lrs.amht._fit_program, static_argnames=("config",))
    text = program.lower(data, config, key).compile()
    stacks = _hlo_stacks(text.as_text())
    W = jnp.ones((data.num_users, data.dim), data.X.dtype)
    jax.block_until_ready(lrs.fit(data, config)[0])
    jax.block_until_ready(_data_pass(data.X, W))
    with tempfile.TemporaryDirectory() as tmp:
        walls, passes = [], []
        with jax.profiler.trace(tmp):
            for _ in range(rounds):
                start = time.perf_counter()
                with jax.profiler.TraceAnnotation("bench_core.fit"):
                    jax.block_until_ready(lrs.fit(data, config)[0])
                walls.append(time.perf_counter() - start)
                for _ in range(3):
                    start = time.perf_counter()
                    jax.block_until_ready(_data_pass(data.X, W))
                    passes.append(time.perf_counter() - start)
        path = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)[0]
        times = _self_times(path, "bench_core.fit")
    unit_ms = 1e3 * float(np.median(passes))
    parts = collections.Counter()
    for name, ms in times.items():
        runtime = name.startswith(("ThunkExecutor", "ThreadpoolListener", "Slinky"))
        parts[EXECUTOR if runtime else _part(stacks.get(name))] += ms
    units = {p: ms / rounds / unit_ms for p, ms in parts.most_common()}
    return dict(
        dtype=dtype,
        seed=seed,
        iterations=iters,
        data_pass_ms=unit_ms,
        fit_units_wall=1e3 * float(np.median(walls)) / unit_ms,
        op_units_by_part=units,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 seeds")
    parser.add_argument("--p1", action="store_true", help="also run P1 (4 GB of data)")
    parser.add_argument("--p1-only", action="store_true")
    parser.add_argument("--p1-iters", type=int, default=3)
    parser.add_argument(
        "--parts", action="store_true", help="only: where a P0 fit's time goes"
    )
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
    if args.parts:
        for dtype in ("float64", "float32"):
            res = fit_parts(sizes, 0, dtype)
            out[f"parts_{dtype}"] = res
            print(
                f"{sizes} {dtype}, seed 0, {res['iterations']} iterations: fit "
                f"{res['fit_units_wall']:.0f} units (data pass "
                f"{res['data_pass_ms']:.2f} ms); XLA op time by part, units:"
            )
            for part, units in res["op_units_by_part"].items():
                print(f"  {units:6.1f}  {part}")
    elif not args.p1_only:
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
