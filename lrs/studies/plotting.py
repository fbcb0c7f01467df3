"""The one plotting style of the studies and experiments; matplotlib only here.

Every figure of ``lrs demo``, ``lrs dp``, ``lrs audit``, ``lrs transformer``
and the scripts in ``experiments/`` is made by :func:`figure` and written by
:func:`save`: the same panel size, layout, resolution, grid and reference
colours. The numerical core never imports this module. matplotlib is imported
lazily, and figures are drawn on an explicit Agg canvas, so plotting neither
needs a display nor changes the global ``pyplot`` backend of the caller.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

__all__ = [
    "ALERT",
    "DPI",
    "FLOOR",
    "GRID_ALPHA",
    "PANEL",
    "REFERENCE",
    "colours",
    "figure",
    "grid",
    "plot_convergence",
    "save",
]

#: Width and height of one panel, in inches.
PANEL = (5.0, 4.2)
#: Resolution of every saved PNG.
DPI = 110
#: Opacity of the grid lines.
GRID_ALPHA = 0.3
#: Colour of reference lines: claims, baselines, theory slopes.
REFERENCE = "k"
#: Colour of floors (rounding level, noise level).
FLOOR = "gray"
#: Colour that marks a broken or failing entry.
ALERT = "C3"


def figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = PANEL):
    """A figure of ``nrows x ncols`` panels of ``size`` inches each.

    Drawn on an Agg canvas (no display, no pyplot state), constrained layout.
    Returns ``(figure, axes)`` with ``axes`` a ``(nrows, ncols)`` array.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def grid(ax, which: str = "major") -> None:
    """The grid of every panel."""
    ax.grid(True, which=which, alpha=GRID_ALPHA)


def colours(names: Sequence[str]) -> dict[str, str]:
    """One colour of the default cycle per name, in order (stable across panels)."""
    return {name: f"C{i}" for i, name in enumerate(names)}


def save(fig, path: str | os.PathLike) -> str:
    """Writes ``fig`` as a PNG at :data:`DPI`; returns the path as a string."""
    fig.savefig(os.fspath(path), dpi=DPI)
    return os.fspath(path)


def _series(values: Sequence | None) -> list[float]:
    """Floats, with None / NaN / inf / non-positive entries as NaN (log axes)."""
    out = []
    for v in values or ():
        x = math.nan if v is None else float(v)
        out.append(x if math.isfinite(x) and x > 0 else math.nan)
    return out


def _has_data(ys: list[float]) -> bool:
    return any(not math.isnan(y) for y in ys)


def plot_convergence(
    diagnostics: Mapping[str, Sequence],
    path: str | os.PathLike,
    title: str = "AMHT-LRS convergence",
    *,
    floor: float | None = None,
) -> str:
    """Saves a PNG of error and loss against the iteration (``lrs demo``'s plot).

    Args:
      diagnostics: plain per-iteration lists (entry ``i`` after iteration ``i``,
        0 = initialization). Uses the keys ``relative_error``,
        ``subspace_distance`` and ``loss`` where present, and ``iteration``
        for the x values (default ``0, 1, ...``). None / NaN entries are skipped.
      path: where to write the PNG.
      title: figure title.
      floor: if given, a dashed line at this error level (e.g. 100 x the dtype
        epsilon, below which the error is at rounding level).

    Returns:
      The path written, as a string.
    """
    errors = {
        "relative error  $\\|W-W^*\\|_F/\\|W^*\\|_F$": _series(
            diagnostics.get("relative_error")
        ),
        "subspace distance  $\\sin\\angle(U, U^*)$": _series(
            diagnostics.get("subspace_distance")
        ),
    }
    loss = _series(diagnostics.get("loss"))
    n = max([len(loss), *(len(v) for v in errors.values())], default=0)
    iters = list(diagnostics.get("iteration") or range(n))

    fig, axes = figure(2)
    ax_err, ax_loss = axes[0]

    for (label, ys), marker in zip(errors.items(), ("o", "s"), strict=True):
        if _has_data(ys):
            ax_err.plot(iters[: len(ys)], ys, marker=marker, ms=3, label=label)
    if floor is not None and _has_data(_series([floor])):
        ax_err.axhline(floor, color=FLOOR, ls="--", lw=1, label=f"floor {floor:.1e}")
    ax_err.set_yscale("log")
    ax_err.set_xlabel("iteration (0 = initialization)")
    ax_err.set_title("distance to the planted model")
    if ax_err.has_data():
        ax_err.legend(fontsize="small")
    grid(ax_err, "both")

    if _has_data(loss):
        ax_loss.plot(iters[: len(loss)], loss, marker="o", ms=3, color="C2")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("iteration (0 = initialization)")
    ax_loss.set_title("training loss (mean squared residual)")
    grid(ax_loss, "both")

    for ax in (ax_err, ax_loss):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    return save(fig, path)
