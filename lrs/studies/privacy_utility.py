"""The privacy-utility study behind ``lrs dp`` and
``experiments/privacy_utility.py`` (docs/privacy.md, section 4).

Three parts, on planted problems y = <x, U* v* + b*> + N(0, noise^2) with a
held-out half of each user's samples:

* ``epsilon``: subspace distance of U and held-out test MSE versus epsilon,
  next to the non-private :func:`lrs.fit` on the same data;
* ``users``: the same at epsilon = 1 versus the number of users t, with the
  log-log slope of the privacy part of the error (theory: -1 for U);
* ``benchmark``: the issue's point d=50, r=3, k=3, m=50, t=50,000, epsilon=1,
  delta=1e-5, target private test MSE <= 1.5x non-private.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import numpy as np

import lrs
from lrs import private
from lrs.studies import plotting

EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)


@dataclasses.dataclass(frozen=True)
class Setting:
    """Sizes of one run of the experiment."""

    d: int = 50
    r: int = 3
    k: int = 3
    m: int = 50
    noise: float = 0.1
    delta: float = 1e-5
    private_iters: int = 5
    epsilon_users: int = 10_000
    user_counts: tuple[int, ...] = (2_000, 5_000, 10_000, 20_000, 50_000)
    benchmark_users: int = 50_000
    seeds: int = 2


QUICK = Setting(
    d=20,
    r=2,
    k=2,
    m=30,
    epsilon_users=1_000,
    user_counts=(1_000, 4_000),
    benchmark_users=4_000,
    seeds=1,
)


def _problem(setting: Setting, t: int, seed: int):
    """Train and held-out test halves of a planted problem, and the truth."""
    s = setting
    data, truth = lrs.synthetic.make_problem(
        jax.random.key(seed), d=s.d, t=t, m=2 * s.m, r=s.r, k=s.k, noise=s.noise
    )
    train = lrs.UserData(data.X[:, : s.m], data.y[:, : s.m], data.mask[:, : s.m])
    test = lrs.UserData(data.X[:, s.m :], data.y[:, s.m :], data.mask[:, s.m :])
    return train, test, truth


def test_mse(params: lrs.LRSParams, test: lrs.UserData) -> float:
    """Mean squared prediction error over the real samples of ``test``."""
    return float(lrs.metrics.mean_squared_error(params, test))


def _evaluate(params, test, truth, seconds) -> dict:
    return dict(
        subspace_distance=float(lrs.metrics.subspace_distance(params.U, truth.U)),
        test_mse=test_mse(params, test),
        relative_error=float(lrs.metrics.relative_error(params, truth)),
        seconds=seconds,
    )


def _non_private(setting, train, test, truth) -> dict:
    config = lrs.AMHTConfig(rank=setting.r, sparsity=setting.k)
    start = time.perf_counter()
    params, _ = lrs.fit(train, config)
    jax.block_until_ready(params)
    return _evaluate(params, test, truth, time.perf_counter() - start)


def _private(setting, train, test, truth, epsilon, seed) -> dict:
    """The private fit; ``epsilon=None``: the same algorithm without noise."""
    config = lrs.AMHTConfig(
        rank=setting.r, sparsity=setting.k, num_iters=setting.private_iters
    )
    if epsilon is None:
        dp = private.DPConfig(non_private=True)
    else:
        dp = private.DPConfig(epsilon=epsilon, delta=setting.delta)
    start = time.perf_counter()
    # Experiment keys: fixed so the study is reproducible. A real release
    # needs a fresh secret key (docs/privacy.md, "Keys").
    params, diagnostics = private.fit(
        train,
        config,
        dp,
        key=jax.random.key(10_000 + seed),
        nonprivate_diagnostics=True,
    )
    jax.block_until_ready(params)
    out = _evaluate(params, test, truth, time.perf_counter() - start)
    out["privacy"] = diagnostics.privacy.to_dict()
    exact = diagnostics.nonprivate
    out["nonprivate_diagnostics"] = dict(
        clipped_fraction=float(exact.clipped_fraction[-1]),
        training_loss=float(exact.loss[-1]),
        excluded_users=int(diagnostics.excluded.sum()),
    )
    return out


def _privacy_part(private_dist: float, baseline_dist: float) -> float:
    """The error beyond the non-private fit's, in quadrature (>= 0)."""
    return math.sqrt(max(private_dist**2 - baseline_dist**2, 0.0))


def run(
    out: Path,
    *,
    quick: bool,
    seed: int = 0,
    plot: bool = True,
    benchmark: bool = True,
    benchmark_only: bool = False,
    setting: Setting | None = None,
    progress=None,
) -> dict:
    """Runs the three parts; writes ``privacy_utility.json`` (and PNG) to ``out``.

    ``benchmark_only``: only the benchmark point; ``setting`` overrides the sizes
    (default :data:`QUICK` with ``quick``, else ``Setting()``).
    """
    if setting is None:
        setting = QUICK if quick else Setting()
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    if not benchmark_only:
        jobs += [("epsilon", setting.epsilon_users, s) for s in range(setting.seeds)]
        jobs += [
            ("users", t, s) for t in setting.user_counts for s in range(setting.seeds)
        ]
    if benchmark or benchmark_only:
        jobs.append(("benchmark", setting.benchmark_users, 0))
    bar = progress(total=len(jobs), desc="lrs dp") if progress else None
    results = dict(
        setting=dataclasses.asdict(setting),
        seed=seed,
        epsilon=[],
        users=[],
        benchmark=None,
        backend=jax.default_backend(),
    )
    fitted = {}  # (t, seed) -> the fits at epsilon = 1 and the baselines

    def at_epsilon_one(t, s):
        if (t, s) not in fitted:
            train, test, truth = _problem(setting, t, seed + s)
            fitted[t, s] = (
                (train, test, truth),
                dict(
                    seed=seed + s,
                    t=t,
                    epsilon=1.0,
                    private=_private(setting, train, test, truth, 1.0, seed + s),
                    noiseless=_private(setting, train, test, truth, None, seed + s),
                    non_private=_non_private(setting, train, test, truth),
                ),
            )
        return fitted[t, s]

    for part, t, s in jobs:
        (train, test, truth), entry = at_epsilon_one(t, s)
        if part == "epsilon":
            for eps in EPSILONS:
                row = (
                    entry["private"]
                    if eps == 1.0
                    else _private(setting, train, test, truth, eps, seed + s)
                )
                results["epsilon"].append(
                    dict(
                        seed=seed + s,
                        t=t,
                        epsilon=eps,
                        private=row,
                        noiseless=entry["noiseless"],
                        non_private=entry["non_private"],
                    )
                )
        elif part == "users":
            results["users"].append(entry)
        else:
            bench = dict(entry)
            bench["mse_ratio"] = (
                entry["private"]["test_mse"] / entry["non_private"]["test_mse"]
            )
            bench["target_met"] = bench["mse_ratio"] <= 1.5
            results["benchmark"] = bench
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    results["users_slope"] = _users_slope(results["users"])
    (out / "privacy_utility.json").write_text(json.dumps(results, indent=1))
    if plot and not benchmark_only:
        _plot(results, out / "privacy_utility.png")
    return results


def _users_slope(rows) -> dict:
    """Log-log slope of the privacy part of the U error (and MSE excess) vs t."""
    ts, parts, excess = [], [], []
    for row in rows:
        part = _privacy_part(
            row["private"]["subspace_distance"], row["non_private"]["subspace_distance"]
        )
        gap = row["private"]["test_mse"] - row["non_private"]["test_mse"]
        if part > 0 and gap > 0:
            ts.append(row["t"])
            parts.append(part)
            excess.append(gap)
    if len(set(ts)) < 2:
        return dict(
            subspace=None,
            mse_excess=None,
            predicted_subspace=-1.0,
            predicted_mse_excess=-2.0,
            points=len(ts),
        )
    log_t = np.log(ts)
    return dict(
        subspace=float(np.polyfit(log_t, np.log(parts), 1)[0]),
        mse_excess=float(np.polyfit(log_t, np.log(excess), 1)[0]),
        predicted_subspace=-1.0,
        predicted_mse_excess=-2.0,
        points=len(ts),
    )


def _plot(results: dict, path: Path) -> None:
    fig, axes = plotting.figure(3)
    axes = axes[0]
    rows = results["epsilon"]
    for ax, key, label in (
        (axes[0], "subspace_distance", "subspace distance of U"),
        (axes[1], "test_mse", "held-out test MSE"),
    ):
        eps = sorted({r["epsilon"] for r in rows})
        mean = [
            np.mean([r["private"][key] for r in rows if r["epsilon"] == e]) for e in eps
        ]
        base = np.mean([r["non_private"][key] for r in rows])
        ax.loglog(eps, mean, "o-", label="private AMHT-LRS")
        ax.axhline(base, color=plotting.REFERENCE, ls="--", label="non-private lrs.fit")
        ax.set_xlabel(f"epsilon (delta = {results['setting']['delta']:g})")
        ax.set_ylabel(label)
        ax.legend()
        plotting.grid(ax, "both")
    t = results["setting"]["epsilon_users"]
    axes[0].set_title(f"t = {t} users")
    axes[1].set_title(f"t = {t} users")
    users = results["users"]
    ax = axes[2]
    if users:
        ts = sorted({r["t"] for r in users})

        def mean_at(kind):
            return [
                np.mean([r[kind]["subspace_distance"] for r in users if r["t"] == x])
                for x in ts
            ]

        priv, base, lrs_fit = (
            mean_at("private"),
            mean_at("noiseless"),
            mean_at("non_private"),
        )
        part = [_privacy_part(p, b) for p, b in zip(priv, base)]
        ax.loglog(ts, priv, "o-", label="private (epsilon = 1)")
        ax.loglog(ts, base, "s--", label="same algorithm, no clipping/noise")
        ax.loglog(ts, lrs_fit, "d:", label="non-private lrs.fit")
        ax.loglog(ts, np.maximum(part, 1e-12), "^:", label="privacy part")
        slope = results["users_slope"]["subspace"]
        if slope is not None:
            ax.loglog(
                ts,
                part[0] * (np.asarray(ts) / ts[0]) ** -1.0,
                "-",
                color=plotting.REFERENCE,
                lw=0.8,
                label=f"theory slope -1 (fitted {slope:.2f})",
            )
        ax.set_xlabel("users t")
        ax.set_ylabel("subspace distance of U")
        ax.legend(fontsize=8)
        plotting.grid(ax, "both")
    plotting.save(fig, path)


def summary(results: dict) -> str:
    """A plain-text table of the results; exact (non-private) statistics apart."""
    lines = ["epsilon  subspace_dist  test_mse  (non-private: dist, mse)"]
    for row in results["epsilon"]:
        p, b = row["private"], row["non_private"]
        lines.append(
            f"{row['epsilon']:7g}  {p['subspace_distance']:13.4g}  "
            f"{p['test_mse']:8.4g}  ({b['subspace_distance']:.4g}, "
            f"{b['test_mse']:.4g})  seed {row['seed']}"
        )
    lines.append(
        "t        private_dist  noiseless_dist  lrs.fit_dist  private_mse  "
        "lrs.fit_mse  (epsilon = 1)"
    )
    for row in results["users"]:
        lines.append(
            f"{row['t']:<8d} {row['private']['subspace_distance']:12.4g}  "
            f"{row['noiseless']['subspace_distance']:14.4g}  "
            f"{row['non_private']['subspace_distance']:12.4g}  "
            f"{row['private']['test_mse']:11.5g}  "
            f"{row['non_private']['test_mse']:11.5g}"
        )
    slope = results["users_slope"]
    lines.append(
        f"privacy part of the U error vs t: fitted slope {slope['subspace']} "
        f"(theory -1); test-MSE excess slope {slope['mse_excess']} (theory -2)"
    )
    bench = results["benchmark"]
    if bench is not None:
        lines.append(
            f"benchmark t={bench['t']}: private test MSE "
            f"{bench['private']['test_mse']:.5g} vs non-private "
            f"{bench['non_private']['test_mse']:.5g} -> ratio "
            f"{bench['mse_ratio']:.3f} (target <= 1.5: "
            f"{'met' if bench['target_met'] else 'NOT met'}); subspace distance "
            f"{bench['private']['subspace_distance']:.3g} vs "
            f"{bench['non_private']['subspace_distance']:.3g}"
        )
    lines.append(
        "NOT PRIVATE (exact statistics of the raw training data, for this "
        "experiment only): clipped fraction at the last step, training loss"
    )
    rows = [(part, row) for part in ("epsilon", "users") for row in results[part]]
    rows += [("benchmark", bench)] if bench is not None else []
    for part, row in rows:
        exact = row["private"]["nonprivate_diagnostics"]
        lines.append(
            f"  {part}: t={row['t']} epsilon={row['epsilon']:g} "
            f"seed {row['seed']}: clipped {exact['clipped_fraction']:.3f}, "
            f"loss {exact['training_loss']:.4g}"
        )
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    """Runs ``lrs dp`` with the parsed ``args``; returns the exit status."""
    from tqdm import tqdm

    out = Path(args.out)
    results = run(
        out,
        quick=args.quick,
        seed=args.seed,
        plot=args.plot,
        benchmark=args.benchmark,
        benchmark_only=args.benchmark_only,
        progress=tqdm,
    )
    print(summary(results))
    print(f"results: {out / 'privacy_utility.json'}")
    return 0
