"""The privacy audit behind ``lrs audit`` and ``experiments/privacy_audit.py``
(docs/privacy.md, section "Audit").

For each claimed epsilon: the canary audit of one noisy aggregation
(``level='step'``) and of the whole private fit (``level='fit'``) with the
crafted canary, the fit scored by two attackers on the same runs (the final
U only, and the whole release transcript); at the largest epsilon the
ordinary canary, a float32 run and the overflow canary (a 1e20-scaled user in
float32); and two deliberately broken mechanisms that must be flagged: half
the noise, and one key reused by every run. Writes ``privacy_audit.json`` and
``privacy_audit.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import jax

from lrs.audit.canary import AuditProblem
from lrs.audit.run import AuditConfig, audit_attackers
from lrs.studies import plotting

EPSILONS = (1.0, 2.0, 4.0, 8.0)  # sorted: the last is the largest

#: Row names of the attackers of a fit (step audits have only 'final').
ATTACKER_NAMES = {"final": "", "transcript": ", transcript attacker"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """Sizes of one run of the audit study.

    ``float32_levels``: the levels of the float32 and overflow-canary audits,
    ``float32_trials`` and ``float32_fit_trials`` the runs per side of their
    step and fit audits;
    ``key_reuse_trials``: of the key-reuse control (a few suffice: every run
    repeats the same noise).
    """

    epsilons: tuple[float, ...] = EPSILONS
    delta: float = 1e-5
    confidence: float = 0.95
    step_trials: int = 1_000_000
    step_users: int = 50
    fit_trials: int = 3_000
    fit_users: int = 400
    fit_iters: int = 2
    control_trials: int = 1_000_000
    control_epsilon: float = 4.0
    float32_levels: tuple[str, ...] = ("step", "fit")
    float32_trials: int = 200_000
    float32_fit_trials: int = 1_000
    key_reuse_trials: int = 10_000
    key_reuse_epsilon: float = 1.0


#: About a minute on 2 cores, mostly compilation (one step and one fit program
#: per dtype): the float32 audits are step audits only.
QUICK = Setting(
    step_trials=20_000,
    fit_trials=100,
    fit_users=50,
    control_trials=100_000,
    float32_levels=("step",),
    float32_trials=20_000,
    float32_fit_trials=100,
)


def _row(result, kind: str) -> dict:
    row = result.to_dict()
    row["kind"] = kind
    return row


def _jobs(s: Setting) -> list[tuple[str, AuditConfig, AuditProblem]]:
    """``(kind, config, problem)`` of every audit of the table."""
    common = dict(delta=s.delta, confidence=s.confidence)
    step = functools.partial(AuditConfig, level="step", trials=s.step_trials, **common)
    fit = functools.partial(
        AuditConfig,
        level="fit",
        trials=s.fit_trials,
        num_iters=s.fit_iters,
        batch_trials=500,
        **common,
    )

    def problems(**kwargs):
        return AuditProblem(t=s.step_users, **kwargs), AuditProblem(
            t=s.fit_users, **kwargs
        )

    step_problem, fit_problem = problems()
    top = s.epsilons[-1]  # the largest epsilon is most telling
    jobs = [("step, crafted canary", step(epsilon=e), step_problem) for e in s.epsilons]
    jobs += [("fit, crafted canary", fit(epsilon=e), fit_problem) for e in s.epsilons]
    ordinary = ("step", "fit"), s.step_trials, s.fit_trials
    single = s.float32_levels, s.float32_trials, s.float32_fit_trials
    for name, kwargs, (levels, step_trials, fit_trials) in (
        ("ordinary canary", dict(canary="ordinary"), ordinary),
        ("crafted canary, float32", dict(dtype="float32"), single),
        (
            "overflow canary (1e20 user), float32",
            dict(canary="overflow", dtype="float32"),
            single,
        ),
    ):
        at_step, at_fit = problems(**kwargs)
        if "step" in levels:
            config = step(epsilon=top, trials=step_trials)
            jobs.append((f"step, {name}", config, at_step))
        if "fit" in levels:
            jobs.append((f"fit, {name}", fit(epsilon=top, trials=fit_trials), at_fit))
    half = step(epsilon=s.control_epsilon, trials=s.control_trials, fault="half_noise")
    jobs.append(("step, crafted, BROKEN: half noise", half, step_problem))
    reuse = step(
        epsilon=s.key_reuse_epsilon, trials=s.key_reuse_trials, fault="key_reuse"
    )
    jobs.append(("step, crafted, BROKEN: one key reused", reuse, step_problem))
    return jobs


def run(
    out,
    *,
    quick: bool = False,
    seed: int = 0,
    plot: bool = True,
    progress=None,
    setting: Setting | None = None,
) -> dict:
    """Runs the audits; writes ``privacy_audit.json`` (and PNG) into ``out``.

    ``progress``: a tqdm-like class, for a bar over the audits.
    """
    s = setting if setting is not None else (QUICK if quick else Setting())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(seed)
    jobs = _jobs(s)
    rows = []
    bar = progress(total=len(jobs), desc="audits", unit="audit") if progress else None
    start = time.perf_counter()
    # A quick run is mostly compilation: compile cheaply (the transformer study's
    # --quick does the same); results change only in the last digits.
    cheap = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", cheap or quick)
    try:
        for index, (kind, config, problem) in enumerate(jobs):
            found = audit_attackers(config, problem, key=jax.random.fold_in(key, index))
            for observe, result in found.items():
                rows.append(_row(result, kind + ATTACKER_NAMES[observe]))
            if bar is not None:
                bar.update(1)
    finally:
        jax.config.update("jax_disable_most_optimizations", cheap)
        if bar is not None:
            bar.close()
    results = dict(
        setting=dataclasses.asdict(s),
        quick=quick,
        seed=seed,
        seconds=time.perf_counter() - start,
        step_problem=dataclasses.asdict(AuditProblem(t=s.step_users)),
        fit_problem=dataclasses.asdict(AuditProblem(t=s.fit_users)),
        rows=rows,
    )
    (out / "privacy_audit.json").write_text(json.dumps(_finite(results), indent=1))
    if plot:
        _plot(results, out / "privacy_audit.png")
    return results


def _finite(tree):
    """JSON without Infinity/NaN: non-finite floats become None."""
    if isinstance(tree, dict):
        return {k: _finite(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_finite(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def _fmt(value, digits: int) -> str:
    """A figure of the table; ``None`` (an infinite value in the JSON) is inf."""
    return "inf" if value is None or value == math.inf else f"{value:.{digits}f}"


def summary(results: dict) -> str:
    """A Markdown table of the audits, and a one-line verdict."""
    lines = [
        "| audit | claimed eps | lower bound (95%) | point estimate | bound/claim "
        "| trials per side | seconds | flagged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        b = row["bound"]
        lines.append(
            f"| {row['kind']} | {row['epsilon_claimed']:.3g} | {_fmt(b['epsilon'], 3)} "
            f"| {_fmt(b['estimate'], 3)} | {_fmt(row['tightness'], 2)} "
            f"| {row['trials']:,} "
            f"| {row['seconds']:.1f} | {'YES' if row['flagged'] else 'no'} |"
        )
    honest = [r for r in results["rows"] if r["fault"] is None]
    broken = [r for r in results["rows"] if r["fault"] is not None]
    ok = not any(r["flagged"] for r in honest) and all(r["flagged"] for r in broken)
    verdict = (
        "audit: every bound of the real mechanism stays below its claim and every "
        "broken control is flagged"
        if ok
        else "audit: UNEXPECTED -- a real mechanism was flagged or a broken "
        "control was not (see the table)"
    )
    lines.append("")
    lines.append(f"{verdict}; {results['seconds']:.0f} s in all")
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    fig, axes = plotting.figure(size=(6.5, 5.0))
    ax = axes[0, 0]
    rows = results["rows"]
    claims = sorted({r["epsilon_claimed"] for r in rows})
    ax.plot(
        claims,
        claims,
        "--",
        color=plotting.REFERENCE,
        lw=1,
        label="claim (bound must stay below)",
    )
    kinds = list(dict.fromkeys(r["kind"] for r in rows))  # in table order
    markers = "osDv^<>pXh*P"
    for i, kind in enumerate(kinds):
        chosen = [r for r in rows if r["kind"] == kind]
        broken = chosen[0]["fault"] is not None
        color = plotting.ALERT if broken else f"C{[0, 1, 2, 4, 5, 6, 7, 8, 9][i % 9]}"
        marker = "x+"[i % 2] if broken else markers[i % len(markers)]
        x = [r["epsilon_claimed"] for r in chosen]
        ax.plot(
            x,
            [r["bound"]["epsilon"] for r in chosen],
            marker=marker,
            color=color,
            ls="-" if len(chosen) > 1 else "none",
            label=kind,
        )
        ax.plot(
            x,
            [min(r["bound"]["estimate"], 2 * max(claims)) for r in chosen],
            marker=marker,
            color=color,
            ls="none",
            mfc="none",
            alpha=0.5,
        )
    ax.set_xlabel(f"claimed epsilon (delta = {results['setting']['delta']:g})")
    ax.set_ylabel("audited epsilon")
    ax.set_title(
        "Canary audit: 95% lower bounds (hollow: point estimates)", fontsize=10
    )
    ax.legend(fontsize=6)
    plotting.save(fig, path)


def command(args: argparse.Namespace) -> int:
    """Runs ``lrs audit`` with the parsed ``args``; returns the exit status."""
    from tqdm import tqdm

    out = Path(args.out)
    results = run(out, quick=args.quick, seed=args.seed, plot=args.plot, progress=tqdm)
    print(summary(results))
    print(f"results: {out / 'privacy_audit.json'}")
    return 0
