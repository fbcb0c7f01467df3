"""Noise: relative error versus sigma (slope 1) and versus m at fixed sigma,
for AMHT-LRS and the oracle, against ``lrs.theory.relative_noise_floor``.

    python experiments/noise_scaling.py --out results/noise   # ~3 min, 2 cores
    python experiments/noise_scaling.py --quick --out /tmp/noise

The prediction has an exact per-user term and a shared-factor term whose
constant ``c`` is unknown: it is fitted to the AMHT-LRS sigma sweep (median
of the per-sigma estimates) and reported; the m sweep is then a check of the
prediction, not a fit. The m sweep masks one generated data set (nested
samples). Float64. Writes ``noise_scaling.json`` and
``noise_scaling.png``.
"""

from __future__ import annotations

import sys

import _common as c
import jax
import numpy as np

import lrs
from lrs import baselines, theory

FULL = dict(
    d=50,
    t=300,
    r=3,
    k=3,
    m=30,
    sigma=0.05,
    seeds=2,
    sigmas=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 2e-1),
    ms=(12, 15, 20, 30, 40, 60, 80),
)
QUICK = dict(
    d=20,
    t=100,
    r=2,
    k=2,
    m=20,
    sigma=0.05,
    seeds=1,
    sigmas=(1e-3, 1e-2, 1e-1),
    ms=(10, 20, 30),
)


def _errors(data, truth, config):
    amht, _ = lrs.fit(data, config)
    oracle, _ = baselines.oracle(data, config, U=truth.U)
    return [float(lrs.metrics.relative_error(p, truth)) for p in (amht, oracle)]


def shared_constant(measured, sigmas, predict) -> float:
    """``c`` of the shared term from the sigma sweep: the median over sigma of
    ``(measured^2 - own^2) / shared^2`` (robust to the largest sigmas, where
    support errors add a non-linear part). ``predict(sigma, c)``."""
    own = np.array([predict(s, 0.0) for s in sigmas])
    shared_sq = np.array([predict(s, 1.0) for s in sigmas]) ** 2 - own**2
    return float(max(np.median((np.asarray(measured) ** 2 - own**2) / shared_sq), 0))


def run(args) -> dict:
    args.x64 = True
    start = c.setup(args)
    p = dict(QUICK if args.quick else FULL)
    config = lrs.AMHTConfig(rank=p["r"], sparsity=p["k"])
    size = dict(d=p["d"], t=p["t"], r=p["r"], k=p["k"])
    by_sigma = np.zeros((p["seeds"], len(p["sigmas"]), 2))
    by_m = np.zeros((p["seeds"], len(p["ms"]), 2))
    for s in range(p["seeds"]):
        key = jax.random.key(args.seed + s)
        for j, sigma in enumerate(c.progress(p["sigmas"], f"sigma, seed {s}")):
            data, truth = lrs.synthetic.make_problem(key, **size, m=p["m"], noise=sigma)
            by_sigma[s, j] = _errors(data, truth, config)
        data, truth = lrs.synthetic.make_problem(
            key, **size, m=max(p["ms"]), noise=p["sigma"]
        )
        for j, m in enumerate(c.progress(p["ms"], f"m, seed {s}")):
            train, _ = c.split_samples(data, max(p["ms"]), m)
            by_m[s, j] = _errors(train, truth, config)
    by_sigma, by_m = by_sigma.mean(0), by_m.mean(0)  # mean over seeds

    def shape(sigma, m, const):
        return theory.relative_noise_floor(sigma, m=m, **size, c=const)

    fitted_c = shared_constant(
        by_sigma[:, 0], p["sigmas"], lambda s, k: shape(s, p["m"], k)
    )
    record = dict(
        experiment="noise_scaling",
        params=p,
        sigma_sweep=dict(
            sigmas=list(p["sigmas"]),
            amht=by_sigma[:, 0],
            oracle=by_sigma[:, 1],
            predicted=[shape(s, p["m"], fitted_c) for s in p["sigmas"]],
            slope_amht=theory.log_slope(p["sigmas"], by_sigma[:, 0]),
            slope_oracle=theory.log_slope(p["sigmas"], by_sigma[:, 1]),
        ),
        m_sweep=dict(
            ms=list(p["ms"]),
            amht=by_m[:, 0],
            oracle=by_m[:, 1],
            predicted=[shape(p["sigma"], m, fitted_c) for m in p["ms"]],
            predicted_own=[shape(p["sigma"], m, 0.0) for m in p["ms"]],
        ),
        fitted_c=fitted_c,
        note="theory.relative_noise_floor, c fitted to the AMHT-LRS sigma sweep",
    )
    record["environment"] = c.environment(args, start)
    c.save_json(args.out, "noise_scaling.json", record)
    plot(record, f"{args.out}/noise_scaling.png")
    ss, ms = record["sigma_sweep"], record["m_sweep"]
    print(
        f"slope vs sigma: AMHT-LRS {ss['slope_amht']:.3f}, oracle "
        f"{ss['slope_oracle']:.3f}; fitted shared constant c = {fitted_c:.3g}"
    )
    for m, a, o, pr in zip(
        ms["ms"], ms["amht"], ms["oracle"], ms["predicted"], strict=True
    ):
        print(f"m={m:3d}: amht {a:.3e} oracle {o:.3e} predicted {pr:.3e}")
    return record


def plot(record, path: str) -> None:
    fig, axes = c.figure(2, 1, size=(5, 4))
    ss, ms = record["sigma_sweep"], record["m_sweep"]
    ax = axes[0][0]
    ax.loglog(
        ss["sigmas"],
        ss["amht"],
        "o-",
        color="C3",
        label=f"AMHT-LRS (slope {ss['slope_amht']:.2f})",
    )
    ax.loglog(
        ss["sigmas"],
        ss["oracle"],
        "s-",
        color="C0",
        label=f"oracle (slope {ss['slope_oracle']:.2f})",
    )
    ax.loglog(ss["sigmas"], ss["predicted"], "k--", label="theory (c fitted)")
    ax.set_xlabel("noise sigma")
    ax.set_ylabel("relative error")
    ax.set_title(f"m = {record['params']['m']}")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ax.loglog(ms["ms"], ms["amht"], "o-", color="C3", label="AMHT-LRS")
    ax.loglog(ms["ms"], ms["oracle"], "s-", color="C0", label="oracle")
    ax.loglog(ms["ms"], ms["predicted"], "k--", label="theory (c fitted)")
    ax.loglog(ms["ms"], ms["predicted_own"], "k:", label="per-user term only")
    ax.set_xlabel("samples per user m")
    ax.set_title(f"sigma = {record['params']['sigma']}")
    ax.legend(fontsize=8)
    c.save(fig, path)


def main(argv=None):
    return run(c.parser(__doc__.splitlines()[0], "results/noise").parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
