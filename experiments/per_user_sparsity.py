"""Per-user sparsity: values kept per user and error against the significance level.

    python experiments/per_user_sparsity.py --out results/per_user_sparsity  # ~1 min
    python experiments/per_user_sparsity.py --quick --out /tmp/per_user_sparsity

Fits AMHT-LRS with ``AMHTConfig(sparse_significance=level)`` on a noisy
planted problem with heavy-tailed activity (``m_i`` uniform in ``[m_min,
m]``), with and without a planted sparse part, and reports the relative error
to the truth and the mean number of sparse values kept by the users below and
above the median activity (docs/algorithm.md, "Per-user sparsity"). Writes
``per_user_sparsity.json``; one line per row on stdout.
"""

from __future__ import annotations

import sys

import _common as c
import jax
import numpy as np

import lrs

FULL = dict(d=30, t=200, m=80, m_min=10, r=3, k=3, noise=0.5, levels=(0.0, 2.0, 3.0))
QUICK = dict(d=20, t=60, m=40, m_min=10, r=2, k=2, noise=0.5, levels=(0.0, 3.0))


def row(p: dict, planted: bool, level: float, seed: int) -> dict:
    data, truth = lrs.synthetic.make_problem(
        jax.random.key(seed), d=p["d"], t=p["t"], m=p["m"], r=p["r"], k=p["k"],
        noise=p["noise"], m_min=p["m_min"], b_scale=1.0 if planted else 0.0,
    )  # fmt: skip
    config = lrs.AMHTConfig(p["r"], p["k"], sparse_significance=level)
    params, diagnostics = lrs.fit(data, config, key=jax.random.key(seed))
    kept = np.asarray(params.B.values != 0).sum(axis=1)
    counts = np.asarray(data.mask.sum(axis=1))
    low = counts < np.median(counts)
    return dict(
        planted_sparse=planted,
        level=level,
        relative_error=float(lrs.metrics.relative_error(params, truth)),
        kept_low_activity=float(kept[low].mean()),
        kept_high_activity=float(kept[~low].mean()),
        iterations=len(diagnostics.loss),
        stop_reason=diagnostics.stop_reason,
    )


def run(args) -> dict:
    start = c.setup(args)
    p = dict(QUICK if args.quick else FULL)
    cells = [(planted, level) for planted in (True, False) for level in p["levels"]]
    rows = [row(p, *cell, args.seed) for cell in c.progress(cells, "cells")]
    for r in rows:
        print(
            f"planted_sparse={r['planted_sparse']} level={r['level']:g}: "
            f"relative error {r['relative_error']:.3g}, values kept "
            f"{r['kept_low_activity']:.2f} (low activity) / "
            f"{r['kept_high_activity']:.2f} (high) of {p['k']}"
        )
    record = dict(experiment="per_user_sparsity", params=p, rows=rows)
    record["environment"] = c.environment(args, start)
    c.save_json(args.out, "per_user_sparsity.json", record)
    return record


def main(argv=None):
    description = __doc__.splitlines()[0]
    return run(c.parser(description, "results/per_user_sparsity").parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
