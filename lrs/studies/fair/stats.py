"""Statistics and the protocol's rules (pure numpy; tested without training).

Intervals over seeds, the win / tie / loss rule, the (rate, step) choice on
validation, the Pareto front, and the judging of every row against LRS.
"""

from __future__ import annotations

import math

import numpy as np

from lrs.studies.fair.setup import LEVEL, VARIANTS


def t_interval(values, level: float = LEVEL) -> dict:
    """Mean and Student-t interval of ``values`` (one per seed).

    Returns ``{"mean", "lo", "hi", "half", "n"}``; with one value the interval
    is unbounded (``lo = -inf``, ``hi = inf``): one seed proves nothing.
    """
    from scipy import stats  # scipy is a dependency of lrs; imported here only

    x = np.asarray(values, dtype=float)
    n = x.size
    if n == 0:
        raise ValueError("values must hold at least one number")
    mean = float(x.mean())
    if n == 1:
        return dict(mean=mean, lo=-math.inf, hi=math.inf, half=math.inf, n=1)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return dict(mean=mean, lo=mean - half, hi=mean + half, half=half, n=int(n))


def outcome(row: dict, reference: dict) -> str:
    """``"win"`` / ``"loss"`` / ``"tie"`` of ``reference`` against ``row``.

    Both are :func:`t_interval` dicts. The reference wins when its interval
    lies entirely above the row's, loses when entirely below; otherwise
    (overlapping intervals) it is a tie.
    """
    if reference["lo"] > row["hi"]:
        return "win"
    if reference["hi"] < row["lo"]:
        return "loss"
    return "tie"


def paired_outcome(row_values, reference_values, level: float = LEVEL) -> str:
    """:func:`outcome` on the per-seed differences (same seeds: paired).

    ``"win"`` when the interval of ``reference - row`` over seeds lies above
    0, ``"loss"`` when below, ``"tie"`` otherwise. More sensitive than
    :func:`outcome` (the seed-to-seed variation of the task cancels), and
    reported beside it, never instead of it.
    """
    d = np.asarray(reference_values, float) - np.asarray(row_values, float)
    c = t_interval(d, level)
    return "win" if c["lo"] > 0 else ("loss" if c["hi"] < 0 else "tie")


def select(val: np.ndarray) -> tuple[int, int]:
    """``(lr index, check index)`` of the best validation accuracy.

    ``val`` is ``(learning rates, checks)``; ties go to the smaller learning
    rate, then the earlier check.
    """
    val = np.asarray(val)
    flat = int(np.argmax(val))
    return flat // val.shape[1], flat % val.shape[1]


def pareto_front(points) -> list[int]:
    """Indices of the ``(bytes, accuracy)`` points no other point dominates.

    A point is dominated when another costs at most as many bytes and is at
    least as accurate, one of the two strictly. Sorted by bytes.
    """
    pts = [(float(b), float(a), i) for i, (b, a) in enumerate(points)]
    front = []
    for b, a, i in pts:
        if not any((b2 <= b and a2 >= a) and (b2 < b or a2 > a) for b2, a2, _ in pts):
            front.append((b, i))
    return [i for _, i in sorted(front)]


def choose(curves, grid, every) -> dict:
    """Per seed: the chosen (lr, step) on ``curves (S, L, checks)`` and flags."""
    lr_i, check = zip(*(select(c) for c in curves))
    last = curves.shape[2] - 1
    return dict(
        lr_index=list(lr_i),
        check=list(check),
        lr=[grid[i] for i in lr_i],
        step=[c * every for c in check],
        step_is_last=[c == last for c in check],
        lr_at_edge=[i in (0, len(grid) - 1) and len(grid) > 1 for i in lr_i],
    )


def references(rows: list[dict]) -> dict:
    """Per (variant, split): the LRS row with the best mean validation accuracy."""
    out = {}
    for variant in {r["variant"] for r in rows if r["method"] == "lrs"}:
        cands = [r for r in rows if r["method"] == "lrs" and r["variant"] == variant]
        for split in ("trained", "new"):
            best = max(cands, key=lambda r: np.mean(r[split]["val"]))
            out[f"{variant}/{split}"] = best["label"]
    return out


def judge(rows: list[dict], refs: dict) -> None:
    """Adds ``vs_lrs`` (``win`` / ``tie`` / ``loss`` of LRS) to every row, in place.

    Each row is compared with the reference LRS row of its variant (the
    ``global`` row with the ``frozen`` one) by :func:`outcome` (``outcome``:
    the rule) and :func:`paired_outcome` (``paired``: for information); a
    reference is not compared with itself.
    """
    by = {(r["label"], r["variant"]): r for r in rows}
    for r in rows:
        variant = r["variant"] if r["variant"] in VARIANTS else "frozen"
        r["vs_lrs"] = {}
        for split in ("trained", "new"):
            ref_label = refs.get(f"{variant}/{split}")
            if ref_label is None or (r["label"], r["variant"]) == (ref_label, variant):
                continue
            ref = by[(ref_label, variant)]
            r["vs_lrs"][split] = dict(
                reference=ref_label,
                outcome=outcome(r[split]["ci"], ref[split]["ci"]),
                paired=paired_outcome(r[split]["acc"], ref[split]["acc"]),
            )


def rejudge(record: dict) -> dict:
    """Recomputes every teacher's references and outcomes from its rows (in place)."""
    for t in record["teachers"]:
        t["references"] = references(t["rows"])
        judge(t["rows"], t["references"])
    return record
