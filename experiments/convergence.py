"""Convergence: relative error of AMHT-LRS per iteration for several (r, k),
with the fitted linear rate.

    python experiments/convergence.py --out results/convergence   # ~2 min
    python experiments/convergence.py --quick --out /tmp/convergence

Noiseless planted problems, always in float64 (so the linear phase is
visible down to ~1e-12), ``tol = 0`` (no early stop). The rate ``rho`` is
fitted by ``lrs.theory.linear_rate`` to the iterations with error in
(1e-10, 1e-1). Writes ``convergence.json`` and ``convergence.png``.
"""

from __future__ import annotations

import sys

import _common as c
import jax
import numpy as np

import lrs
from lrs import theory

FULL = dict(
    d=100, t=500, m=40, rks=((2, 2), (3, 3), (5, 5), (5, 10)), iters=25, seeds=2
)
QUICK = dict(d=30, t=120, m=30, rks=((2, 2), (3, 3)), iters=12, seeds=1)


def run(args) -> dict:
    args.x64 = True
    start = c.setup(args)
    p = dict(QUICK if args.quick else FULL)
    curves = []
    cells = [(r, k, s) for r, k in p["rks"] for s in range(p["seeds"])]
    for r, k, s in c.progress(cells, "(r, k, seed)"):
        seed = args.seed + s
        data, truth = lrs.synthetic.make_problem(
            jax.random.key(seed), d=p["d"], t=p["t"], m=p["m"], r=r, k=k
        )
        config = lrs.AMHTConfig(rank=r, sparsity=k, num_iters=p["iters"], tol=0.0)
        _, diag = lrs.fit(data, config, truth=truth)
        err = np.asarray(diag.relative_error)
        curves.append(
            dict(
                r=r,
                k=k,
                seed=seed,
                relative_error=err.tolist(),
                subspace_distance=np.asarray(diag.subspace_distance).tolist(),
                rate=theory.linear_rate(err, low=1e-10, high=1e-1),
            )
        )
    record = dict(experiment="convergence", params=p, curves=curves)
    record["environment"] = c.environment(args, start)
    c.save_json(args.out, "convergence.json", record)
    plot(record, f"{args.out}/convergence.png")
    for cv in curves:
        print(
            f"r={cv['r']} k={cv['k']} seed={cv['seed']}: rate {cv['rate']:.3f}, "
            f"final error {cv['relative_error'][-1]:.2e}"
        )
    return record


def plot(record, path: str) -> None:
    fig, axes = c.figure(1, 1, size=(6, 4.5))
    ax = axes[0][0]
    colors = {}
    for cv in record["curves"]:
        key = (cv["r"], cv["k"])
        color = colors.setdefault(key, f"C{len(colors)}")
        first = sum(1 for other in record["curves"] if (other["r"], other["k"]) == key)
        rate = cv["rate"]
        label = f"r={key[0]}, k={key[1]}: " + (
            f"rate {rate:.2f}" if rate == rate else "no linear phase"
        )
        ax.semilogy(
            cv["relative_error"],
            "o-",
            ms=3,
            color=color,
            label=label if cv["seed"] == record["curves"][0]["seed"] else None,
            alpha=1.0 if first else 0.6,
        )
    p = record["params"]
    ax.set_xlabel("iteration (0 = initialization)")
    ax.set_ylabel("relative error ||W - W*||_F / ||W*||_F")
    ax.set_title(f"AMHT-LRS, d = {p['d']}, t = {p['t']}, m = {p['m']}, noiseless")
    c.plotting.grid(ax, "both")
    ax.legend(fontsize=8)
    c.save(fig, path)


def main(argv=None):
    return run(
        c.parser(__doc__.splitlines()[0], "results/convergence").parse_args(argv)
    )


if __name__ == "__main__":
    main(sys.argv[1:])
