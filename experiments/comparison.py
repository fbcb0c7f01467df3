"""Comparison table: held-out test MSE of AMHT-LRS and every baseline.

    python experiments/comparison.py --out results/comparison      # ~5 min, 2 cores
    python experiments/comparison.py --quick --out /tmp/comparison

Four planted truths -- low rank + sparse, pure low rank, pure sparse (the
planted ``v_i = 0``), misspecified (low rank + sparse + a dense perturbation
of 20% of the model's norm) -- in a data-scarce regime (``m = r + k + 2``
training samples per user) and a data-rich one (``m = d``), label noise
``sigma``. Every method gets the same ``(r, k)``; ``sparse_only`` gets the
same per-user budget ``r + k`` of nonzeros. Each user's test samples are
held out. Writes ``comparison.json`` and ``comparison.png`` under ``--out``.
"""

from __future__ import annotations

import sys

import _common as c
import jax
import jax.numpy as jnp
import numpy as np

import lrs

TRUTHS = ("low_rank_plus_sparse", "low_rank", "sparse", "misspecified")
FULL = dict(d=40, t=200, r=3, k=3, m_test=20, noise=0.1, seeds=3, convex_steps=200)
QUICK = dict(d=20, t=100, r=2, k=2, m_test=10, noise=0.1, seeds=1, convex_steps=50)


def make_truth(kind: str, key, *, d, t, m, r, k, noise):
    """``(data, truth)`` of one kind; ``truth`` is the planted LRS part."""
    kp, kd = jax.random.split(key)
    sizes = dict(d=d, t=t, m=m, r=r, noise=noise)
    if kind == "low_rank":
        return lrs.synthetic.make_problem(kp, **sizes, k=0)
    if kind == "sparse":
        return lrs.synthetic.make_problem(kp, **sizes, k=k, v_scale=0.0)
    data, truth = lrs.synthetic.make_problem(kp, **sizes, k=k)
    if kind == "misspecified":
        W = lrs.weights(truth)
        scale = 0.2 * jnp.linalg.norm(W) / jnp.sqrt(W.size)
        delta = scale * jax.random.normal(kd, W.shape, W.dtype)
        extra = jnp.einsum("tmd,td->tm", data.X, delta)
        data = data._replace(y=jnp.where(data.mask, data.y + extra, 0))
    elif kind != "low_rank_plus_sparse":
        raise ValueError(f"kind must be one of {TRUTHS}; got {kind!r}")
    return data, truth


def run(args, sizes: dict | None = None) -> dict:
    """The experiment; ``sizes`` overrides the FULL / QUICK settings (tests)."""
    start = c.setup(args)
    p = dict(QUICK if args.quick else FULL) | (sizes or {})
    if args.seeds is not None:
        p["seeds"] = args.seeds
    regimes = {"scarce": p["r"] + p["k"] + 2, "rich": p["d"]}
    m_train = max(regimes.values())
    rows = []
    cells = [(s, kind) for s in range(p["seeds"]) for kind in TRUTHS]
    for s, kind in c.progress(cells, "truth x seed"):
        seed = args.seed + s
        data, truth = make_truth(
            kind,
            jax.random.key(seed),
            d=p["d"],
            t=p["t"],
            m=m_train + p["m_test"],
            r=p["r"],
            k=p["k"],
            noise=p["noise"],
        )
        fits = c.fitters(
            p["r"],
            p["k"],
            U=truth.U,
            convex_steps=p["convex_steps"],
            grid=p.get("convex_grid"),
        )
        for regime, m in regimes.items():
            train, test = c.split_samples(data, m_train, m)
            for name, fit in fits.items():
                params = c.safe(fit, train, jax.random.key(seed))
                rows.append(
                    dict(
                        truth=kind,
                        regime=regime,
                        m=m,
                        seed=seed,
                        method=name,
                        test_mse=None if params is None else c.mse(params, test),
                        train_mse=None if params is None else c.mse(params, train),
                    )
                )
    record = dict(
        experiment="comparison",
        params=p,
        regimes=regimes,
        truths=TRUTHS,
        noise_mse_floor=p["noise"] ** 2,
        rows=rows,
        table=table(rows),
    )
    record["environment"] = c.environment(args, start)
    c.save_json(args.out, "comparison.json", record)
    plot(record, f"{args.out}/comparison.png")
    print(markdown(record))
    return record


def table(rows) -> dict:
    """``{truth: {regime: {method: mean test MSE over seeds}}}``."""
    out = {}
    for row in rows:
        cell = out.setdefault(row["truth"], {}).setdefault(row["regime"], {})
        cell.setdefault(row["method"], []).append(row["test_mse"])
    for regimes in out.values():
        for methods in regimes.values():
            for name, values in methods.items():
                ok = [v for v in values if v is not None]
                methods[name] = float(np.mean(ok)) if ok else None
    return out


def markdown(record) -> str:
    """The table, best non-oracle method per row in bold."""
    methods = c.METHODS
    lines = [
        "| truth | regime (m) | " + " | ".join(methods) + " |",
        "|---|---|" + "---:|" * len(methods),
    ]
    for truth, regimes in record["table"].items():
        for regime, values in regimes.items():
            rivals = {
                k: v for k, v in values.items() if k != "oracle" and v is not None
            }
            best = min(rivals, key=rivals.get) if rivals else None
            cells = []
            for name in methods:
                v = values.get(name)
                text = "fail" if v is None else f"{v:.3g}"
                cells.append(f"**{text}**" if name == best else text)
            m = record["regimes"][regime]
            lines.append(f"| {truth} | {regime} ({m}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(record, path: str) -> None:
    fig, axes = c.figure(2, 1, size=(6, 4))
    width = 0.8 / len(c.METHODS)
    for ax, regime in zip(axes[0], record["regimes"], strict=True):
        for j, name in enumerate(c.METHODS):
            ys = [
                record["table"][t][regime].get(name) or np.nan for t in record["truths"]
            ]
            xs = np.arange(len(ys)) + (j - len(c.METHODS) / 2 + 0.5) * width
            ax.bar(xs, ys, width, label=name)
        ax.axhline(record["noise_mse_floor"], color="k", ls="--", lw=1, label="noise")
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(record["truths"])), record["truths"], fontsize=8)
        ax.set_title(f"{regime}: m = {record['regimes'][regime]} per user")
        ax.set_ylabel("test MSE (held-out samples)")
    axes[0][0].legend(fontsize=7)
    c.save(fig, path)


def main(argv=None):
    p = c.parser(__doc__.splitlines()[0], "results/comparison")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
