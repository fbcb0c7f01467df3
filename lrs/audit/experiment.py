"""The privacy audit behind ``lrs audit`` and ``experiments/privacy_audit.py``
(docs/privacy.md, section "Audit").

For each claimed epsilon: the canary audit of one noisy aggregation
(``level='step'``) and of the whole private fit (``level='fit'``) with the
crafted canary; the ordinary canary at the largest epsilon; and one
deliberately broken mechanism (half the noise) as a positive control.
Writes ``privacy_audit.json`` and ``privacy_audit.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax

from lrs.audit.canary import AuditProblem
from lrs.audit.run import AuditConfig, audit

EPSILONS = (1.0, 2.0, 4.0, 8.0)  # sorted: the last is the largest


@dataclasses.dataclass(frozen=True)
class Setting:
    """Sizes of one run of the audit experiment."""

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


QUICK = Setting(
    step_trials=20_000,
    fit_trials=200,
    fit_users=50,
    control_trials=100_000,
)


def _row(result, kind: str) -> dict:
    row = result.to_dict()
    row["kind"] = kind
    return row


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
    step_problem = AuditProblem(t=s.step_users)
    fit_problem = AuditProblem(t=s.fit_users)
    common = dict(delta=s.delta, confidence=s.confidence)
    jobs = []
    for eps in s.epsilons:
        step = AuditConfig(level="step", epsilon=eps, trials=s.step_trials, **common)
        jobs.append(("step, crafted canary", step, step_problem))
    for eps in s.epsilons:
        fit = AuditConfig(
            level="fit",
            epsilon=eps,
            trials=s.fit_trials,
            num_iters=s.fit_iters,
            batch_trials=500,
            **common,
        )
        jobs.append(("fit, crafted canary", fit, fit_problem))
    ordinary_step = AuditProblem(t=s.step_users, canary="ordinary")
    ordinary_fit = AuditProblem(t=s.fit_users, canary="ordinary")
    top_step = jobs[len(s.epsilons) - 1][1]  # the largest epsilon is most telling
    top_fit = jobs[-1][1]
    jobs.append(("step, ordinary canary", top_step, ordinary_step))
    jobs.append(("fit, ordinary canary", top_fit, ordinary_fit))
    control = AuditConfig(
        level="step",
        epsilon=s.control_epsilon,
        trials=s.control_trials,
        fault="half_noise",
        **common,
    )
    jobs.append(("step, crafted, BROKEN: half noise", control, step_problem))

    rows = []
    bar = progress(total=len(jobs), desc="audits", unit="audit") if progress else None
    start = time.perf_counter()
    for kind, config, problem in jobs:
        result = audit(config, problem, key=jax.random.fold_in(key, len(rows)))
        rows.append(_row(result, kind))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    results = dict(
        setting=dataclasses.asdict(s),
        quick=quick,
        seed=seed,
        seconds=time.perf_counter() - start,
        step_problem=dataclasses.asdict(step_problem),
        fit_problem=dataclasses.asdict(fit_problem),
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
            f"| {row['kind']} | {row['epsilon_claimed']:.3g} | {b['epsilon']:.3f} "
            f"| {b['estimate']:.3f} | {row['tightness']:.2f} | {row['trials']:,} "
            f"| {row['seconds']:.1f} | {'YES' if row['flagged'] else 'no'} |"
        )
    honest = [r for r in results["rows"] if r["fault"] is None]
    broken = [r for r in results["rows"] if r["fault"] is not None]
    ok = not any(r["flagged"] for r in honest) and all(r["flagged"] for r in broken)
    verdict = (
        "audit: every bound of the real mechanism stays below its claim and the "
        "broken control is flagged"
        if ok
        else "audit: UNEXPECTED -- a real mechanism was flagged or the broken "
        "control was not (see the table)"
    )
    lines.append("")
    lines.append(f"{verdict}; {results['seconds']:.0f} s in all")
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    rows = results["rows"]
    claims = sorted({r["epsilon_claimed"] for r in rows})
    ax.plot(claims, claims, "k--", lw=1, label="claim (bound must stay below)")
    styles = {
        "step, crafted canary": ("C0", "o"),
        "fit, crafted canary": ("C1", "s"),
        "step, ordinary canary": ("C2", "^"),
        "fit, ordinary canary": ("C4", "v"),
        "step, crafted, BROKEN: half noise": ("C3", "x"),
    }
    for kind, (color, marker) in styles.items():
        chosen = [r for r in rows if r["kind"] == kind]
        if not chosen:
            continue
        x = [r["epsilon_claimed"] for r in chosen]
        ax.plot(
            x,
            [r["bound"]["epsilon"] for r in chosen],
            marker=marker,
            color=color,
            ls="-" if len(chosen) > 1 else "none",
            label=f"{kind}: 95% lower bound",
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
    ax.set_title("Canary audit (hollow: point estimates)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
