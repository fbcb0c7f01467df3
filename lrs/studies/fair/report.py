"""The report: markdown tables and plots, from the record alone, and writing it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lrs.studies import plotting
from lrs.studies.fair.method_table import methods
from lrs.studies.fair.setup import VARIANTS
from lrs.studies.fair.stats import outcome, paired_outcome, pareto_front, t_interval

RESULTS_NAME = "fair_study.json"
PLOT_NAME = "fair_study.png"
DP_PLOT_NAME = "fair_study_dp.png"
TABLE_NAME = "fair_study.md"


def write(record: dict, out: Path) -> None:
    """Writes ``fair_study.json``, ``fair_study.md`` and ``fair_study.png``
    (and ``fair_study_dp.png`` when the record has a ``dp`` section)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_NAME).write_text(json.dumps(_plain(record), indent=1) + "\n")
    parts = [markdown(record)] if record["teachers"] else []
    if "dp" in record:
        parts.append(dp_markdown(record))
        plot_dp(record, out / DP_PLOT_NAME)
    (out / TABLE_NAME).write_text("\n\n".join(parts) + "\n")
    if record["teachers"]:
        plot(record, out / PLOT_NAME)


def _plain(x):
    """JSON-safe copy (tuples to lists, numpy scalars to Python, inf as strings)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _ci(c: dict) -> str:
    lo, hi = float(c["lo"]), float(c["hi"])
    if not math.isfinite(lo):
        return f"{float(c['mean']):.3f}"
    return f"{float(c['mean']):.3f} [{lo:.3f}, {hi:.3f}]"


_MARK = {"win": "W", "tie": "T", "loss": "L"}


def _notes(row: dict) -> str:
    notes = []
    for split, name in (("trained", "shared"), ("new", "cold")):
        part = row[split]
        last = sum(bool(x) for x in part.get("step_is_last", []))
        edge = sum(bool(x) for x in part.get("lr_at_edge", []))
        lrs = sorted({f"{x:g}" for x in part.get("lr", [])})
        steps = part.get("step", [])
        if lrs:
            notes.append(
                f"{name}: lr {'/'.join(lrs)}, step {'/'.join(map(str, steps))}"
                + (f", last x{last}" if last else "")
            )
        del edge  # the grid's edges are reported in the JSON (lr_at_edge)
    return "; ".join(notes)


def _judged(rows, split, variant):
    return [
        r
        for r in rows
        if split in r.get("vs_lrs", {})
        and (
            r["variant"] == variant or (r["variant"] == "base" and variant == "frozen")
        )
    ]


def markdown(record: dict) -> str:
    """The summary and per-teacher tables (LRS against every row) from a record.

    ``W`` / ``T`` / ``L``: LRS (the reference size, chosen on validation,
    same variant) wins / ties / loses against the row: a win or a loss only
    when the 95% intervals over seeds are disjoint. In parentheses, the
    paired comparison of the same seeds (:func:`paired_outcome`), for
    information.
    """
    lines = [
        "| teacher | users | variant | LRS reference | B/user | LRS wins | ties "
        "| LRS losses | losses to rows with >= LRS's bytes | paired W / T / L |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    per_teacher = []
    for t in record["teachers"]:
        rows = t["rows"]
        by = {(r["label"], r["variant"]): r for r in rows}
        for split in ("trained", "new"):
            for variant in VARIANTS:
                ref_label = t["references"].get(f"{variant}/{split}")
                if ref_label is None:
                    continue
                ref = by[(ref_label, variant)]
                judged = _judged(rows, split, variant)

                def count(kind, outcome, judged=judged):
                    return [r for r in judged if r["vs_lrs"][split][kind] == outcome]

                costly = [
                    r["label"]
                    for r in count("outcome", "loss")
                    if r["bytes_per_user"] >= ref["bytes_per_user"]
                ]
                paired = " / ".join(
                    str(len(count("paired", o))) for o in ("win", "tie", "loss")
                )
                who = "trained" if split == "trained" else "new (cold start)"
                lines.append(
                    f"| {t['teacher']} | {who} | {variant} | {ref_label} | "
                    f"{ref['bytes_per_user']} | {len(count('outcome', 'win'))} | "
                    f"{len(count('outcome', 'tie'))} | "
                    f"{len(count('outcome', 'loss'))} | "
                    f"{', '.join(costly) or 'none'} | {paired} |"
                )
        info = t["info"]
        personal = np.mean([i["personal_label_fraction"] for i in info])
        shift = np.mean([i["shift_fraction"] for i in info])
        block = [
            f"**Teacher `{t['teacher']}`**: personal labels {personal:.0%}, "
            f"constant (class-shift) share of the user effect {shift:.0%}; "
            f"accuracy mean [95% interval] over {len(info)} seeds.",
            "",
            "| method | variant | B/user | shared B | trained users | LRS | "
            "new users (cold start) | LRS | zero-shot | chosen lr, step |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            marks = []
            for split in ("trained", "new"):
                v = r.get("vs_lrs", {}).get(split)
                variant = r["variant"] if r["variant"] in VARIANTS else "frozen"
                ref = t["references"].get(f"{variant}/{split}")
                if v:
                    marks.append(
                        f"{_MARK[v['outcome']]} ({_MARK[v['paired']].lower()})"
                    )
                else:
                    marks.append("ref" if ref == r["label"] else "")
            zero = r["new"].get("zero_shot")
            block.append(
                f"| {r['label']} | {r['variant']} | {r['bytes_per_user']} | "
                f"{r['shared_bytes']} | {_ci(r['trained']['ci'])} | {marks[0]} | "
                f"{_ci(r['new']['ci'])} | {marks[1]} | "
                f"{_ci(zero['ci']) if zero else '-'} | {_notes(r)} |"
            )
        per_teacher.append("\n".join(block))
    return "\n\n".join(["\n".join(lines), *per_teacher])


def plot(record: dict, path) -> str:
    """Accuracy against bytes per user, per teacher and user group, with the front.

    Columns: teachers; rows: trained users, new users (cold start). Each
    method's sizes are joined (filled: frozen base, hollow: joint); error bars
    are the 95% intervals; the dashed line is the Pareto front of the means
    (global at 1 byte on the log axis).
    """
    teachers = record["teachers"]
    fig, axes = plotting.figure(len(teachers), 2)
    names = ["global", *dict.fromkeys(m.name for m in methods("all"))]
    colours = plotting.colours(names)
    for col, t in enumerate(teachers):
        for row_i, split in enumerate(("trained", "new")):
            ax = axes[row_i][col]
            points = []
            for name in names:
                for variant in ("base", *VARIANTS):
                    rows = [
                        r
                        for r in t["rows"]
                        if r["method"] == name and r["variant"] == variant
                    ]
                    if not rows:
                        continue
                    rows.sort(key=lambda r: r["bytes_per_user"])
                    x = [max(r["bytes_per_user"], 1) for r in rows]
                    y = [float(r[split]["ci"]["mean"]) for r in rows]
                    half = [float(r[split]["ci"]["half"]) for r in rows]
                    err = [  # the interval, clipped to accuracies in [0, 1]
                        [min(h, a) for h, a in zip(half, y)],
                        [min(h, 1 - a) for h, a in zip(half, y)],
                    ]
                    hollow = variant == "joint"
                    ax.errorbar(
                        x,
                        y,
                        yerr=err,
                        color=colours[name],
                        lw=1,
                        capsize=2,
                        marker="*" if name == "global" else ("s" if hollow else "o"),
                        mfc="white" if hollow else colours[name],
                        ms=5,
                        ls=":" if hollow else "-",
                        label=name if variant in ("base", "frozen") else None,
                    )
                    points += list(zip(x, y))
            front = [points[i] for i in pareto_front(points)]
            if front:
                ax.step(
                    [p[0] for p in front],
                    [p[1] for p in front],
                    where="post",
                    color=plotting.REFERENCE,
                    ls="--",
                    lw=1,
                    alpha=0.6,
                )
            ax.set_xscale("log")
            ax.set_xlabel("bytes per user (log; global at 1)")
            ax.set_ylabel("test accuracy")
            who = "trained users" if split == "trained" else "new users (cold start)"
            ax.set_title(f"{t['teacher']} teacher: {who}")
            plotting.grid(ax)
    axes[0][0].legend(fontsize=6, ncol=2)
    return plotting.save(fig, path)


def _eps_label(e) -> str:
    e = float(e)
    return "0 (shared not trained)" if e == 0 else ("inf (no noise)" if e == math.inf
                                                  else f"{e:g}")  # fmt: skip


def dp_markdown(record: dict) -> str:
    """The DP part's table (accuracy against epsilon) and its audit, from a record.

    Every row is compared with the ``inf`` row (the same training without
    clipping or noise) by :func:`outcome` (W / T / L of the non-private
    training: disjoint intervals) and, in parentheses, :func:`paired_outcome`.
    """
    part = record["dp"]
    by = {float(r["epsilon"]): r for r in part["rows"]}
    ref = by.get(math.inf)
    c = part["config"]
    seeds = len(part["rows"][0]["trained"]["acc"])
    lines = [
        f"**User-level DP** (teacher `{part['teacher']}`, {part['method']}, "
        f"{part['bytes_per_user']} B/user): shared phase DP-SGD on the base and "
        f"`U` (delta {c['delta']:g}, {c['steps']} steps, {c['users_per_step']} "
        f"users per step, clip {c['clip_norm']:g}, Adam {c['learning_rate']:g}), "
        f"personal rows fitted locally; accuracy mean [95% interval] over "
        f"{seeds} seeds.",
        "",
        "| epsilon | noise multiplier z | accountant | trained users | vs inf "
        "| new users (cold start) | vs inf | personal phase lr, step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    g = part["global"]
    lines.append(
        f"| global (no user rows) | - | - | {_ci(t_interval(g['trained']))} | | "
        f"{_ci(t_interval(g['new']))} | | |"
    )
    for r in part["rows"]:
        e = float(r["epsilon"])
        marks = []
        for split in ("trained", "new"):
            if ref is None or e == math.inf:
                marks.append("ref" if e == math.inf else "")
                continue
            rule = outcome(ref[split]["ci"], r[split]["ci"])
            pair = paired_outcome(ref[split]["acc"], r[split]["acc"])
            marks.append(f"{_MARK[rule]} ({_MARK[pair].lower()})")
        z = [float(x) for x in r["noise_multiplier"]]
        z_text = f"{z[0]:.3g}" if z and z[0] > 0 else "-"
        lrs_ = "/".join(sorted({f"{x:g}" for x in r["local"]["lr"]}))
        steps = "/".join(map(str, r["local"]["step"]))
        lines.append(
            f"| {_eps_label(e)} | {z_text} | "
            f"{r['accountant'] if z and z[0] > 0 else '-'} | "
            f"{_ci(r['trained']['ci'])} | {marks[0]} | {_ci(r['new']['ci'])} | "
            f"{marks[1]} | lr {lrs_}, step {steps} |"
        )
    a = part.get("audit")
    if a:
        lines += [
            "",
            f"**Audit of one step** (canary user, {a['trials']:,} runs per side, "
            f"{a['users']} users): claimed epsilon {a['epsilon_claimed']:.3f} at "
            f"delta {a['delta']:g} (z = {a['noise_multiplier']:.3f}); empirical "
            f"{a['confidence']:.0%} lower bound **{a['epsilon_lower_bound']:.3f}** "
            f"({'below' if a['below_claim'] else 'ABOVE'} the claim; canary "
            f"sensitivity used {a['sensitivity_used']:.2f} of 2 clip norms).",
        ]
    return "\n".join(lines)


def plot_dp(record: dict, path) -> str:
    """Accuracy against epsilon (trained and new users) with 95% intervals."""
    part = record["dp"]
    fig, axes = plotting.figure(1, 1, size=(6.0, 4.2))
    ax = axes[0][0]
    rows = part["rows"]
    x = np.arange(len(rows))
    for i, (split, name) in enumerate(
        (("trained", "trained users"), ("new", "new users (cold start)"))
    ):
        y = np.array([float(r[split]["ci"]["mean"]) for r in rows])
        half = np.array([float(r[split]["ci"]["half"]) for r in rows])
        ax.errorbar(x + 0.06 * (2 * i - 1), y, yerr=half, marker="o", capsize=3,
                    color=f"C{i}", label=name)  # fmt: skip
        glob = np.mean(part["global"][split])
        ax.axhline(glob, color=f"C{i}", ls=":", lw=1,
                   label=f"global model ({name})")  # fmt: skip
    ax.set_xticks(x, [_eps_label(r["epsilon"]).split(" (")[0] for r in rows])
    ax.set_xlabel(
        f"epsilon at delta {part['config']['delta']:g} (0: shared parts not trained)"
    )
    ax.set_ylabel("test accuracy")
    ax.set_title(f"user-level DP shared phase, {part['method']}, {part['teacher']}")
    plotting.grid(ax)
    ax.legend(fontsize=7)
    return plotting.save(fig, path)
