"""Host data streamed to the device in chunks of users.

:class:`Stream` cuts a host (or memory-mapped) :class:`lrs.UserData` into
chunks of ``c`` users, optionally split over a mesh's ``'users'`` devices or
kept on the device after the first pass (``resident``); :class:`RaggedStream`
does the same for a :class:`lrs.RaggedData`, packing users of similar sample
counts together. The streamed fits (:mod:`lrs.streaming`,
:mod:`lrs.private.streaming`) run every pass over the data through them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrs import sharding
from lrs.data import UserData, float_dtype, padded_width

__all__ = ["RaggedStream", "Samples", "Stream", "drain", "rows_count"]


class Stream:
    """Host data cut into chunks of ``c`` users, the last one padded with
    empty users (no samples), so every chunk has one shape.

    With a ``mesh``, each chunk is split over the mesh's ``'users'`` devices
    (``c`` rounded up to a multiple of them): every device receives and
    computes on its own users of the chunk, and each per-chunk program runs
    on all devices at once (jit partitions it by its inputs' sharding; the
    sums over users become cross-device reductions).
    """

    def __init__(self, data: UserData, c: int, mesh=None, resident: bool = False):
        self.data = data
        self.resident, self._kept = resident, {}
        self.t, self.m, self.d = self._shape(data)
        self.c = min(c, self.t)
        self.mesh, self.placement = mesh, None
        if mesh is not None:
            self.c = sharding.padded_users(self.c, sharding.check_mesh(mesh))
            # Auto axes: jit partitions each per-chunk program by its inputs
            # (an Explicit mesh, jax.make_mesh's default, would instead ask
            # every sum over users for an output sharding).
            auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
            mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)
            spec = jax.sharding.PartitionSpec(sharding.AXIS)
            self.placement = jax.sharding.NamedSharding(mesh, spec)
        self.dtype = float_dtype(data.X.dtype)

    @staticmethod
    def _shape(data) -> tuple[int, int, int]:
        return data.X.shape

    def _spans(self, users) -> list:
        """The rows of each chunk: all users in order, or ``users``."""
        if users is None:
            return [slice(s, min(s + self.c, self.t)) for s in range(0, self.t, self.c)]
        return [users[i : i + self.c] for i in range(0, len(users), self.c)]

    def sample_buffer(self):
        """A zero host buffer of one value per sample (the ``(t, m)`` layout)."""
        return np.zeros((self.t, self.m), self.dtype)

    def store(self, target, rows, n: int, value) -> None:
        """Writes a chunk's result ``value`` (``c`` rows) into ``target[rows]``."""
        target[rows] = np.asarray(value)[:n]

    def narrower(self, c: int) -> Stream:
        """The same data streamed ``c`` users at a time."""
        return type(self)(self.data, c, self.mesh)

    def _load(self, rows, per_user, data: bool):
        """One chunk on the device: X, y, mask (if ``data``) and ``per_user``."""
        n = rows_count(rows)
        out = []
        if data:
            X, y, mask = self.data
            out += [padded_rows(X, rows, n, self.c, self.dtype)]
            out += [padded_rows(y, rows, n, self.c, self.dtype)]
            out += [padded_rows(mask, rows, n, self.c, bool)]
        out += [padded_rows(a, rows, n, self.c, a.dtype) for a in per_user]
        return jax.device_put(out, self.placement)

    def chunks(self, *per_user, users=None, data=True) -> Iterator[tuple[object, list]]:
        """Yields ``(rows, device arrays)`` chunk by chunk.

        The arrays are ``X, y, mask`` (unless ``data`` is False) and the rows
        of each host array in ``per_user``. The next chunk is read and copied
        once the caller has dispatched its work on the current one. ``users``
        (sorted indices) streams only those users, ``c`` at a time.
        """
        spans = self._spans(users)
        keep = self.resident and data and users is None
        current = self._get(0, spans[0], per_user, data, keep) if spans else None
        for i, rows in enumerate(spans):
            yield rows, current
            if i + 1 < len(spans):
                current = self._get(i + 1, spans[i + 1], per_user, data, keep)

    def _get(self, i: int, rows, per_user, data: bool, keep: bool) -> list:
        """:meth:`_load`, the data of chunk ``i`` kept on the device after
        its first pass when ``keep`` (``resident``)."""
        if not keep:
            return self._load(rows, per_user, data)
        if i not in self._kept:
            self._kept[i] = self._load(rows, (), True)
        return list(self._kept[i]) + list(self._load(rows, per_user, False))

    def total(self, fn: Callable, *per_user):
        """Sum over chunks of ``fn(*device_arrays)`` (a pytree), on the device."""
        acc = None
        for _, arrays in self.chunks(*per_user):
            part = fn(*arrays)
            acc = part if acc is None else jax.tree.map(jnp.add, acc, part)
        return acc


class Samples(NamedTuple):
    """A host buffer of one value per sample of a :class:`RaggedData`, in its
    order: ``flat (N,)``."""

    flat: np.ndarray


class RaggedStream(Stream):
    """A :class:`RaggedData` cut into chunks of ``c`` users of similar counts.

    Users are sorted by sample count and taken ``c`` at a time; a chunk's
    samples are left-packed into ``(c, m_b, d)``, ``m_b`` its largest count
    rounded up to a power of two (a few distinct shapes: a few compilations
    of each program, at most twice the chunk's real samples). Per-user
    results go to the users' own rows; per-sample buffers are
    :class:`Samples`. Memory follows the number of samples, not ``t m_max``.
    """

    @staticmethod
    def _shape(data) -> tuple[int, int, int]:
        return data.num_users, 0, data.dim

    def _spans(self, users) -> list:
        users = np.arange(self.t) if users is None else np.asarray(users)
        users = users[np.argsort(self.data.counts[users], kind="stable")]
        return [users[i : i + self.c] for i in range(0, len(users), self.c)]

    def sample_buffer(self) -> Samples:
        return Samples(np.zeros(len(self.data.y), self.dtype))

    def width(self, rows) -> int:
        """``m_b``: the chunk's largest count rounded up to a power of two."""
        return padded_width(self.data.counts[rows].max(initial=1))

    def _load(self, rows, per_user, data: bool):
        n, m = len(rows), self.width(rows)
        row, column, source = self.data.positions(rows)

        def packed(a, tail, dtype):
            out = np.zeros((self.c, m) + tail, dtype)
            out[row, column] = a[source]
            return out

        out = []
        if data:
            out += [packed(self.data.X, (self.d,), self.dtype)]
            out += [packed(self.data.y, (), self.dtype)]
            mask = np.zeros((self.c, m), bool)
            mask[row, column] = True
            out += [mask]
        for a in per_user:
            if isinstance(a, Samples):
                out += [packed(a.flat, (), a.flat.dtype)]
            else:
                out += [padded_rows(a, rows, n, self.c, a.dtype)]
        return jax.device_put(out, self.placement)

    def store(self, target, rows, n: int, value) -> None:
        if not isinstance(target, Samples):
            return super().store(target, rows, n, value)
        row, column, source = self.data.positions(rows)
        target.flat[source] = np.asarray(value)[row, column]


def padded_rows(a, rows, n: int, c: int, dtype) -> np.ndarray:
    """``a[rows]`` as a fresh array of ``c`` rows (zeros past ``n``)."""
    out = np.zeros((c,) + tuple(a.shape[1:]), dtype)
    out[:n] = np.asarray(a[rows])
    return out


def drain(pending, targets, stream: Stream | None = None) -> None:
    """Writes a chunk's results (``(rows, n, outputs)``) into host arrays
    (through ``stream.store``: a ragged stream's per-sample buffers)."""
    if pending is None:
        return
    rows, n, outputs = pending
    for target, value in zip(targets, outputs):
        if stream is None:
            target[rows] = np.asarray(value)[:n]
        else:
            stream.store(target, rows, n, value)


def rows_count(rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else len(rows)
