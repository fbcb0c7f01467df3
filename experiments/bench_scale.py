"""Benchmark of how the fit scales: time per iteration against t and d.

    python experiments/bench_scale.py --out bench-scale          # CPU sweeps
    python experiments/bench_scale.py --stream-cpu-only --out s  # streamed vs in-memory
    python experiments/bench_scale.py --quick --out /tmp/s       # smoke test
    python experiments/bench_scale.py --private-only --out p     # private fit sweeps
    python experiments/bench_scale.py --gpu --out bench-gpu      # on a GPU: P2,
        # bandwidth of the data passes, and the largest streamed t

CPU: time per iteration and data-pass units for t in {1e3, 1e4, 1e5} at d=100,
m=40, r=5, k=5 and for d in {100, 300, 1000} at t=1e4 (float32), and the
fitted exponents of time in t and in d. Time per iteration is the median
interval between the fit's callbacks (iterations 1..n, after compilation),
the fits interleaved with data passes (X_i^T (X_i w_i) for all users, as in
bench_core.py) so machine load hits both alike. Writes ``bench_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_core  # noqa: E402  (sets the CPU flags before JAX starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lrs  # noqa: E402

BASE = dict(d=100, t=1000, m=40, r=5, k=5)
T_SWEEP = (1_000, 10_000, 100_000)
D_SWEEP = (100, 300, 1000)
P2 = dict(d=1000, t=100_000, m=50, r=10, k=10)
# Peak memory bandwidth (bytes/s) by jax device_kind, from the vendors' sheets.
PEAK_BANDWIDTH = {
    "NVIDIA H100 80GB HBM3": 3.35e12,
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H100 NVL": 3.9e12,
    "NVIDIA H200": 4.8e12,
}


def _seconds(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def time_per_iteration(
    data, sizes, iters: int, rounds: int, fit=lrs.fit, data_pass: bool = True
) -> dict:
    """Seconds per iteration and per data pass, measured interleaved.

    An iteration's time is the interval between successive ``callback`` calls
    of one fit (iterations 1..iters; iteration 0 includes the initialization),
    so compilation, input checks and the initialization are left out.
    """
    config = lrs.AMHTConfig(
        rank=sizes["r"], sparsity=sizes["k"], num_iters=iters, tol=0.0
    )
    W = jnp.ones((data.num_users if data_pass else 1, data.dim), data.X.dtype)

    def one_pass():
        if not data_pass:  # host data (streamed): no device-resident pass
            return W
        return bench_core._data_pass(data.X, W)

    def timed_fit():
        stamps = [time.perf_counter()]
        fit(data, config, callback=lambda i, info: stamps.append(time.perf_counter()))
        return np.diff(stamps)  # [init + iteration 0, iteration 1, ...]

    first_call = _seconds(lambda: timed_fit())
    _seconds(one_pass)
    intervals, passes = [], []
    for _ in range(rounds):
        intervals.append(timed_fit().tolist())
        passes += [_seconds(one_pass) for _ in range(3)]
    per_iter = float(np.median([x for row in intervals for x in row[1:]]))
    unit = float(np.median(passes)) if data_pass else float("nan")
    return dict(
        sizes=sizes,
        iters=iters,
        rounds=rounds,
        seconds_per_iteration=per_iter,
        data_pass_seconds=unit,
        units_per_iteration=per_iter / unit,
        iteration_seconds=intervals,
        data_pass_samples=passes,
        first_call_seconds=float(first_call),
        data_bytes=int(data.X.nbytes + data.y.nbytes + data.mask.nbytes),
    )


def private_time_per_iteration(data, sizes, rounds: int, iters=(1, 3)) -> dict:
    """Seconds per shared step of ``lrs.private.fit`` (epsilon=1, delta=1e-5).

    The private fit is one jitted program whose callback runs after it ends,
    so an iteration is timed as (program of ``iters[1]`` steps - program of
    ``iters[0]`` steps) / difference, over ``rounds`` interleaved pairs, with
    data passes measured in between. The programs are the jitted fit of
    ``lrs.private.algorithm.run_prepared``, compiled first; the noise
    calibration and the input checks (``prepare``) are left out.
    """
    from lrs import private
    from lrs.private import algorithm

    dp = private.DPConfig(epsilon=1.0, delta=1e-5)
    prepared = []
    for n in iters:
        config = lrs.AMHTConfig(
            rank=sizes["r"], sparsity=sizes["k"], num_iters=n, tol=0.0
        )
        prepared.append(algorithm.prepare(data, config, dp))
    W = jnp.ones((data.num_users, data.dim), data.X.dtype)

    def fit(prep):
        plan, checked = prep
        return algorithm.run_prepared(checked, plan, jax.random.key(0))[0]

    configs = prepared
    first_call = [_seconds(lambda c=c: fit(c)) for c in configs]
    _seconds(lambda: bench_core._data_pass(data.X, W))
    diffs, passes = [], []
    for _ in range(rounds):
        short, long = (_seconds(lambda c=c: fit(c)) for c in configs)
        diffs.append((long - short) / (iters[1] - iters[0]))
        passes += [_seconds(lambda: bench_core._data_pass(data.X, W)) for _ in range(3)]
    per_iter = float(np.median(diffs))
    unit = float(np.median(passes))
    return dict(
        sizes=sizes,
        iters=list(iters),
        rounds=rounds,
        seconds_per_iteration=per_iter,
        data_pass_seconds=unit,
        units_per_iteration=per_iter / unit,
        iteration_samples=diffs,
        first_call_seconds=first_call,
        data_bytes=int(data.X.nbytes + data.y.nbytes + data.mask.nbytes),
    )


def exponent(xs, ys) -> float:
    """Slope of log(y) against log(x) (least squares)."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def run_cpu(t_sweep, d_sweep, base, iters, rounds, seed, private=False) -> dict:
    """The t and d sweeps of the fit (``private``: of the private fit)."""
    points = {}
    for key, sizes in [("t", dict(base, t=t)) for t in t_sweep] + [
        ("d", dict(base, t=t_sweep[1], d=d)) for d in d_sweep
    ]:
        name = f"t={sizes['t']},d={sizes['d']}"
        if name not in points:
            data, _ = lrs.synthetic.make_problem(
                jax.random.key(seed), **sizes, dtype="float32"
            )
            # Fewer rounds for the largest problems (each fit takes seconds).
            n_rounds = max(1, rounds - 1) if sizes["t"] * sizes["d"] >= 1e7 else rounds
            if private:
                points[name] = private_time_per_iteration(data, sizes, n_rounds)
            else:
                points[name] = time_per_iteration(data, sizes, iters, n_rounds)
            del data
            print(f"  {name}: {points[name]}", flush=True)
    t_rows = [points[f"t={t},d={base['d']}"] for t in t_sweep]
    d_rows = [points[f"t={t_sweep[1]},d={d}"] for d in d_sweep]
    return dict(
        points=list(points.values()),
        exponent_t=exponent(t_sweep, [r["seconds_per_iteration"] for r in t_rows]),
        exponent_d=exponent(d_sweep, [r["seconds_per_iteration"] for r in d_rows]),
        pass_exponent_t=exponent(t_sweep, [r["data_pass_seconds"] for r in t_rows]),
        pass_exponent_d=exponent(d_sweep, [r["data_pass_seconds"] for r in d_rows]),
    )


# ----------------------------------------------------------------- GPU part


def bandwidth(data) -> dict:
    """Achieved bandwidth of a data pass (reads X twice) against the peak."""
    W = jnp.ones((data.num_users, data.dim), data.X.dtype)
    seconds = bench_core._timed(bench_core._data_pass, data.X, W, repeats=7)
    achieved = 2 * data.X.nbytes / seconds
    peak = PEAK_BANDWIDTH.get(jax.devices()[0].device_kind)
    return dict(
        data_pass_seconds=seconds,
        bytes_per_pass=2 * data.X.nbytes,
        achieved_bytes_per_s=achieved,
        peak_bytes_per_s=peak,
        fraction_of_peak=None if peak is None else achieved / peak,
    )


def time_to_error(data, truth, sizes, level=1e-4, max_iters=30) -> dict:
    config = lrs.AMHTConfig(rank=sizes["r"], sparsity=sizes["k"], num_iters=max_iters)
    _, diag = lrs.fit(data, config, truth=truth)
    hits = np.flatnonzero(diag.relative_error <= level)
    out = dict(errors=diag.relative_error.tolist(), level=level)
    if hits.size:
        stop = lrs.AMHTConfig(
            rank=sizes["r"], sparsity=sizes["k"], num_iters=int(hits[0]), tol=0.0
        )
        lrs.fit(data, stop)  # compile
        out.update(
            iterations=int(hits[0]), seconds=_seconds(lambda: lrs.fit(data, stop)[0])
        )
    return out


def host_problem(sizes, seed: int, batch: int = 2000) -> lrs.UserData:
    """A planted problem generated straight into host memory, in user batches."""
    rng = np.random.default_rng(seed)
    t, m, d, r, k = (sizes[c] for c in "tmdrk")
    U, _ = np.linalg.qr(rng.normal(size=(d, r)))
    X = np.empty((t, m, d), np.float32)
    y = np.empty((t, m), np.float32)
    for s in range(0, t, batch):
        n = min(batch, t - s)
        W = rng.normal(size=(n, r)) @ U.T
        rows = np.arange(n)[:, None]
        W[rows, rng.permuted(np.tile(np.arange(d), (n, 1)), axis=1)[:, :k]] += 1.0
        X[s : s + n] = rng.normal(size=(n, m, d))
        y[s : s + n] = np.einsum("nmd,nd->nm", X[s : s + n], W)
    return lrs.UserData.from_host(X, y)


def largest_stream(sizes, t_values, chunk_bytes: int, seed: int) -> list[dict]:
    """Per-iteration time of the streamed fit for growing t (host memory bound)."""
    rows = []
    for t in t_values:
        s = dict(sizes, t=int(t))
        need = s["t"] * s["m"] * (s["d"] + 1) * 4
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        if need > 0.8 * avail:
            rows.append(
                dict(t=int(t), skipped=f"needs {need / 1e9:.0f} GB of host RAM")
            )
            break
        data = host_problem(s, seed)
        chunk = max(1, chunk_bytes // (s["m"] * s["d"] * 4))

        def fit(data, config, chunk=chunk, **kw):
            return lrs.fit_streamed(data, config, chunk_users=chunk, **kw)

        row = time_per_iteration(data, s, iters=2, rounds=1, fit=fit, data_pass=False)
        row.update(t=int(t), chunk_users=chunk)
        rows.append(row)
        print(f"  streamed t={t}: {row['seconds_per_iteration']:.2f} s/iteration")
        del data
    return rows


def run_gpu(sizes, stream_t, chunk_bytes, seed) -> dict:
    data, truth = lrs.synthetic.make_problem(
        jax.random.key(seed), **sizes, dtype="float32"
    )
    out = dict(sizes=sizes, bandwidth=bandwidth(data))
    out["per_iteration"] = time_per_iteration(data, sizes, iters=3, rounds=3)
    out["to_1e-4"] = time_to_error(data, truth, sizes)
    del data, truth
    out["streaming"] = largest_stream(sizes, stream_t, chunk_bytes, seed)
    return out


def run_stream_cpu(sizes, chunks, iters, rounds, seed) -> dict:
    """Streamed vs in-memory time per iteration on the same problem (CPU)."""
    data, _ = lrs.synthetic.make_problem(jax.random.key(seed), **sizes, dtype="float32")
    rows = [dict(time_per_iteration(data, sizes, iters, rounds), chunk_users=None)]
    host = lrs.UserData.from_host(*(np.asarray(a) for a in data))
    for chunk in chunks:

        def fit(data, config, chunk=chunk, **kw):
            return lrs.fit_streamed(host, config, chunk_users=chunk, **kw)

        row = time_per_iteration(data, sizes, iters, rounds, fit=fit)
        rows.append(dict(row, chunk_users=chunk))
        print(f"  streamed chunk={chunk}: {row['seconds_per_iteration']:.3f} s/it")
    return dict(sizes=sizes, rows=rows)


def run(args) -> dict:
    base, t_sweep, d_sweep = BASE, T_SWEEP, D_SWEEP
    if args.quick:
        base, t_sweep, d_sweep = (
            dict(d=20, t=100, m=20, r=2, k=2),
            (50, 100, 200),
            (
                10,
                20,
                40,
            ),
        )
    result = dict(
        argv=sys.argv,
        args=vars(args),
        versions=dict(jax=jax.__version__, python=platform.python_version()),
        devices=[str(d) for d in jax.devices()],
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        machine=platform.platform(),
        cpu_count=os.cpu_count(),
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    )
    if not (args.gpu_only or args.stream_cpu_only or args.private_only):
        result["cpu"] = run_cpu(
            t_sweep, d_sweep, base, args.iters, args.rounds, args.seed
        )
        print(
            f"exponent in t: {result['cpu']['exponent_t']:.2f}, "
            f"in d: {result['cpu']['exponent_d']:.2f}"
        )
    if args.private or args.private_only:
        result["private_cpu"] = run_cpu(
            t_sweep, d_sweep, base, args.iters, args.rounds, args.seed, private=True
        )
        print(
            f"private fit: exponent in t: {result['private_cpu']['exponent_t']:.2f}, "
            f"in d: {result['private_cpu']['exponent_d']:.2f}"
        )
    if args.stream_cpu:
        sizes = dict(base, t=t_sweep[1])
        chunks = (sizes["t"], sizes["t"] // 10)
        result["stream_cpu"] = run_stream_cpu(
            sizes, chunks, args.iters, args.rounds, args.seed
        )
    if args.gpu or args.gpu_only:
        sizes = dict(P2) if not args.quick else dict(d=40, t=400, m=30, r=3, k=3)
        stream_t = args.stream_t or ([800, 1600] if args.quick else [100_000, 200_000])
        result["gpu"] = run_gpu(sizes, stream_t, args.chunk_bytes, args.seed)
        print(json.dumps(result["gpu"]["bandwidth"]))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-scale")
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument("--iters", type=int, default=3, help="iterations per fit")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu", action="store_true", help="also the GPU figures")
    parser.add_argument("--gpu-only", action="store_true")
    parser.add_argument(
        "--stream-cpu", action="store_true", help="streamed vs in-memory, t=1e4"
    )
    parser.add_argument("--stream-cpu-only", action="store_true")
    parser.add_argument(
        "--private", action="store_true", help="also the sweeps of the private fit"
    )
    parser.add_argument("--private-only", action="store_true")
    parser.add_argument("--stream-t", type=float, nargs="*", default=None)
    parser.add_argument("--chunk-bytes", type=int, default=2 * 2**30)
    args = parser.parse_args(argv)
    args.stream_cpu = args.stream_cpu or args.stream_cpu_only
    result = run(args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_scale.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
