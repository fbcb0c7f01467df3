"""The ``lrs`` command line: argument parsing and a dispatch to the studies.

Each command runs one study of :mod:`lrs.studies` (see :data:`STUDIES`):
``lrs demo`` plants a low-rank plus sparse problem, fits it and writes
``results.json`` (and ``error_vs_iteration.png``) into ``--out``; ``lrs dp``,
``lrs audit`` and ``lrs transformer`` run the privacy-utility, privacy-audit
and personalized-transformer studies.

The studies import JAX, numpy, tqdm and matplotlib themselves, after the
arguments are parsed: :func:`lrs._xla.avoid_cpu_deadlock` has to set
``XLA_FLAGS`` before the XLA backend starts, and ``lrs --help`` should not pay
for them.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys

from lrs._xla import avoid_cpu_deadlock, use_compilation_cache
from lrs.studies.demo import P0, PLOT_NAME, QUICK

#: Command -> the study module whose ``command(args)`` runs it.
STUDIES = {
    "demo": "lrs.studies.demo",
    "transformer": "lrs.studies.transformer",
    "dp": "lrs.studies.privacy_utility",
    "audit": "lrs.studies.privacy_audit",
}


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
    demo.set_defaults(subparser=demo)

    transformer = sub.add_parser(
        "transformer",
        add_help=False,  # `lrs transformer --help`: lrs.studies.transformer
        prefix_chars="+",  # so every "-..." argument lands in `rest`, untouched
        help="personalized transformer: LRS layers vs adapters (docs/transformer.md)",
    )
    transformer.add_argument("rest", nargs=argparse.REMAINDER)
    transformer.set_defaults(subparser=transformer)

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
    dp.set_defaults(subparser=dp)

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
    audit.set_defaults(subparser=audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lrs`` console script; returns the exit status."""
    avoid_cpu_deadlock()  # before the XLA backend starts (JAX reads it lazily)
    parser = build_parser()
    args = parser.parse_args(argv)
    use_compilation_cache()  # imports JAX: after --help has been answered
    try:
        study = importlib.import_module(STUDIES[args.command])
        return study.command(args)
    except KeyboardInterrupt:
        print("lrs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
