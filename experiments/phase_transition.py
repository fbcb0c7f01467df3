"""Phase transitions: success probability over (m, k) and (m, r), and the gap
between AMHT-LRS and the oracle (true U given) as t grows.

    python experiments/phase_transition.py --out results/phase   # ~10 min, 2 cores
    python experiments/phase_transition.py --quick --out /tmp/phase

Noiseless planted problems (``lrs.synthetic.make_problem``); a fit succeeds
when its relative error ``||W - W*||_F / ||W*||_F <= 1e-3``. The samples per
user ``m`` vary through the mask of one generated data set (so the m-sweep
reuses one compiled program and the samples are nested). Methods: AMHT-LRS,
the oracle, low_rank_only, sparse_only (budget ``r + k``) and local_ridge
(with a 1e-8 penalty available, since the data are noiseless); ``convex`` and
``global_model`` are left out: their error is bias-limited far above 1e-3
(see comparison.py). Writes ``phase_transition.json``, ``phase_mk.png``,
``phase_mr.png`` and ``phase_gap_vs_t.png``.
"""

from __future__ import annotations

import sys

import _common as c
import jax
import numpy as np

import lrs
from lrs import baselines, theory

FULL = dict(
    d=30,
    t=150,
    r=2,
    k=2,
    ks=(1, 2, 4),
    rs=(1, 2, 4),
    ms=(6, 8, 10, 12, 14, 16, 18, 20, 24, 28, 40),
    ts=(10, 20, 40, 160),
    seeds=2,
)
QUICK = dict(
    d=20,
    t=60,
    r=2,
    k=2,
    ks=(1, 3),
    rs=(1, 3),
    ms=(4, 8, 12, 16, 24),
    ts=(40, 80),
    seeds=1,
)
THRESHOLD = 1e-3
MAP_METHODS = ("amht", "oracle", "low_rank_only", "sparse_only", "local_ridge")


def _fits(r: int, k: int, U, methods):
    amht = lrs.AMHTConfig(rank=r, sparsity=k)
    cfg = baselines.BaselineConfig(rank=r, sparsity=k, ridge_grid=(1e-8, 1e-4, 1e-2))
    budget = baselines.BaselineConfig(rank=r, sparsity=r + k)
    every = {
        "amht": lambda data: lrs.fit(data, amht)[0],
        "oracle": lambda data: baselines.oracle(data, amht, U=U)[0],
        "low_rank_only": lambda data: baselines.low_rank_only(data, cfg)[0],
        "sparse_only": lambda data: baselines.sparse_only(data, budget)[0],
        "local_ridge": lambda data: baselines.local_ridge(data, cfg)[0],
    }
    return {name: every[name] for name in methods}


def success_curve(p, *, r, k, t, seeds, methods, desc):
    """``{method: (len(ms),) success fraction}`` at rank r, sparsity k, t users."""
    ms = p["ms"]
    hits = {name: np.zeros(len(ms)) for name in methods}
    for s in range(seeds):
        data, truth = lrs.synthetic.make_problem(
            jax.random.key(p["seed"] + 1000 * s + 7 * r + k),
            d=p["d"],
            t=t,
            m=max(ms),
            r=r,
            k=k,
        )
        for name, fit in _fits(r, k, truth.U, methods).items():
            for j, m in enumerate(c.progress(ms, f"{desc} {name} seed {s}")):
                if m < {"low_rank_only": r, "local_ridge": 1}.get(name, r + k):
                    continue  # fewer samples than unknowns: refused, a failure
                train, _ = c.split_samples(data, max(ms), m)
                params = c.safe(lambda d, key: fit(d), train, None)
                ok = (
                    params is not None
                    and float(lrs.metrics.relative_error(params, truth)) <= THRESHOLD
                )
                hits[name][j] += ok / seeds
    return hits


def phase_map(p, seeds, axis: str):
    """Success maps over (m, k) at rank r (``axis='k'``) or (m, r) at sparsity k."""
    values = p["ks"] if axis == "k" else p["rs"]
    maps = {name: [] for name in MAP_METHODS}
    for v in c.progress(values, f"{axis} values"):
        r, k = (p["r"], v) if axis == "k" else (v, p["k"])
        curve = success_curve(
            p, r=r, k=k, t=p["t"], seeds=seeds, methods=MAP_METHODS, desc=f"{axis}={v}"
        )
        for name in MAP_METHODS:
            maps[name].append(curve[name].tolist())
    m50 = {
        name: [theory.fifty_percent_point(p["ms"], row) for row in rows]
        for name, rows in maps.items()
    }
    shape = [
        theory.per_user_samples(p["r"], v, p["d"])
        if axis == "k"
        else theory.per_user_samples(v, p["k"], p["d"])
        for v in values
    ]
    constants = {name: _constant(shape, m50[name]) for name in ("amht", "oracle")}
    return dict(
        axis=axis,
        values=list(values),
        success=maps,
        m50=m50,
        theory_shape=shape,
        fitted_c=constants,
    )


def _constant(shape, measured):
    try:
        return theory.fit_constant(shape, measured)
    except ValueError:
        return None


def gap_vs_t(p, seeds):
    """50% points of AMHT-LRS and the oracle for each t (r, k fixed)."""
    out = dict(ts=list(p["ts"]), amht=[], oracle=[], success={})
    for t in c.progress(p["ts"], "t values"):
        curve = success_curve(
            p,
            r=p["r"],
            k=p["k"],
            t=t,
            seeds=seeds,
            methods=("amht", "oracle"),
            desc=f"t={t}",
        )
        out["success"][t] = {name: v.tolist() for name, v in curve.items()}
        for name in ("amht", "oracle"):
            out[name].append(theory.fifty_percent_point(p["ms"], curve[name]))
    out["gap"] = [a - o for a, o in zip(out["amht"], out["oracle"], strict=True)]
    return out


def run(args) -> dict:
    start = c.setup(args)
    p = dict(QUICK if args.quick else FULL) | dict(seed=args.seed)
    seeds = args.seeds or p["seeds"]
    record = dict(
        experiment="phase_transition", params=p, seeds=seeds, threshold=THRESHOLD
    )
    record["seed_rule"] = "data key = seed + 1000 * (seed index) + 7 r + k"
    record["mk"] = phase_map(p, seeds, "k")
    record["mr"] = phase_map(p, seeds, "r")
    record["gap"] = gap_vs_t(p, seeds)
    record["environment"] = c.environment(args, start)
    c.save_json(args.out, "phase_transition.json", record)
    plot_map(record, "mk", f"{args.out}/phase_mk.png")
    plot_map(record, "mr", f"{args.out}/phase_mr.png")
    plot_gap(record, f"{args.out}/phase_gap_vs_t.png")
    for key in ("mk", "mr"):
        res = record[key]
        print(f"50% points over {key} ({res['axis']} = {res['values']}):")
        for name, pts in res["m50"].items():
            print(f"  {name:14s} " + " ".join(f"{x:6.1f}" for x in pts))
        print(f"  fitted c (m50 / (r + k log(e d / k))): {res['fitted_c']}")
    g = record["gap"]
    print(
        "t:", g["ts"], "m50 amht:", g["amht"], "oracle:", g["oracle"], "gap:", g["gap"]
    )
    return record


def plot_map(record, key: str, path: str) -> None:
    res, p = record[key], record["params"]
    fig, axes = c.figure(1, 1, size=(7, 5))
    ax = axes[0][0]
    ms, values = np.asarray(p["ms"]), np.asarray(res["values"])
    grid = np.asarray(res["success"]["amht"])
    mesh = ax.pcolormesh(
        ms, values, grid, shading="nearest", cmap="Greys", alpha=0.6, vmin=0, vmax=1
    )
    fig.colorbar(mesh, ax=ax, label="AMHT-LRS success probability")
    styles = dict(
        amht=("C3", "o-"),
        oracle=("C0", "s--"),
        low_rank_only=("C1", "v-"),
        sparse_only=("C2", "^-"),
        local_ridge=("C4", "D-"),
    )
    for name, (color, style) in styles.items():
        pts = np.asarray(res["m50"][name], float)
        if np.isfinite(pts).any():
            ax.plot(pts, values, style, color=color, label=f"{name} 50%")
        else:
            ax.plot([], [], "x", color=color, label=f"{name}: never 50%")
    axis = res["axis"]
    cfit = res["fitted_c"]["amht"]
    if cfit:
        ax.plot(
            cfit * np.asarray(res["theory_shape"]),
            values,
            "k--",
            label=f"{cfit:.2f} (r + k log(ed/k))",
        )
    ax.plot(
        values + (p["r"] if axis == "k" else p["k"]),
        values,
        ":",
        color="gray",
        label="m = r + k",
    )
    ax.set_xscale("log")
    ax.set_xlabel("samples per user m")
    ax.set_ylabel(axis)
    fixed = f"r = {p['r']}" if axis == "k" else f"k = {p['k']}"
    ax.set_title(
        f"success (rel. error <= {record['threshold']:g}), d = {p['d']}, "
        f"t = {p['t']}, {fixed}"
    )
    ax.legend(fontsize=7, loc="upper left")
    c.save(fig, path)


def plot_gap(record, path: str) -> None:
    g, p = record["gap"], record["params"]
    fig, axes = c.figure(1, 1)
    ax = axes[0][0]
    ax.plot(g["ts"], g["amht"], "o-", color="C3", label="AMHT-LRS 50% point")
    ax.plot(g["ts"], g["oracle"], "s-", color="C0", label="oracle (U known)")
    ax.plot(g["ts"], g["gap"], "^--", color="k", label="gap (price of unknown U)")
    ax.set_xscale("log")
    ax.set_xlabel("users t")
    ax.set_ylabel("samples per user m")
    ax.set_title(f"d = {p['d']}, r = {p['r']}, k = {p['k']}")
    ax.legend(fontsize=8)
    c.save(fig, path)


def main(argv=None):
    p = c.parser(__doc__.splitlines()[0], "results/phase")
    p.add_argument("--seeds", type=int, default=None, help="seeds per cell")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
