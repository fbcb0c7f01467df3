"""Real ratings: test RMSE of AMHT-LRS and every baseline on a MovieLens file.

    python experiments/ratings.py --path ~/data/ml-100k --out results/ml100k
    python experiments/ratings.py --path ~/data/ml-1m --max-train 500 --out results/ml1m
    python experiments/ratings.py --quick --out /tmp/ratings   # generated stand-in file

``--path`` is a directory holding ``u.data`` (+ ``u.item``), ``ratings.dat``
(+ ``movies.dat``) or ``ratings.csv`` (+ ``movies.csv``), or the file itself;
nothing is downloaded. Each user's latest ratings (``--split time``) or a
random share (``--split random``) are the test set; item features are an
offset, the genres, and the item bias and factors of a global matrix
factorization fitted on the training ratings (``lrs.datasets.load_ratings``).
Prints the file's sha256 (many copies of MovieLens are edited) and the test
RMSE table; writes ``ratings.json`` and ``ratings.png`` under ``--out``.
Without ``--path`` (``--quick`` only) a small MovieLens-format file with a
planted low rank + sparse taste structure is generated and used instead.
"""

from __future__ import annotations

import math
import os
import sys

import _common as c
import jax
import numpy as np

from lrs import datasets


def write_standin(folder: str, seed: int = 0, users=150, items=120, per_user=40):
    """A small ``u.data`` + ``u.item`` pair: ratings from planted user tastes
    over item genres and latent traits, rounded to 1..5 (for smoke tests)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    genres = (rng.random((items, 19)) < 0.15).astype(int)
    traits = rng.normal(size=(items, 3))
    shared = rng.normal(size=(3, 2))
    rows = []
    for u in range(users):
        taste = shared @ rng.normal(size=2) + 0.3 * rng.normal(size=3)
        likes = rng.choice(19, 2, replace=False)
        seen = rng.choice(items, per_user, replace=False)
        score = 3.5 + traits[seen] @ taste * 0.5 + genres[seen][:, likes].sum(1)
        score = np.clip(np.round(score + 0.3 * rng.normal(size=per_user)), 1, 5)
        stamps = rng.integers(8e8, 9e8, per_user)
        rows += [
            (u + 1, i + 1, int(s), int(t))
            for i, s, t in zip(seen, score, stamps, strict=True)
        ]
    with open(os.path.join(folder, "u.data"), "w") as f:
        f.writelines(f"{u}\t{i}\t{s}\t{t}\n" for u, i, s, t in rows)
    with open(os.path.join(folder, "u.item"), "w", encoding="latin-1") as f:
        for i in range(items):
            flags = "|".join(map(str, genres[i]))
            f.write(f"{i + 1}|Item {i + 1} (1998)|01-Jan-1998||http://x|{flags}\n")
    return folder


def run(args) -> dict:
    start = c.setup(args)
    path = args.path
    if path is None:
        if not args.quick:
            raise SystemExit("--path is required (or --quick for a generated file)")
        path = write_standin(os.path.join(args.out, "standin"), args.seed)
    r, k = args.rank, args.sparsity
    # every user needs r + k training ratings after the split
    min_ratings = max(2, math.ceil((r + k + 1) / (1 - args.test_fraction)) + 1)
    tasks = datasets.load_ratings(
        path,
        split=args.split,
        test_fraction=args.test_fraction,
        embedding_dim=args.embedding_dim,
        min_ratings=min_ratings,
        max_train=args.max_train,
        seed=args.seed,
    )
    print(f"{tasks.path}: sha256 {tasks.sha256}")
    print(f"counts: {tasks.counts}; d = {tasks.train.dim} features")
    rmse = {"global_mean": math.sqrt(c.mse_zero(tasks.test))}
    for name, fit in c.progress(list(c.fitters(r, k).items()), "methods"):
        params = c.safe(fit, tasks.train, jax.random.key(args.seed))
        rmse[name] = None if params is None else math.sqrt(c.mse(params, tasks.test))
    record = dict(
        experiment="ratings",
        path=tasks.path,
        sha256=tasks.sha256,
        counts=tasks.counts,
        features=list(tasks.feature_names),
        mean=tasks.mean,
        rank=r,
        sparsity=k,
        test_rmse=rmse,
    )
    record["environment"] = c.environment(args, start)
    c.save_json(args.out, "ratings.json", record)
    plot(record, os.path.join(args.out, "ratings.png"))
    print("| method | test RMSE |\n|---|---:|")
    for name, value in rmse.items():
        print(f"| {name} | {'fail' if value is None else f'{value:.4f}'} |")
    return record


def plot(record, path: str) -> None:
    fig, axes = c.figure(1, 1, size=(6, 4))
    ax = axes[0][0]
    names = [n for n, v in record["test_rmse"].items() if v is not None]
    ax.barh(names, [record["test_rmse"][n] for n in names], color="C0")
    ax.set_xlabel("test RMSE (held-out ratings)")
    ax.set_xlim(left=min(record["test_rmse"][n] for n in names) * 0.9)
    ax.set_title(
        os.path.basename(record["path"]) + f", r={record['rank']}, "
        f"k={record['sparsity']}"
    )
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = c.parser(__doc__.splitlines()[0], "results/ratings")
    p.add_argument("--path", default=None, help="MovieLens directory or rating file")
    p.add_argument("--rank", type=int, default=3)
    p.add_argument("--sparsity", type=int, default=2)
    p.add_argument("--split", choices=("time", "random"), default="time")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--embedding-dim", type=int, default=8)
    p.add_argument(
        "--max-train",
        type=int,
        default=None,
        help="latest training ratings kept per user (bounds memory)",
    )
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
