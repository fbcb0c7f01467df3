"""Per-user data sets: padded into dense arrays (:class:`UserData`), or
without padding (:class:`RaggedData`, for heavy-tailed sample counts).

Shape letters: t users, m samples per user (m_max after padding), d features,
N samples in all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def float_dtype(dtype=None) -> np.dtype:
    """The floating dtype lrs computes in: float32, or float64 under x64."""
    if dtype is not None and np.issubdtype(dtype, np.floating):
        if np.dtype(dtype).itemsize >= 4:
            return np.dtype(jax.dtypes.canonicalize_dtype(dtype))
    return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))


def _as_real_array(value, name: str) -> np.ndarray | jax.Array:
    """Converts ``value`` to a real floating array without modifying it."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        value = np.asarray(value)
        dtype = value.dtype
    if np.issubdtype(dtype, np.complexfloating):
        raise ValueError(f"{name} must be real; got complex dtype {dtype}")
    if not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
        raise ValueError(f"{name} must be numeric; got dtype {dtype}")
    target = float_dtype(dtype)
    if isinstance(value, jax.Array):
        return value if value.dtype == target else value.astype(target)
    return np.asarray(value, dtype=target)  # copies only when converting


def _check_finite(value, name: str) -> None:
    ok = (
        bool(jnp.isfinite(value).all())
        if isinstance(value, jax.Array)
        else bool(np.isfinite(value).all())
    )
    if not ok:
        raise ValueError(f"{name} contains NaN or inf values")


class UserData(NamedTuple):
    """Padded per-user regression data; a pytree.

    Attributes:
      X: ``(t, m_max, d)`` features (padded rows: zero from the constructors).
      y: ``(t, m_max)`` targets (padded entries: zero from the constructors).
      mask: ``(t, m_max)`` bool, True for real samples.

    Padding never changes a result: every computation in lrs masks it out.
    """

    X: jax.Array
    y: jax.Array
    mask: jax.Array

    @property
    def num_users(self) -> int:
        return self.X.shape[0]

    @property
    def dim(self) -> int:
        return self.X.shape[2]

    @property
    def counts(self) -> np.ndarray:
        """``(t,)`` number of real samples of each user (host numpy array)."""
        return np.asarray(jnp.sum(self.mask, axis=1))

    @classmethod
    def from_arrays(cls, X, y) -> UserData:
        """All users with the same number of samples: X ``(t, m, d)``, y ``(t, m)``.

        Raises:
          ValueError: on mismatched shapes, zero users, complex or non-finite data.
        """
        X = _as_real_array(X, "X")
        y = _as_real_array(y, "y")
        if X.ndim != 3:
            raise ValueError(f"X must have shape (t, m, d); got shape {X.shape}")
        if y.shape != X.shape[:2]:
            raise ValueError(
                f"y must have shape (t, m) = {X.shape[:2]} to match X; got {y.shape}"
            )
        if X.shape[0] == 0:
            raise ValueError("X has zero users (t = 0)")
        _check_finite(X, "X")
        _check_finite(y, "y")
        y = jnp.asarray(y, dtype=X.dtype)
        mask = jnp.ones(y.shape, dtype=bool)
        return cls(jnp.asarray(X), y, mask)

    @classmethod
    def from_host(cls, X, y, mask=None) -> UserData:
        """Data kept in host memory for :func:`lrs.fit_streamed`, e.g. memory-mapped.

        ``X (t, m, d)``, ``y (t, m)`` and ``mask (t, m)`` (default all True)
        are numpy arrays or ``np.memmap`` s (``np.load(path, mmap_mode='r')``);
        they are neither copied nor read here (values are checked chunk by
        chunk when the fit streams them). Floating dtypes are required.

        Raises:
          ValueError: on mismatched shapes, zero users or non-float dtypes.
        """
        arrays = {"X": X, "y": y}
        for name, a in arrays.items():
            if not isinstance(a, np.ndarray):
                raise ValueError(
                    f"{name} must be a numpy array; got {type(a).__name__}"
                )
            if not np.issubdtype(a.dtype, np.floating):
                raise ValueError(f"{name} must be a real floating array; got {a.dtype}")
        if X.ndim != 3 or X.shape[0] == 0:
            raise ValueError(f"X must have shape (t, m, d), t >= 1; got {X.shape}")
        if y.shape != X.shape[:2]:
            raise ValueError(
                f"y must have shape (t, m) = {X.shape[:2]} to match X; got {y.shape}"
            )
        if mask is None:
            mask = np.ones(y.shape, bool)
        elif np.shape(mask) != y.shape or np.asarray(mask).dtype != bool:
            raise ValueError(
                f"mask must be a boolean (t, m) = {y.shape} array; got "
                f"{np.shape(mask)} {getattr(mask, 'dtype', type(mask).__name__)}"
            )
        return cls(X, y, mask)

    @classmethod
    def from_ragged(cls, Xs: Sequence, ys: Sequence) -> UserData:
        """Users with different sample counts: ``Xs[i] (m_i, d)``, ``ys[i] (m_i,)``.

        Raises:
          ValueError: on mismatched lengths or shapes, zero users, bad values.
        """
        if len(Xs) != len(ys):
            raise ValueError(
                f"Xs and ys must list the same users; got {len(Xs)} and {len(ys)}"
            )
        if len(Xs) == 0:
            raise ValueError("Xs is empty: zero users")
        Xs = [_as_real_array(np.asarray(x), f"Xs[{i}]") for i, x in enumerate(Xs)]
        ys = [_as_real_array(np.asarray(v), f"ys[{i}]") for i, v in enumerate(ys)]
        if Xs[0].ndim != 2:
            raise ValueError(f"Xs[0] must have shape (m_0, d); got {Xs[0].shape}")
        d = Xs[0].shape[1]
        for i, (x, v) in enumerate(zip(Xs, ys)):
            if x.ndim != 2 or x.shape[1] != d:
                raise ValueError(f"Xs[{i}] must have shape (m_i, {d}); got {x.shape}")
            if v.shape != (x.shape[0],):
                raise ValueError(
                    f"ys[{i}] must have shape ({x.shape[0]},) to match Xs[{i}]; "
                    f"got {v.shape}"
                )
            _check_finite(x, f"Xs[{i}]")
            _check_finite(v, f"ys[{i}]")
        dtype = np.result_type(*Xs)
        counts = np.array([x.shape[0] for x in Xs])
        t, m_max = len(Xs), max(int(counts.max()), 1)
        X = np.zeros((t, m_max, d), dtype)
        y = np.zeros((t, m_max), dtype)
        for i, (x, v) in enumerate(zip(Xs, ys)):
            X[i, : len(v)] = x
            y[i, : len(v)] = v
        mask = np.arange(m_max)[None, :] < counts[:, None]
        return cls(jnp.asarray(X), jnp.asarray(y), jnp.asarray(mask))

    @classmethod
    def from_long(cls, user_ids, X, y, *, return_ids: bool = False):
        """One row per sample, like a data frame: ``user_ids, X (N, d), y (N,)``.

        User ``i`` of the result is the ``i``-th smallest distinct id
        (``np.unique(user_ids)[i]``); each user's samples keep their order.
        Ids may be integers or strings (e.g. ``"user_17"``).

        Args:
          return_ids: also return the ids, ``(data, ids)`` with ``ids (t,)``
            the id of each row (``ids[i]`` is user ``i``; its inverse, id to
            row, is ``{u: i for i, u in enumerate(ids)}``).

        Raises:
          ValueError: on mismatched shapes, no samples, ids that are neither
            integers nor strings, non-finite values.
        """
        X, y, counts, unique = _long_to_packed(user_ids, X, y)
        splits = np.cumsum(counts)[:-1]
        data = cls.from_ragged(np.split(X, splits), np.split(y, splits))
        return (data, unique) if return_ids else data

    def to_long(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Inverse of :meth:`from_long`: ``(user_index (N,), X (N, d), y (N,))``."""
        mask = np.asarray(self.mask)
        users = np.broadcast_to(np.arange(self.num_users)[:, None], mask.shape)
        return users[mask], np.asarray(self.X)[mask], np.asarray(self.y)[mask]


def padded_width(count: int) -> int:
    """``count`` samples rounded up to a power of two: the padded width of a
    block of ragged users (a few distinct shapes, at most 2x the samples)."""
    return 1 << max(int(count) - 1, 0).bit_length()


class RaggedData(NamedTuple):
    """Per-user regression data without padding: every user's samples stored
    one after the other (host numpy arrays); a pytree.

    Memory follows the number of samples ``N``, not ``t * m_max``: the form of
    heavy-tailed data (ratings) for :func:`lrs.fit_streamed`, which packs
    users of similar sample counts into chunks (docs/scale.md).

    Attributes:
      X: ``(N, d)`` features; user ``i``'s rows are
        ``X[offsets[i]:offsets[i + 1]]``.
      y: ``(N,)`` targets, in the same order.
      counts: ``(t,)`` int64 number of samples of each user (``sum = N``).
    """

    X: np.ndarray
    y: np.ndarray
    counts: np.ndarray

    @property
    def num_users(self) -> int:
        return len(self.counts)

    @property
    def dim(self) -> int:
        return self.X.shape[1]

    @property
    def offsets(self) -> np.ndarray:
        """``(t + 1,)`` where each user's samples start (and ``N`` last)."""
        return np.concatenate([[0], np.cumsum(self.counts)])

    @classmethod
    def from_long(cls, user_ids, X, y, *, return_ids: bool = False):
        """As :meth:`UserData.from_long` (same users, same order), unpadded.

        Args:
          user_ids: ``(N,)`` integer or string ids.
          X: ``(N, d)`` features; y: ``(N,)`` targets.
          return_ids: also return ``ids (t,)``, the id of each user.

        Raises:
          ValueError: on mismatched shapes, no samples, bad ids, non-finite
            values.
        """
        X, y, counts, unique = _long_to_packed(user_ids, X, y)
        data = cls(X, y, counts)
        return (data, unique) if return_ids else data

    @classmethod
    def from_padded(cls, data: UserData) -> RaggedData:
        """The real samples of a :class:`UserData` (each user's in order).

        Raises:
          ValueError: if ``data`` is not a :class:`UserData`.
        """
        if not isinstance(data, UserData):
            raise ValueError(f"data must be an lrs.UserData; got {type(data)}")
        mask = np.asarray(data.mask)
        X, y = np.asarray(data.X)[mask], np.asarray(data.y)[mask]
        return cls(X, y, mask.sum(axis=1).astype(np.int64))

    def positions(self, users) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where the samples of ``users (n,)`` go in a packed ``(n, m)`` block.

        Returns ``(row, column, source)``, each ``(sum of their counts,)``:
        sample ``source`` of the data is entry ``[row, column]`` of the block.
        """
        counts = self.counts[users]
        total = int(counts.sum())
        row = np.repeat(np.arange(len(counts)), counts)
        first = np.cumsum(counts) - counts
        column = np.arange(total) - np.repeat(first, counts)
        source = np.repeat(self.offsets[:-1][users], counts) + column
        return row, column, source

    def padded(self, m: int | None = None) -> UserData:
        """The same users as a :class:`UserData` padded to ``m`` samples
        (default: the largest count): ``t * m * d`` floats, for small data.

        Raises:
          ValueError: if ``m`` is below the largest count.
        """
        largest = max(int(self.counts.max(initial=0)), 1)
        m = largest if m is None else m
        if not isinstance(m, int) or m < largest:
            raise ValueError(f"m must be an integer >= {largest}; got {m!r}")
        users = np.arange(self.num_users)
        row, column, source = self.positions(users)
        X = np.zeros((self.num_users, m, self.dim), self.X.dtype)
        y = np.zeros((self.num_users, m), self.X.dtype)
        mask = np.zeros((self.num_users, m), bool)
        X[row, column] = self.X[source]
        y[row, column] = self.y[source]
        mask[row, column] = True
        return UserData(jnp.asarray(X), jnp.asarray(y), jnp.asarray(mask))

    def to_long(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(user_index (N,), X (N, d), y (N,))``, as :meth:`UserData.to_long`."""
        users = np.repeat(np.arange(self.num_users), self.counts)
        return users, np.asarray(self.X), np.asarray(self.y)


def _long_to_packed(user_ids, X, y):
    """Checks long-format samples; returns them grouped by user:
    ``(X (N, d), y (N,), counts (t,), ids (t,))``, users in sorted id order,
    each user's samples in their original order."""
    user_ids = np.asarray(user_ids)
    X = _as_real_array(np.asarray(X), "X")
    y = _as_real_array(np.asarray(y), "y")
    kind = user_ids.dtype.kind
    if user_ids.ndim != 1 or kind not in "iuUSO":
        raise ValueError(
            f"user_ids must be a 1-d array of integers or strings; got "
            f"{user_ids.dtype} with shape {user_ids.shape}"
        )
    if kind == "O":  # Python objects: all str, or all int
        if all(isinstance(u, str) for u in user_ids):
            user_ids = user_ids.astype(str)
        elif all(isinstance(u, int | np.integer) for u in user_ids):
            user_ids = user_ids.astype(np.int64)
        else:
            mixed = "got mixed Python objects"
            raise ValueError(f"user_ids must be all integers or all strings; {mixed}")
    if X.ndim != 2 or X.shape[0] != len(user_ids) or y.shape != (len(user_ids),):
        raise ValueError(
            f"X must be (N, d) and y (N,) with N = len(user_ids) = "
            f"{len(user_ids)}; got X {X.shape}, y {y.shape}"
        )
    if len(user_ids) == 0:
        raise ValueError("user_ids is empty: zero users")
    _check_finite(X, "X")
    _check_finite(y, "y")
    unique, index = np.unique(user_ids, return_inverse=True)
    order = np.argsort(index, kind="stable")
    counts = np.bincount(index, minlength=len(unique)).astype(np.int64)
    return X[order], y[order].astype(X.dtype, copy=False), counts, unique
