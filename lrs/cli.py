"""The ``lrs`` command line.

``lrs demo`` plants a low-rank plus sparse problem, fits it with AMHT-LRS
while drawing a progress bar, prints a summary table and writes
``results.json`` (and ``error_vs_iteration.png``) into ``--out``.

JAX, numpy, tqdm and matplotlib are imported lazily, inside the functions that
need them: :func:`lrs._xla.avoid_cpu_deadlock` has to set ``XLA_FLAGS`` before
the XLA backend starts, and ``lrs --help`` should not pay for them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from lrs._xla import avoid_cpu_deadlock, use_compilation_cache

#: Problem P0, the default of ``lrs demo``.
P0 = dict(d=100, t=1000, m=40, r=5, k=5, iters=30)
#: The ``--quick`` problem: finishes in seconds on a laptop CPU.
QUICK = dict(d=40, t=200, m=30, r=3, k=3, iters=20)

PLOT_NAME = "error_vs_iteration.png"
RESULTS_NAME = "results.json"

_EXIT_BAD_ARGS = 2
_EXIT_FAILED = 1


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} must be an integer; got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"{what} must be an integer >= {minimum}; got {value}"
            )
        return value

    return parse


def _nonnegative_float(what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} must be a number; got {text!r}"
            ) from None
        if not (math.isfinite(value) and value >= 0):
            raise argparse.ArgumentTypeError(
                f"{what} must be a finite number >= 0; got {text}"
            )
        return value

    return parse


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lrs")
    except PackageNotFoundError:  # running from a source tree
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lrs`` command (no JAX import)."""
    parser = argparse.ArgumentParser(
        prog="lrs",
        description="Low-rank plus sparse model personalization (AMHT-LRS).",
    )
    parser.add_argument("--version", action="version", version=f"lrs {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="fit a planted problem and report the convergence",
        description=(
            "Plants y_ij = <x_ij, U* v_i* + b_i*> + noise with a random orthonormal "
            "(d, r) U* and k-sparse b_i*, fits it with AMHT-LRS and reports the "
            "error against the planted model. Default: problem P0 "
            "(d=100, t=1000, m=40, r=5, k=5, noise=0, 30 iterations)."
        ),
    )

    def preset(name):
        return f"{P0[name]}; {QUICK[name]} with --quick"

    size = demo.add_argument_group("problem")
    size.add_argument(
        "--d",
        type=_int_at_least(1, "dimension d"),
        help=f"features per sample ({preset('d')})",
    )
    size.add_argument(
        "--t", type=_int_at_least(1, "number of users t"), help=f"users ({preset('t')})"
    )
    size.add_argument(
        "--m",
        type=_int_at_least(1, "samples per user m"),
        help=f"samples per user ({preset('m')})",
    )
    size.add_argument(
        "--r",
        type=_int_at_least(1, "rank r"),
        help=f"rank of the shared factor U, 1 <= r < d ({preset('r')})",
    )
    size.add_argument(
        "--k",
        type=_int_at_least(0, "sparsity k"),
        help=f"nonzeros per user's sparse part, 0 <= k < d ({preset('k')})",
    )
    size.add_argument(
        "--noise",
        type=_nonnegative_float("noise"),
        default=0.0,
        help="standard deviation of the label noise (default 0)",
    )
    size.add_argument(
        "--quick",
        action="store_true",
        help="a tiny problem (d=40, t=200, m=30, r=3, k=3, 20 "
        "iterations) that finishes in seconds; explicit "
        "options still win",
    )

    run = demo.add_argument_group("fit and output")
    run.add_argument(
        "--iters",
        type=_int_at_least(0, "iterations"),
        help=f"maximum AMHT iterations ({preset('iters')})",
    )
    run.add_argument(
        "--seed",
        type=_int_at_least(0, "seed"),
        default=0,
        help="seed of the planted problem and of the fit (default 0)",
    )
    run.add_argument(
        "--x64", action="store_true", help="compute in float64 (sets jax_enable_x64)"
    )
    run.add_argument(
        "--out",
        default="./lrs-out",
        help="output directory for results.json and the plot (default ./lrs-out)",
    )
    run.add_argument(
        "--no-plot", dest="plot", action="store_false", help=f"do not write {PLOT_NAME}"
    )
    demo.set_defaults(handler=_demo, subparser=demo)

    transformer = sub.add_parser(
        "transformer",
        add_help=False,  # `lrs transformer --help` is answered by lrs.nn.experiment
        prefix_chars="+",  # so every "-..." argument lands in `rest`, untouched
        help="personalized transformer: LRS layers vs adapters (docs/transformer.md)",
    )
    transformer.add_argument("rest", nargs=argparse.REMAINDER)
    transformer.set_defaults(handler=_transformer, subparser=transformer)

    dp = sub.add_parser(
        "dp",
        help="private AMHT-LRS: error versus epsilon and users (docs/privacy.md)",
        description=(
            "Fits private AMHT-LRS (user-level (epsilon, delta)-DP) on planted "
            "problems and reports the subspace distance of U and the held-out "
            "test MSE versus epsilon in {0.5, 1, 2, 4, 8} and versus the number of "
            "users at epsilon = 1, next to the non-private fit, plus the benchmark "
            "point d=50, r=3, k=3, m=50, t=50,000, epsilon=1, delta=1e-5. Writes "
            "privacy_utility.json and privacy_utility.png into --out."
        ),
    )
    dp.add_argument(
        "--quick", action="store_true", help="tiny sizes, one seed: under a minute"
    )
    dp.add_argument(
        "--seed",
        type=_int_at_least(0, "seed"),
        default=0,
        help="seed of the planted problems and the noise (default 0)",
    )
    dp.add_argument(
        "--out", default="./lrs-out/dp", help="output directory (default ./lrs-out/dp)"
    )
    dp.add_argument(
        "--no-plot",
        dest="plot",
        action="store_false",
        help="do not write privacy_utility.png",
    )
    dp.add_argument(
        "--no-benchmark",
        dest="benchmark",
        action="store_false",
        help="skip the t=50,000 benchmark point",
    )
    dp.add_argument(
        "--benchmark-only",
        action="store_true",
        help="only the benchmark point (private/non-private test MSE ratio)",
    )
    dp.set_defaults(handler=_dp, subparser=dp)

    audit = sub.add_parser(
        "audit",
        help="privacy audit: lower bounds on epsilon from canaries (docs/privacy.md)",
        description=(
            "Audits private AMHT-LRS with canary users: runs one noisy aggregation "
            "step and the whole private fit many times with and without a canary, "
            "and turns the detection rates into 95%% lower bounds on epsilon "
            "(Clopper-Pearson), for claimed epsilon in {1, 2, 4, 8} at delta=1e-5. "
            "Fits are scored by two attackers: one who sees the final U and one "
            "who sees every release (the transcript). Also: an ordinary-user "
            "canary, float32 data, a float32 user scaled by 1e20 (overflow), and "
            "two deliberately broken mechanisms that must be flagged (half the "
            "noise; one key reused by every run). Writes privacy_audit.json and "
            "privacy_audit.png into --out (about 11 min on 2 cores; --quick: 1)."
        ),
    )
    audit.add_argument(
        "--quick",
        action="store_true",
        help="few trials, small fits: under a minute (loose but valid bounds)",
    )
    audit.add_argument(
        "--seed",
        type=_int_at_least(0, "seed"),
        default=0,
        help="seed of the data sets and the noise (default 0)",
    )
    audit.add_argument(
        "--out",
        default="./lrs-out/audit",
        help="output directory (default ./lrs-out/audit)",
    )
    audit.add_argument(
        "--no-plot",
        dest="plot",
        action="store_false",
        help="do not write privacy_audit.png",
    )
    audit.set_defaults(handler=_audit, subparser=audit)
    return parser


def _audit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lrs.audit import experiment  # each audit sets its own precision

    out = Path(args.out)
    results = experiment.run(
        out, quick=args.quick, seed=args.seed, plot=args.plot, progress=tqdm
    )
    print(experiment.summary(results))
    print(f"results: {out / 'privacy_audit.json'}")
    return 0


def _dp(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lrs.private import experiment

    out = Path(args.out)
    results = experiment.run(
        out,
        quick=args.quick,
        seed=args.seed,
        plot=args.plot,
        benchmark=args.benchmark,
        benchmark_only=args.benchmark_only,
        progress=tqdm,
    )
    print(experiment.summary(results))
    print(f"results: {out / 'privacy_utility.json'}")
    return 0


def _transformer(args: argparse.Namespace) -> int:
    from lrs.nn.experiment import main as transformer_main  # imports JAX lazily

    return transformer_main(args.rest, prog="lrs transformer")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lrs`` console script; returns the exit status."""
    avoid_cpu_deadlock()  # before the XLA backend starts (JAX reads it lazily)
    parser = build_parser()
    args = parser.parse_args(argv)
    use_compilation_cache()  # imports JAX: after --help has been answered
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("lrs: interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------- demo


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


def _demo(args: argparse.Namespace) -> int:
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
    for name in diag._fields:
        column = np.asarray(getattr(diag, name))
        if np.issubdtype(column.dtype, np.floating):
            diagnostics[name] = [_finite_or_none(x) for x in column]
        else:
            diagnostics[name] = [int(x) for x in column]

    setup = {k: v for k, v in vars(args).items() if k not in ("handler", "subparser")}
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
            from lrs.plotting import plot_convergence

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


if __name__ == "__main__":
    raise SystemExit(main())
