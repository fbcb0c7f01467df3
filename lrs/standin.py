"""Realistic stand-in rating files in MovieLens formats (for tests and quick runs).

:func:`write_standin` draws a rating data set with the statistics that make
real ratings hard, vectorized in numpy (1M ratings in a few seconds):

- heavy-tailed user activity (log-normal counts, at least ``min_ratings``
  each, like ML-100K's 20..737) and item popularity (Zipf-like weights; each
  user's items are drawn without replacement by the Gumbel top-n trick);
- a global mean, user and item biases (popular items rate higher);
- drift over time: each user rates during a window of the file's span and
  their bias moves linearly over it; the global mean drifts too;
- a planted taste structure of adjustable size: a low-rank part
  ``<v_i, q_j>`` over ``latent_rank`` item traits (strength ``low_rank``) and
  a sparse, genre-level idiosyncrasy: each user loves or hates a few genres
  (0 to ``max_genres``, strength ``sparse``); either may be 0 (none);
- Gaussian noise, then rounding to whole stars 1..5.

Nothing is downloaded; host-side numpy only.
"""

from __future__ import annotations

import json
import os

import numpy as np

from lrs.validation import check_integer, check_real

__all__ = ["STANDIN_GENRES", "write_standin"]

# ML-100K's genres, with rough shares of items carrying each.
STANDIN_GENRES = (
    "unknown Action Adventure Animation Children's Comedy Crime Documentary Drama "
    "Fantasy Film-Noir Horror Musical Mystery Romance Sci-Fi Thriller War Western"
).split()
_GENRE_SHARE = np.array(
    [0.01, 0.15, 0.08, 0.025, 0.07, 0.3, 0.065, 0.03, 0.43, 0.013, 0.014, 0.055,
     0.034, 0.036, 0.146, 0.06, 0.15, 0.042, 0.016]
)  # fmt: skip
_SPAN = (874_724_710, 893_286_638)  # ML-100K's first and last timestamps


def _activity(rng, users: int, ratings: int, items: int, low: int) -> np.ndarray:
    """``(users,)`` heavy-tailed rating counts in ``[low, items / 2]`` summing
    to about ``ratings``."""
    high = max(low, int(0.5 * items))
    raw = rng.lognormal(0.0, 1.0, users)
    target = ratings - low * users
    scale, counts = target / raw.sum(), None
    for _ in range(30):  # rescale until the clipped counts sum to the target
        counts = np.clip(low + np.floor(scale * raw), low, high).astype(np.int64)
        short = ratings - counts.sum()
        if abs(short) <= users or scale <= 0:
            break
        scale *= 1 + short / max(counts.sum() - low * users, 1)
    return counts


def _choose_items(rng, counts: np.ndarray, log_weight: np.ndarray) -> np.ndarray:
    """``(sum counts,)`` items, ``counts[i]`` distinct ones per user, drawn with
    probabilities ``~ exp(log_weight)`` without replacement (Gumbel top-n)."""
    out, block = [], max(1, 2_000_000 // len(log_weight))
    for start in range(0, len(counts), block):
        n = counts[start : start + block]
        keys = log_weight + rng.gumbel(size=(len(n), len(log_weight)))
        order = np.argsort(-keys, axis=1)
        keep = np.arange(len(log_weight))[None, :] < n[:, None]
        out.append(order[keep])
    return np.concatenate(out)


def _genres(rng, items: int) -> np.ndarray:
    """``(items, 19)`` 0/1 flags, at least one genre per item."""
    flags = rng.random((items, len(STANDIN_GENRES))) < _GENRE_SHARE
    none = ~flags.any(axis=1)
    flags[none, rng.choice([5, 8], none.sum())] = True  # Comedy or Drama
    return flags.astype(np.int64)


def _taste(rng, users, genres, item, user, low_rank, sparse, rank, max_genres):
    """Planted structure of each rating: low-rank part and genre idiosyncrasy."""
    traits = rng.normal(size=(genres.shape[0], rank)) / np.sqrt(rank)
    v = rng.normal(size=(users, rank))
    lr = low_rank * np.einsum("nr,nr->n", v[user], traits[item])
    n_liked = rng.integers(0, max_genres + 1, users)
    # each user's idiosyncratic genres and their signed strengths
    keys = rng.random((users, genres.shape[1]))
    ranked = np.argsort(keys, axis=1)
    mine = np.zeros((users, genres.shape[1]))
    pick = np.arange(genres.shape[1])[None, :] < n_liked[:, None]
    rows = np.repeat(np.arange(users), n_liked)
    signs = rng.choice([-1.0, 1.0], rows.size)
    mine[rows, ranked[pick]] = signs * (0.6 + 0.4 * rng.random(rows.size))
    idio = sparse * np.einsum("ng,ng->n", mine[user], genres[item])
    return lr, idio, n_liked


def write_standin(
    folder: str | os.PathLike,
    *,
    users: int = 943,
    items: int = 1682,
    ratings: int = 100_000,
    low_rank: float = 0.5,
    sparse: float = 0.8,
    latent_rank: int = 3,
    max_genres: int = 3,
    noise: float = 0.8,
    drift: float = 0.3,
    min_ratings: int = 20,
    file_format: str = "100k",
    seed: int = 0,
) -> str:
    """Writes a MovieLens-format stand-in data set into ``folder``.

    Args:
      folder: created if missing; receives ``u.data`` + ``u.item``
        (``file_format='100k'``) or ``ratings.dat`` + ``movies.dat``
        (``'1m'``), and ``standin.json`` (the arguments and summary counts).
      users: number of users (ML-100K: 943; ML-1M: 6,040). Each user gets at
        least ``min_ratings``.
      items: number of items (ML-100K: 1,682; ML-1M: 3,706).
      ratings: number of ratings (ML-100K: 100,000; ML-1M: 1,000,209).
      low_rank: standard deviation (stars) of the planted low-rank taste
        ``<v_i, q_j>`` (0: none).
      sparse: strength (stars, times 0.6..1) of each user's genre-level
        idiosyncrasies (0: no planted sparse part).
      latent_rank: rank of the low-rank part.
      max_genres: each user has 0..max_genres idiosyncratic genres (uniform).
      noise: standard deviation of the rating noise before rounding.
      drift: standard deviation (stars) of each user's bias change over their
        active window.
      min_ratings: fewest ratings of a user.
      file_format: ``'100k'`` or ``'1m'``.
      seed: numpy seed; the same arguments give the same files.

    Returns:
      ``folder`` as a string, ready for :func:`lrs.datasets.load_ratings`.

    Raises:
      ValueError: on a bad argument (named).
    """
    for name, value, low in (
        ("users", users, 1),
        ("items", items, 2),
        ("latent_rank", latent_rank, 1),
        ("max_genres", max_genres, 0),
        ("min_ratings", min_ratings, 1),
        ("seed", seed, 0),
    ):
        check_integer(name, value, low)
    check_integer("ratings", ratings, users * min_ratings)
    for name in ("low_rank", "sparse", "noise", "drift"):
        check_real(name, locals()[name], "a finite number >= 0", low=0)
    if min_ratings > 0.5 * items:
        raise ValueError(f"min_ratings must be <= items / 2; got {min_ratings}")
    if file_format not in ("100k", "1m"):
        raise ValueError(f"file_format must be '100k' or '1m'; got {file_format!r}")
    rng = np.random.default_rng(seed)
    counts = _activity(rng, users, ratings, items, min_ratings)
    popularity = -1.0 * np.log(np.arange(1, items + 1))  # Zipf-like, exponent 1
    popularity = rng.permutation(popularity)
    item = _choose_items(rng, counts, popularity)
    user = np.repeat(np.arange(users), counts)
    genres = _genres(rng, items)
    # Biases: popular items rate higher; users vary.
    item_bias = 0.35 * rng.normal(size=items) + 0.1 * (popularity - popularity.mean())
    user_bias = 0.4 * rng.normal(size=users)
    lr, idio, n_liked = _taste(
        rng, users, genres, item, user, low_rank, sparse, latent_rank, max_genres
    )
    # Time: each user's window within the span; bias drifts across it.
    t0, t1 = _SPAN
    start = rng.uniform(t0, t1, users)
    length = (t1 - start) * rng.beta(0.7, 2.0, users)
    phase = rng.random(user.size)
    stamp = (start[user] + phase * length[user]).astype(np.int64)
    trend = drift * rng.normal(size=users)
    moving = trend[user] * (phase - 0.5) + 0.1 * (stamp - t0) / (t1 - t0)
    score = 3.55 + user_bias[user] + item_bias[item] + lr + idio + moving
    score += noise * rng.normal(size=user.size)
    stars = np.clip(np.rint(score), 1, 5).astype(np.int64)
    order = np.lexsort((stamp, user))
    user, item, stars, stamp = user[order], item[order], stars[order], stamp[order]
    os.makedirs(folder, exist_ok=True)
    _write(folder, file_format, user + 1, item + 1, stars, stamp, genres)
    summary = dict(
        users=users,
        items=items,
        ratings=int(user.size),
        low_rank=low_rank,
        sparse=sparse,
        latent_rank=latent_rank,
        max_genres=max_genres,
        noise=noise,
        drift=drift,
        min_ratings=min_ratings,
        file_format=file_format,
        seed=seed,
        ratings_per_user=[int(counts.min()), int(np.median(counts)), int(counts.max())],
        users_with_idiosyncrasies=int((n_liked > 0).sum()) if sparse > 0 else 0,
        star_shares=np.bincount(stars, minlength=6)[1:].tolist(),
    )
    with open(os.path.join(folder, "standin.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return os.fspath(folder)


def _write(folder, file_format, user, item, stars, stamp, genres) -> None:
    sep = "\t" if file_format == "100k" else "::"
    name = "u.data" if file_format == "100k" else "ratings.dat"
    line = sep.join(["{}"] * 4).format
    with open(os.path.join(folder, name), "w") as f:
        f.write("\n".join(map(line, user.tolist(), item.tolist(), stars.tolist(),
                              stamp.tolist())))  # fmt: skip
        f.write("\n")
    ids = range(1, genres.shape[0] + 1)
    if file_format == "100k":
        rows = (
            f"{i}|Item {i} (1998)|01-Jan-1998||http://x|" + "|".join(map(str, g))
            for i, g in zip(ids, genres.tolist())
        )
        path = os.path.join(folder, "u.item")
    else:
        names = np.array(STANDIN_GENRES)
        rows = (
            f"{i}::Item {i} (1998)::" + "|".join(names[np.flatnonzero(g)])
            for i, g in zip(ids, genres)
        )
        path = os.path.join(folder, "movies.dat")
    with open(path, "w", encoding="latin-1") as f:
        f.write("\n".join(rows) + "\n")
