"""Storage: parameters and bytes per user of every method, against per-user
full fine-tuning (d numbers per user), with each method's test MSE.

    python experiments/storage.py --out results/storage   # ~2 min, 2 cores
    python experiments/storage.py --quick --out /tmp/storage

Fits every method on one planted low rank + sparse problem and reads the
sizes off the returned ``LRSParams``: per user ``r`` coordinates, ``k``
values and ``k`` indices (stored as int32: 4 bytes; ``ceil(log2 d)`` bits
would do), plus the shared ``d r`` numbers of ``U`` divided by ``t``.
``local_ridge`` stores ``d`` dense numbers (no indices); ``global_model``'s
``w`` is shared (its per-user ``V`` entries are all equal) and only its
sparse fine-tune is per user. float32 values: 4 bytes. Writes
``storage.json`` and ``storage.png``.
"""

from __future__ import annotations

import math
import sys

import _common as c
import jax

import lrs

FULL = dict(d=100, t=500, m=30, m_test=20, r=5, k=5, noise=0.1)
QUICK = dict(d=20, t=60, m=20, m_test=10, r=2, k=2, noise=0.1)


def storage(name: str, params, t: int, d: int) -> dict:
    """Per-user numbers, indices and bytes (shared part amortized over t)."""
    r, k = params.U.shape[1], params.B.indices.shape[1]
    values, indices, shared = r + k, k, d * r
    if name == "local_ridge":  # dense rows: the indices are implicit
        values, indices, shared = d, 0, 0
    elif name == "global_model":  # w is shared, V repeats ||w||
        values, shared = k, d
    index_bits = math.ceil(math.log2(d))
    return dict(
        values=values,
        indices=indices,
        shared_numbers=shared,
        bytes_per_user=4 * (values + indices),
        bytes_per_user_packed=4 * values + math.ceil(indices * index_bits / 8),
        amortized_bytes_per_user=4 * (values + indices) + 4 * shared / t,
        fraction_of_full=(values + indices) / d,
    )


def run(args) -> dict:
    start = c.setup(args)
    p = dict(QUICK if args.quick else FULL)
    data, truth = lrs.synthetic.make_problem(
        jax.random.key(args.seed),
        d=p["d"],
        t=p["t"],
        m=p["m"] + p["m_test"],
        r=p["r"],
        k=p["k"],
        noise=p["noise"],
    )
    train, test = c.split_samples(data, p["m"])
    rows = {}
    fits = c.fitters(p["r"], p["k"], U=truth.U)
    for name, fit in c.progress(list(fits.items()), "methods"):
        params = c.safe(fit, train, jax.random.key(args.seed))
        if params is None:
            continue
        rows[name] = storage(name, params, p["t"], p["d"]) | dict(
            test_mse=c.mse(params, test),
            rank=params.U.shape[1],
            sparsity=params.B.indices.shape[1],
        )
    rows["full_fine_tune"] = dict(
        values=p["d"],
        indices=0,
        shared_numbers=0,
        bytes_per_user=4 * p["d"],
        bytes_per_user_packed=4 * p["d"],
        amortized_bytes_per_user=4 * p["d"],
        fraction_of_full=1.0,
        test_mse=rows.get("local_ridge", {}).get("test_mse"),
    )
    record = dict(
        experiment="storage",
        params=p,
        rows=rows,
        note="full_fine_tune's test MSE is local_ridge's (d dense numbers)",
    )
    record["environment"] = c.environment(args, start)
    c.save_json(args.out, "storage.json", record)
    plot(record, f"{args.out}/storage.png")
    print(markdown(record))
    return record


def markdown(record) -> str:
    lines = [
        "| method | values / user | indices / user | bytes / user (int32 idx) | "
        "bytes / user (packed idx) | + shared, amortized | vs full | test MSE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in record["rows"].items():
        mse = row.get("test_mse")
        lines.append(
            f"| {name} | {row['values']} | {row['indices']} | {row['bytes_per_user']} "
            f"| {row['bytes_per_user_packed']} | {row['amortized_bytes_per_user']:.1f} "
            f"| {row['fraction_of_full']:.2f} | "
            + ("-" if mse is None else f"{mse:.3g}")
            + " |"
        )
    return "\n".join(lines)


def plot(record, path: str) -> None:
    fig, axes = c.figure(1, 1, size=(6, 4.5))
    ax = axes[0][0]
    for j, (name, row) in enumerate(record["rows"].items()):
        if row.get("test_mse") is None:
            continue
        ax.scatter(
            row["amortized_bytes_per_user"],
            row["test_mse"],
            color=f"C{j}",
            label=name,
            s=40,
        )
    ax.axhline(
        record["params"]["noise"] ** 2, color="k", ls="--", lw=1, label="noise floor"
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes per user (incl. shared part / t)")
    ax.set_ylabel("test MSE")
    p = record["params"]
    ax.set_title(f"d={p['d']}, t={p['t']}, m={p['m']}, r={p['r']}, k={p['k']}")
    ax.legend(fontsize=7)
    c.save(fig, path)


def main(argv=None):
    return run(c.parser(__doc__.splitlines()[0], "results/storage").parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
