"""Rating files (MovieLens formats) as per-user regression tasks.

Each rating of item ``j`` by user ``i`` becomes one sample ``(x_ij, y_ij)``:
``y_ij`` is the rating minus the global training mean, and ``x_ij`` holds the
item's features: a constant 1 (the user's own offset), the item's genres
(0/1, from ``u.item`` / ``movies.dat`` / ``movies.csv`` when present), its
bias and its ``embedding_dim`` factors from a global matrix factorization
fitted on the training ratings only (items never rated in training get zeros).
A user's model ``theta_i`` is then a personal linear taste over item features.

Only text is read (never pickles, nothing is downloaded); a malformed line
raises ``ValueError`` naming the file and the line number. Host-side numpy.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from typing import NamedTuple

import numpy as np

from lrs.data import RaggedData, UserData
from lrs.standin import write_standin
from lrs.validation import check_fraction, check_integer

__all__ = [
    "RatingTasks",
    "Ratings",
    "item_factors",
    "load_ratings",
    "read_genres",
    "read_ratings",
    "sha256",
    "split_ratings",
    "write_standin",
]

RATING_FILES = ("u.data", "ratings.dat", "ratings.csv")
ITEM_FILES = {
    "u.data": "u.item",
    "ratings.dat": "movies.dat",
    "ratings.csv": "movies.csv",
}
# Largest rating magnitude accepted: squares and sums of many such ratings
# stay far from float32 overflow (a rating of 1e300 is a corrupted file).
MAX_RATING = 1e6
ML100K_GENRES = (
    "unknown Action Adventure Animation Children's Comedy Crime Documentary Drama "
    "Fantasy Film-Noir Horror Musical Mystery Romance Sci-Fi Thriller War Western"
).split()


class Ratings(NamedTuple):
    """Parsed ratings, one entry per line (numpy arrays of length ``N``)."""

    user: np.ndarray  # (N,) int64 user ids as in the file
    item: np.ndarray  # (N,) int64 item ids as in the file
    rating: np.ndarray  # (N,) float64
    timestamp: np.ndarray  # (N,) int64 seconds


class RatingTasks(NamedTuple):
    """Per-user train and test regression tasks built from a rating file.

    Attributes:
      train, test: :class:`lrs.UserData` (or :class:`lrs.RaggedData` with
        ``ragged=True``) with the same ``t`` users (row ``i`` of both is user
        ``user_ids[i]``), ``d = len(feature_names)``.
      user_ids: ``(t,)`` the file's user ids.
      feature_names: name of each of the ``d`` features.
      mean: the global training mean subtracted from every rating.
      sha256: hex digest of the rating file.
      path: the rating file read.
      counts: numbers of ratings, users, items, train and test samples, and
        users dropped (fewer than ``min_ratings``).
    """

    train: UserData
    test: UserData
    user_ids: np.ndarray
    feature_names: tuple[str, ...]
    mean: float
    sha256: str
    path: str
    counts: dict


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (to tell edited copies of a data set apart)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _bad(path, lineno: int, expected: str, line: str) -> ValueError:
    shown = line if len(line) <= 80 else line[:77] + "..."
    return ValueError(f"{path}, line {lineno}: expected {expected}; got {shown!r}")


def _lines(path):
    """``(lineno, stripped line)`` of the non-blank lines (latin-1: never fails)."""
    with open(path, encoding="latin-1", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield lineno, line


def _format(path) -> str:
    name = os.path.basename(path)
    if name.endswith(".data"):
        return "tab"
    if name.endswith(".dat"):
        return "colons"
    if name.endswith(".csv"):
        return "csv"
    raise ValueError(
        f"path must name a .data (tab), .dat (::) or .csv rating file or a "
        f"directory holding one of {RATING_FILES}; got {os.fspath(path)!r}"
    )


def read_ratings(path: str | os.PathLike) -> Ratings:
    """Parses ``u.data`` (tabs), ``ratings.dat`` (``::``) or ``ratings.csv``.

    The format follows the name's ending: ``.data`` tab-separated, ``.dat``
    ``::``-separated, ``.csv`` comma-separated with a header line
    (``userId,movieId,rating,timestamp``). Each line is ``user item rating
    timestamp`` (integer ids, finite rating, integer timestamp).

    Raises:
      ValueError: on a malformed line (names the file and line number) or a
        file without ratings.
    """
    kind = _format(path)
    sep = {"tab": "\t", "colons": "::", "csv": ","}[kind]
    expected = f"4 fields 'user{sep}item{sep}rating{sep}timestamp'".replace("\t", "\\t")
    rows = []
    for lineno, line in _lines(path):
        if (
            kind == "csv"
            and not rows
            and lineno == 1
            and line.lower().startswith("user")
        ):
            continue  # the header
        fields = line.split(sep) if kind != "tab" else line.split()
        if len(fields) != 4:
            raise _bad(path, lineno, expected, line)
        try:
            user, item = int(fields[0]), int(fields[1])
            rating, stamp = float(fields[2]), int(fields[3])
        except ValueError:
            raise _bad(path, lineno, expected + " (integers, a number)", line) from None
        if not math.isfinite(rating) or abs(rating) > MAX_RATING:
            raise _bad(
                path, lineno, f"a finite rating of magnitude <= {MAX_RATING:g}", line
            )
        rows.append((user, item, rating, stamp))
    if not rows:
        raise ValueError(f"{path}: no ratings found")
    user, item, rating, stamp = zip(*rows)
    return Ratings(
        np.array(user, np.int64),
        np.array(item, np.int64),
        np.array(rating, np.float64),
        np.array(stamp, np.int64),
    )


def read_genres(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Item genres from ``u.item`` (19 flags), ``movies.dat`` or ``movies.csv``.

    Returns:
      ``(item_ids (n,) int64, genres (n, g) float 0/1, genre names (g,))``.

    Raises:
      ValueError: on a malformed line (file and line number).
    """
    name = os.path.basename(path)
    ids, rows = [], []
    if name.endswith(".item"):  # id|title|date|video date|url|19 flags
        names = tuple(ML100K_GENRES)
        for lineno, line in _lines(path):
            fields = line.split("|")
            flags = fields[5:]
            if len(flags) != len(names) or any(f not in ("0", "1") for f in flags):
                raise _bad(path, lineno, "'id|title|date||url|' + 19 0/1 flags", line)
            ids.append(_int(fields[0], path, lineno, line))
            rows.append([float(f) for f in flags])
        return np.array(ids, np.int64), np.array(rows).reshape(-1, len(names)), names
    if name.endswith(".dat"):
        parsed = []
        for lineno, line in _lines(path):
            fields = line.split("::")
            if len(fields) != 3:
                raise _bad(path, lineno, "'id::title::Genre|Genre'", line)
            parsed.append((_int(fields[0], path, lineno, line), fields[2]))
    elif name.endswith(".csv"):
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            parsed = []
            for lineno, fields in enumerate(csv.reader(f), 1):
                if lineno == 1 and fields and fields[0].lower().startswith("movie"):
                    continue
                if not fields:
                    continue
                if len(fields) != 3:
                    raise _bad(path, lineno, "'movieId,title,genres'", ",".join(fields))
                parsed.append(
                    (_int(fields[0], path, lineno, ",".join(fields)), fields[2])
                )
    else:
        raise ValueError(
            f"path must name u.item, movies.dat or movies.csv; got {os.fspath(path)!r}"
        )
    listed = [
        [g for g in genres.split("|") if g and g != "(no genres listed)"]
        for _, genres in parsed
    ]
    names = tuple(sorted({g for gs in listed for g in gs}))
    column = {g: j for j, g in enumerate(names)}
    genres = np.zeros((len(parsed), len(names)))
    for row, gs in enumerate(listed):
        genres[row, [column[g] for g in gs]] = 1.0
    return np.array([i for i, _ in parsed], np.int64), genres, names


def _int(text: str, path, lineno: int, line: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _bad(path, lineno, "an integer item id first", line) from None


def split_ratings(
    ratings: Ratings, *, by: str = "time", test_fraction: float = 0.2, seed: int = 0
) -> np.ndarray:
    """``(N,)`` bool, True for test: each user's latest (or random) ratings.

    Each user with ``n >= 2`` ratings gets ``clip(round(test_fraction n), 1,
    n - 1)`` test ratings: the latest ones (``by='time'``, ties by file order)
    or a random choice (``by='random'``, from ``seed``). A user with one
    rating keeps it for training.
    """
    if by not in ("time", "random"):
        raise ValueError(f"by must be 'time' or 'random'; got {by!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1); got {test_fraction!r}")
    n = len(ratings.user)
    if by == "time":
        key = ratings.timestamp
    else:
        key = np.random.default_rng(seed).permutation(n)
    order = np.lexsort((np.arange(n), key, ratings.user))  # by user, then key
    users = ratings.user[order]
    starts = np.r_[0, np.flatnonzero(np.diff(users)) + 1]
    sizes = np.diff(np.r_[starts, n])
    n_test = np.clip(np.round(test_fraction * sizes), 1, sizes - 1).astype(int)
    n_test = np.where(sizes >= 2, n_test, 0)
    position = np.arange(n) - np.repeat(starts, sizes)
    test = np.zeros(n, bool)
    test[order] = position >= np.repeat(sizes - n_test, sizes)
    return test


def _als_side(rows, cols, values, n_rows, other, reg):
    """Ridge solve per row: ``(sum_j o_j o_j^T + reg n_r I) p_r = sum_j v_j o_j``.

    The per-row sums are a sparse (rows x ratings) indicator matrix times the
    ratings' outer products, 100,000 ratings at a time (``np.add.at`` took 27
    of the 42 s of loading an ML-1M-size file).
    """
    from scipy import sparse

    f = other.shape[1]
    G = np.zeros((n_rows, f * f))
    h = np.zeros((n_rows, f))
    for start in range(0, len(rows), 100_000):
        part = slice(start, start + 100_000)
        o = other[cols[part]]
        n = o.shape[0]
        rows_of = sparse.csr_matrix(
            (np.ones(n), (rows[part], np.arange(n))), shape=(n_rows, n)
        )
        G += rows_of @ (o[:, :, None] * o[:, None, :]).reshape(n, f * f)
        h += rows_of @ (values[part, None] * o)
    G = G.reshape(n_rows, f, f)
    counts = np.bincount(rows, minlength=n_rows)
    G += (reg * np.maximum(counts, 1))[:, None, None] * np.eye(f)
    return np.linalg.solve(G, h[..., None])[..., 0]


def item_factors(
    users, items, values, *, dim: int, reg: float = 0.05, iters: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Global matrix factorization ``values ~ b_item + <p_user, q_item>`` by ALS.

    ``users``, ``items``: ``(N,)`` indices from 0; ``values`` ``(N,)`` centered
    ratings. Item biases are shrunk means (``sum / (count + 5)``); the factors
    come from ``iters`` rounds of alternating ridge solves with weighted
    regularization ``reg * count`` (ALS-WR).

    Returns:
      ``(item bias (n_items,), item factors (n_items, dim))``.
    """
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    bias = np.bincount(items, values, n_items) / (np.bincount(items, None, n_items) + 5)
    residual = values - bias[items]
    Q = 0.1 * np.random.default_rng(seed).normal(size=(n_items, dim))
    for _ in range(iters):
        P = _als_side(users, items, residual, n_users, Q, reg)
        Q = _als_side(items, users, residual, n_items, P, reg)
    return bias, Q


def _find(path) -> tuple[str, str | None]:
    """The rating file and, if present next to it, the item file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [f for f in RATING_FILES if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise ValueError(
                f"path: no rating file ({', '.join(RATING_FILES)}) in {path!r}"
            )
        path = os.path.join(path, found[0])
    elif not os.path.isfile(path):
        raise ValueError(f"path must be a rating file or a directory; got {path!r}")
    _format(path)
    items = ITEM_FILES.get(os.path.basename(path))
    items = os.path.join(os.path.dirname(path), items) if items else None
    return path, items if items and os.path.isfile(items) else None


def load_ratings(
    path: str | os.PathLike,
    *,
    split: str = "time",
    test_fraction: float = 0.2,
    embedding_dim: int = 8,
    genres: bool = True,
    min_ratings: int = 2,
    max_train: int | None = None,
    seed: int = 0,
    dtype=None,
    validation_fraction: float | None = None,
    ragged: bool = False,
) -> RatingTasks:
    """Reads a MovieLens rating file into per-user train / test regression tasks.

    Args:
      path: a directory holding ``u.data`` (ML-100K), ``ratings.dat`` (ML-1M)
        or ``ratings.csv`` (ML-latest), or such a file itself. The item file
        next to it (``u.item``, ``movies.dat``, ``movies.csv``) adds genres.
      split: ``'time'`` (each user's latest ratings are the test set) or
        ``'random'``; see :func:`split_ratings`.
      test_fraction: share of each user's ratings held out, in ``(0, 1)``.
      embedding_dim: item factors from :func:`item_factors` on the training
        ratings (0: none).
      genres: use the item file's genres when present.
      min_ratings: users with fewer ratings are dropped (``>= 2``).
      max_train: keep at most this many (the latest) training ratings per
        user, to bound the padded ``(t, m, d)`` arrays (ML-1M has a user with
        2314 ratings); ``None`` keeps all. ``ragged=True`` needs no bound.
      seed: for the random split and the factorization's start.
      dtype: float dtype of the tasks (default float32, float64 under x64).
      validation_fraction: for model selection. ``None``: the tasks above.
        A number in ``(0, 1)``: the test ratings are dropped unread into
        anything, and each user's training ratings are split again, by the
        same rule (``split``), into ``train`` and a validation set returned
        as ``test``; the item biases and factors and the mean are fitted on
        this inner ``train`` only, so the validation ratings leak into no
        feature. The users (rows) are the same as without it.
      ragged: return ``train`` and ``test`` as :class:`lrs.RaggedData`
        (numpy, ``N x d`` floats for ``N`` ratings) instead of padded
        :class:`lrs.UserData` (``t x m_max x d``), for
        :func:`lrs.fit_streamed`; the padded array is never allocated.
        Same users, same samples in the same order.

    Returns:
      a :class:`RatingTasks`.

    Raises:
      ValueError: bad arguments, a missing file, a malformed line (file and
        line number), no user with ``min_ratings`` ratings.
    """
    _check_load_arguments(split, test_fraction, genres, seed, dtype)
    if not isinstance(ragged, bool):
        raise ValueError(f"ragged must be a bool; got {ragged!r}")
    if validation_fraction is not None:
        check_fraction("validation_fraction", validation_fraction)
    check_integer("min_ratings", min_ratings, 2)
    check_integer("embedding_dim", embedding_dim, 0)
    if max_train is not None and (not isinstance(max_train, int) or max_train < 1):
        raise ValueError(
            f"max_train must be None or an integer >= 1; got {max_train!r}"
        )
    ratings_path, items_path = _find(path)
    ratings = read_ratings(ratings_path)
    n_all, users_all = len(ratings.user), len(np.unique(ratings.user))
    _, inverse, per_user = np.unique(
        ratings.user, return_inverse=True, return_counts=True
    )
    ratings = Ratings(*(a[per_user[inverse] >= min_ratings] for a in ratings))
    if len(ratings.user) == 0:
        raise ValueError(
            f"{ratings_path}: no user has min_ratings = {min_ratings} ratings"
        )
    is_test = split_ratings(ratings, by=split, test_fraction=test_fraction, seed=seed)
    if max_train is not None:
        is_train = _latest(ratings, ~is_test, max_train)
    else:
        is_train = ~is_test
    if validation_fraction is not None:
        # Only the training ratings exist from here on; the latest (or a
        # random share) of each user's become the validation ("test") set.
        ratings = Ratings(*(a[is_train] for a in ratings))
        is_test = split_ratings(
            ratings, by=split, test_fraction=validation_fraction, seed=seed + 1
        )
        is_train = ~is_test
    mean = float(ratings.rating[is_train].mean())
    X, names = _features(
        ratings, is_train, mean, items_path if genres else None, embedding_dim, seed
    )
    y = ratings.rating - mean
    kind = RaggedData if ragged else UserData
    train = _cast(
        kind.from_long(ratings.user[is_train], X[is_train], y[is_train]), dtype
    )
    test = _cast(kind.from_long(ratings.user[is_test], X[is_test], y[is_test]), dtype)
    counts = dict(
        ratings=n_all,
        users=users_all,
        items=len(np.unique(ratings.item)),
        users_kept=train.num_users,
        train=int(is_train.sum()),
        test=int(is_test.sum()),
    )
    return RatingTasks(
        train,
        test,
        np.unique(ratings.user),
        names,
        mean,
        sha256(ratings_path),
        ratings_path,
        counts,
    )


def _check_load_arguments(split, test_fraction, genres, seed, dtype) -> None:
    """ValueErrors naming the bad argument of :func:`load_ratings`."""
    if split not in ("time", "random"):
        raise ValueError(f"split must be 'time' or 'random'; got {split!r}")
    check_fraction("test_fraction", test_fraction)
    if not isinstance(genres, bool):
        raise ValueError(f"genres must be a bool; got {genres!r}")
    check_integer("seed", seed, 0)
    if dtype is not None:
        try:
            kind = np.dtype(dtype)
        except TypeError:
            raise ValueError(
                f"dtype must be a float dtype or None; got {dtype!r}"
            ) from None
        if not np.issubdtype(kind, np.floating):
            raise ValueError(f"dtype must be a float dtype or None; got {dtype!r}")


def _cast(data, dtype):
    if dtype is None or data.X.dtype == dtype:
        return data
    return data._replace(X=data.X.astype(dtype), y=data.y.astype(dtype))


def _latest(ratings: Ratings, keep: np.ndarray, limit: int) -> np.ndarray:
    """``keep`` reduced to each user's ``limit`` latest kept ratings."""
    n = len(keep)
    order = np.lexsort((np.arange(n), -ratings.timestamp, ~keep, ratings.user))
    users = ratings.user[order]
    starts = np.r_[0, np.flatnonzero(np.diff(users)) + 1]
    position = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    out = np.zeros(n, bool)
    out[order] = keep[order] & (position < limit)
    return out


def _features(ratings, is_train, mean, items_path, dim, seed):
    """``(N, d)`` item features of every rating and their names."""
    items, item_index = np.unique(ratings.item, return_inverse=True)
    columns, names = [np.ones((len(items), 1))], ["offset"]
    if items_path is not None:
        ids, genres, genre_names = read_genres(items_path)
        table = np.zeros((len(items), genres.shape[1]))
        position = np.searchsorted(items, ids)
        found = (position < len(items)) & (
            items[np.minimum(position, len(items) - 1)] == ids
        )
        table[position[found]] = genres[found]
        columns.append(table)
        names += [f"genre:{g}" for g in genre_names]
    if dim > 0:
        _, user_index = np.unique(ratings.user, return_inverse=True)
        bias, Q = item_factors(
            user_index[is_train],
            item_index[is_train],
            ratings.rating[is_train] - mean,
            dim=dim,
            seed=seed,
        )
        full_bias, full_Q = np.zeros(len(items)), np.zeros((len(items), dim))
        full_bias[: len(bias)], full_Q[: len(Q)] = bias, Q
        seen = np.bincount(item_index[is_train], minlength=len(items)) > 0
        columns += [(full_bias * seen)[:, None], full_Q * seen[:, None]]
        names += ["item_bias"] + [f"factor:{j}" for j in range(dim)]
    return np.concatenate(columns, axis=1)[item_index], tuple(names)
