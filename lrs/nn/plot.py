"""Plots of the transformer experiment from its saved results; matplotlib only here.

Drawn on an explicit Agg canvas (no display, the caller's pyplot untouched).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_results"]


def plot_results(results: dict, path) -> Path:
    """Accuracy vs per-user parameters (smallest m) and accuracy vs m, per kind.

    Rows: task kinds; columns: test accuracy of trained users and of new users
    against per-user parameters at the smallest m, then accuracy against m.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = sorted({s["kind"] for s in results["settings"]}, reverse=True)
    fig = Figure(figsize=(15, 4.2 * len(kinds)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(kinds), 3, squeeze=False)
    methods = [r["method"] for r in results["settings"][0]["rows"]]
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for row, kind in zip(axes, kinds):
        settings = sorted(
            (s for s in results["settings"] if s["kind"] == kind),
            key=lambda s: s["samples_per_user"],
        )
        scarce = settings[0]
        for col, split in enumerate(("trained_users", "new_users")):
            ax = row[col]
            for r in scarce["rows"]:
                x = max(r["per_user_floats"] + r["per_user_ints"], 0.5)
                ax.scatter(x, r[split]["accuracy"], color=colors[r["method"]], s=50)
                ax.annotate(
                    r["method"],
                    (x, r[split]["accuracy"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
            ax.set_xscale("log")
            ax.set_xlabel("per-user parameters (floats + indices; global at 0.5)")
            ax.set_ylabel("test accuracy")
            who = split.replace("_", " ")
            m = scarce["samples_per_user"]
            ax.set_title(f"{kind} teacher, m={m}: {who}")
            ax.grid(alpha=0.3)
        ax = row[2]
        for method in methods:
            ms = [s["samples_per_user"] for s in settings]
            acc = [
                next(r for r in s["rows"] if r["method"] == method)["new_users"][
                    "accuracy"
                ]
                for s in settings
            ]
            ax.plot(ms, acc, "o-", color=colors[method], label=method)
        ax.set_xscale("log")
        ax.set_xticks(ms, [str(v) for v in ms])
        ax.minorticks_off()
        ax.set_xlabel("samples per user m")
        ax.set_ylabel("new users' test accuracy")
        ax.set_title(f"{kind} teacher: cold start vs m")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)
