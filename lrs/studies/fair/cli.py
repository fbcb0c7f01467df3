"""A fair personalization study on the Flax NNX adapters (issue 18).

The command line of :mod:`lrs.studies.fair` (``experiments/fair_study.py``,
``python -m lrs.studies.fair``). The first paragraph above is the ``--help``
description.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax

from lrs.studies.fair.method_table import SWEEPS
from lrs.studies.fair.report import RESULTS_NAME, TABLE_NAME, write
from lrs.studies.fair.setup import DEFAULT, QUICK, TEACHERS, VARIANTS, Setup
from lrs.studies.fair.stats import rejudge
from lrs.studies.fair.study import run, run_dp_only


def build_parser(prog: str = "fair_study.py") -> argparse.ArgumentParser:
    """``--quick``, ``--out``, ``--seeds`` and the cuts (imports nothing heavy)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, 2 seeds, small sweep, frozen only (< 2 min)",
    )
    p.add_argument("--out", default="./lrs-out/fair", help="output folder")
    p.add_argument("--seeds", type=int, help="seeds (3; 2 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="first random seed (0)")
    p.add_argument("--teachers", help=f"comma list among {', '.join(TEACHERS)}")
    p.add_argument("--variants", help=f"comma list among {', '.join(VARIANTS)}")
    p.add_argument("--methods", help="comma list of method names or name:size labels")
    p.add_argument("--users", type=int, help="trained users (= cold-start users)")
    p.add_argument("--steps", type=int, help="steps of every training run")
    p.add_argument(
        "--report",
        metavar="JSON",
        help="no training: rebuild the table and plot of a saved record into --out",
    )
    p.add_argument(
        "--sweep",
        choices=SWEEPS,
        help="sizes: all, default (all but lrs.studies.fair.CUT) or small (quick)",
    )
    p.add_argument(
        "--dp",
        action="store_true",
        help="also run the user-level DP part (accuracy against epsilon, audit)",
    )
    p.add_argument(
        "--dp-only",
        action="store_true",
        help="run only the DP part (its teacher's data and bases, then DP)",
    )
    p.add_argument(
        "--dp-into",
        metavar="JSON",
        help="with --dp-only: add the dp section to this saved record (its setup "
        "and seed), writing into --out",
    )
    p.add_argument("--dp-epsilons", help="comma list, e.g. 1,2,4,8,inf")
    p.add_argument("--dp-trials", type=int, help="audit runs per side (0: no audit)")
    p.add_argument(
        "--joint-sizes",
        choices=("all", "one"),
        help="joint variant at every size or the middle one (one)",
    )
    return p


def _saved_setup(record: dict) -> Setup:
    """The :class:`Setup` of a saved record (lists back to tuples)."""
    fields = {f.name for f in dataclasses.fields(Setup)}
    kept = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in record["setup"].items()
        if k in fields and not k.startswith("dp")
    }
    return Setup(**kept)


def setup_from_args(args, base: Setup | None = None) -> Setup:
    """The :class:`Setup` that ``args`` ask for (ValueError when it is not valid)."""
    setup = base or (QUICK if args.quick else DEFAULT)
    changes = {}
    if args.dp or args.dp_only:
        changes["dp"] = True
    if args.dp_epsilons:
        changes["dp_epsilons"] = tuple(
            float(x) for x in args.dp_epsilons.split(",") if x.strip()
        )
    if args.dp_trials is not None:
        changes["dp_audit_trials"] = args.dp_trials
    if args.seeds is not None:
        if args.seeds < 2:
            raise ValueError(
                f"--seeds must be >= 2 (an interval needs 2); got {args.seeds}"
            )
        changes["seeds"] = args.seeds
    for name in ("teachers", "variants"):
        if getattr(args, name):
            changes[name] = tuple(
                x.strip() for x in getattr(args, name).split(",") if x.strip()
            )
    for name in ("users", "steps"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.joint_sizes:
        changes["joint_sizes"] = args.joint_sizes
    if args.sweep:
        changes["sweep"] = args.sweep
    if args.methods:
        changes["only"] = tuple(x.strip() for x in args.methods.split(",") if x.strip())
    return dataclasses.replace(setup, **changes)


def main(argv: list[str] | None = None, prog: str = "fair_study.py") -> int:
    """Parses ``argv`` (``--quick``, ``--out DIR``, ``--seeds N``, ...) and runs."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    into = None
    if args.dp_into:
        if not args.dp_only:
            parser.error("--dp-into needs --dp-only")
        into = json.loads(Path(args.dp_into).read_text())
    try:
        setup = setup_from_args(args, _saved_setup(into) if into else None)
    except ValueError as e:
        parser.error(str(e))
    if args.report:
        record = rejudge(json.loads(Path(args.report).read_text()))
        write(record, Path(args.out).expanduser())
        print(f"report: {(Path(args.out).expanduser() / TABLE_NAME).resolve()}")
        return 0
    cheap = jax.config.read("jax_disable_most_optimizations")
    if args.quick:  # compilation dominates a tiny run: compile cheaply
        jax.config.update("jax_disable_most_optimizations", True)
    try:
        if args.dp_only:
            seed = into["seed"] if into else args.seed
            record = run_dp_only(setup, Path(args.out).expanduser(), seed=seed,
                                 into=into)  # fmt: skip
            out = Path(args.out).expanduser()
            seconds = record["dp"]["seconds_with_pretraining"]
            print(f"results: {(out / RESULTS_NAME).resolve()}  ({seconds:.0f} s)")
            return 0
        else:
            record = run(setup, Path(args.out).expanduser(), seed=args.seed)
    finally:
        jax.config.update("jax_disable_most_optimizations", cheap)
    out = Path(args.out).expanduser()
    print(
        f"results: {(out / RESULTS_NAME).resolve()}  "
        f"({record['total_seconds']:.0f} s wall, "
        f"{record['total_cpu_seconds']:.0f} s CPU)"
    )
    return 0
