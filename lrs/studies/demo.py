"""The ``lrs demo`` study: plant a low-rank plus sparse problem and fit it.

It fits the planted problem with AMHT-LRS while drawing a progress bar, prints
a summary table and writes ``results.json`` (and ``error_vs_iteration.png``)
into ``--out``. :mod:`lrs.cli` parses the arguments and calls :func:`command`.

JAX, numpy, tqdm and matplotlib are imported inside :func:`command`:
:mod:`lrs.cli` imports this module for the presets before the XLA backend
starts, and ``lrs --help`` should not pay for them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

#: Problem P0, the default of ``lrs demo``.
P0 = dict(d=100, t=1000, m=40, r=5, k=5, iters=30)
#: The ``--quick`` problem: finishes in seconds on a laptop CPU.
QUICK = dict(d=40, t=200, m=30, r=3, k=3, iters=20)

PLOT_NAME = "error_vs_iteration.png"
RESULTS_NAME = "results.json"

_EXIT_BAD_ARGS = 2
_EXIT_FAILED = 1


def _resolve_problem(args: argparse.Namespace) -> None:
    """Fills unset sizes from P0 / QUICK and checks the cross-argument limits."""
    parser = args.subparser
    defaults = QUICK if args.quick else P0
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.r < args.d:
        parser.error(
            f"argument --r: rank r must satisfy 1 <= r < d = {args.d}; got r = {args.r}"
        )
    if not args.k < args.d:
        parser.error(
            f"argument --k: sparsity k must satisfy 0 <= k < d = {args.d}; "
            f"got k = {args.k}"
        )


def _fail(args: argparse.Namespace, message: str, status: int) -> int:
    print(f"{args.subparser.prog}: error: {message}", file=sys.stderr)
    return status


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def linear_rate(errors, floor: float) -> tuple[float | None, int]:
    """Geometric mean of ``errors[i] / errors[i-1]`` over the pairs above ``floor``.

    Returns ``(rate, number of pairs used)``; the rate is None without a pair.
    """
    logs = []
    for a, b in zip(errors[:-1], errors[1:], strict=True):
        a, b = float(a), float(b)
        if math.isfinite(a) and math.isfinite(b) and a > floor and b > floor:
            logs.append(math.log(b / a))
    if not logs:
        return None, 0
    return math.exp(sum(logs) / len(logs)), len(logs)


def _fmt(value, spec: str = ".3e") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def command(args: argparse.Namespace) -> int:
    """Runs ``lrs demo`` with the parsed ``args``; returns the exit status."""
    _resolve_problem(args)
    out = Path(args.out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return _fail(
            args, f"cannot create the output directory {out}: {e}", _EXIT_FAILED
        )

    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)  # before any array exists
    import numpy as np
    from tqdm import tqdm

    import lrs
    from lrs import metrics, synthetic
    from lrs.diagnostics import PER_ITERATION

    key_problem, key_fit = jax.random.split(jax.random.key(args.seed))
    try:
        data, truth = synthetic.make_problem(
            key_problem,
            d=args.d,
            t=args.t,
            m=args.m,
            r=args.r,
            k=args.k,
            noise=args.noise,
        )
        config = lrs.AMHTConfig(rank=args.r, sparsity=args.k, num_iters=args.iters)
    except ValueError as e:
        return _fail(args, str(e), _EXIT_BAD_ARGS)
    dtype = np.dtype(data.X.dtype)

    bar = tqdm(
        total=args.iters,
        desc="AMHT-LRS (compiling)",
        unit="it",
        file=sys.stderr,
        dynamic_ncols=True,
    )
    first_report = []

    def callback(iteration: int, info) -> None:
        if iteration == 0:  # compiled and initialized: time the iterations only
            first_report.append(time.perf_counter())
            bar.reset(total=args.iters)
            bar.set_description("AMHT-LRS", refresh=False)
        bar.set_postfix(
            loss=f"{info.loss:.2e}", rel_err=f"{info.relative_error:.2e}", refresh=False
        )
        if iteration > bar.n:
            bar.update(iteration - bar.n)
        else:
            bar.refresh()

    start = time.perf_counter()
    try:
        params, diag = lrs.fit(
            data, config, key=key_fit, callback=callback, truth=truth
        )
    except ValueError as e:
        bar.close()
        return _fail(args, str(e), _EXIT_BAD_ARGS)
    except lrs.FitError as e:
        bar.close()
        return _fail(args, f"the fit failed: {e}", _EXIT_FAILED)
    wall = time.perf_counter() - start
    iterations_run = len(diag.loss) - 1
    stopped_early = iterations_run < args.iters
    if stopped_early:  # converged on the tolerance: show a finished bar
        bar.set_description("AMHT-LRS (converged)")
        bar.total = bar.n
    bar.close()

    tol, cg_tol = config.tolerances(dtype)
    floor = 100 * float(np.finfo(dtype).eps)
    rate, rate_pairs = linear_rate(diag.relative_error, floor)
    init_s = first_report[0] - start if first_report else None
    summary = {
        "d": args.d,
        "t": args.t,
        "m": args.m,
        "r": args.r,
        "k": args.k,
        "noise": args.noise,
        "dtype": str(dtype),
        "backend": jax.default_backend(),
        "iterations_run": iterations_run,
        "max_iterations": args.iters,
        "stopped_early": stopped_early,
        "tol": tol,
        "final_relative_error": _finite_or_none(diag.relative_error[-1]),
        "final_subspace_distance": _finite_or_none(diag.subspace_distance[-1]),
        "support_recovery": float(metrics.support_recovery(params, truth)),
        "training_loss": _finite_or_none(diag.loss[-1]),
        "fit_wall_time_s": wall,
        "time_to_initialization_s": init_s,
        "linear_rate": rate,
        "linear_rate_pairs": rate_pairs,
        "linear_rate_floor": floor,
    }
    diagnostics = {"iteration": list(range(iterations_run + 1))}
    for name in PER_ITERATION:
        column = np.asarray(getattr(diag, name))
        if np.issubdtype(column.dtype, np.floating):
            diagnostics[name] = [_finite_or_none(x) for x in column]
        else:
            diagnostics[name] = [int(x) for x in column]

    setup = {k: v for k, v in vars(args).items() if k != "subparser"}
    setup["out"] = str(out.resolve())
    config_dict = {k: getattr(config, k) for k in config.__dataclass_fields__}
    config_dict.update(tol=tol, cg_tol=cg_tol)
    results = {
        "command": "demo",
        "args": setup,
        "seed": args.seed,
        "lrs_version": lrs.__version__,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "config": config_dict,
        "diagnostics": diagnostics,
        "summary": summary,
    }

    rows = [
        (
            "problem",
            f"d={args.d} t={args.t} m={args.m} r={args.r} k={args.k} "
            f"noise={args.noise:g} seed={args.seed}",
        ),
        ("dtype / backend", f"{dtype} / {summary['backend']}"),
        (
            "iterations run",
            f"{iterations_run} of {args.iters}"
            + (f" (stopped: U change < tol {tol:g})" if stopped_early else ""),
        ),
        ("final relative error", _fmt(summary["final_relative_error"])),
        ("subspace distance", _fmt(summary["final_subspace_distance"])),
        ("support recovery", f"{summary['support_recovery']:.1%} of users exact"),
        ("training loss", _fmt(summary["training_loss"])),
        (
            "fit wall time",
            f"{wall:.2f} s"
            + (f" ({init_s:.2f} s compile + init)" if init_s is not None else ""),
        ),
        (
            "linear rate",
            (
                f"{rate:.3f} per iteration (geometric mean of "
                f"{rate_pairs} ratios, errors > {floor:.1e})"
            )
            if rate is not None
            else "n/a",
        ),
    ]
    print("AMHT-LRS demo summary")
    print(_table(rows))

    results_path = out / RESULTS_NAME
    try:
        results_path.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
        plot_path = None
        if args.plot:
            from lrs.studies.plotting import plot_convergence

            plot_path = plot_convergence(
                diagnostics,
                out / PLOT_NAME,
                floor=floor,
                title=f"AMHT-LRS, d={args.d} t={args.t} m={args.m} r={args.r} "
                f"k={args.k} noise={args.noise:g} ({dtype})",
            )
    except OSError as e:
        return _fail(args, f"cannot write the results into {out}: {e}", _EXIT_FAILED)
    print(f"results: {results_path.resolve()}")
    if plot_path is not None:
        print(f"plot:    {Path(plot_path).resolve()}")
    return 0
