"""Users sharded over the devices of a ``jax.sharding.Mesh``.

The fit runs under ``jax.shard_map`` with every per-user array split along
the mesh axis ``'users'``: each device holds a contiguous block of
``t_local = ceil(t / D)`` users (the last blocks padded with empty users), does
their per-user work, and the shared statistics are summed across devices with
``psum`` inside the jitted program. Global selections over users (the median
score, the worst users to rescue) gather the ``(t,)`` scores, so they pick
exactly what the single-device fit picks.

Functions here take ``axis: UserAxis | None``; ``None`` is the single-device
program, where every helper is the identity.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lrs.data import UserData

AXIS = "users"


@dataclasses.dataclass(frozen=True)
class UserAxis:
    """The mesh axis users are sharded over, seen from inside ``shard_map``.

    Attributes:
      name: mesh axis name (``'users'``).
      num_users: ``t``, the real users over all devices (before padding).
    """

    name: str
    num_users: int


def psum(tree, axis: UserAxis | None):
    """Sums a pytree over the devices of ``axis`` (identity for ``None``)."""
    if axis is None or tree is None:
        return tree
    return jax.lax.psum(tree, axis.name)


def all_users(x: jax.Array, axis: UserAxis | None) -> jax.Array:
    """``(t_local, ...)`` per-user values -> ``(t, ...)`` for all real users."""
    if axis is None:
        return x
    return jax.lax.all_gather(x, axis.name, tiled=True)[: axis.num_users]


def first_user(t_local: int, axis: UserAxis | None) -> jax.Array:
    """Global index of this device's first user (0 for ``None``)."""
    if axis is None:
        return jnp.zeros((), jnp.int32)
    return jax.lax.axis_index(axis.name).astype(jnp.int32) * t_local


def check_mesh(mesh) -> int:
    """Validates ``mesh``; returns the number of devices along ``'users'``."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    if AXIS not in mesh.axis_names:
        raise ValueError(
            f"mesh must have an axis named {AXIS!r}; got axis names {mesh.axis_names}"
        )
    return int(mesh.shape[AXIS])


def padded_users(t: int, num_devices: int) -> int:
    """``t`` rounded up to a multiple of ``num_devices``."""
    return -(-t // num_devices) * num_devices


def shard_data(data: UserData, mesh) -> UserData:
    """``data`` padded to a multiple of the devices and placed across ``mesh``.

    Padded users (appended after user ``t - 1``) have no samples: ``mask``
    False, zero ``X`` and ``y``. Each device's block is copied from ``data``
    (numpy, memory-mapped or JAX arrays; never modified) without forming a
    padded copy. Under multi-host JAX every process passes the same global
    ``data`` and fills only its own devices' blocks.
    """
    num = check_mesh(mesh)
    t_pad = padded_users(data.num_users, num)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
    return jax.tree.map(lambda a: place_users(a, t_pad, spec), data)


def shard_truth(truth, mesh):
    """Planted :class:`LRSParams` with ``V`` and ``B`` padded and sharded like data."""
    num = check_mesh(mesh)
    t_pad = padded_users(truth.V.shape[0], num)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
    every = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    B = jax.tree.map(lambda a: place_users(a, t_pad, spec), truth.B)
    U = place_users(truth.U, truth.U.shape[0], every)
    return type(truth)(U, place_users(truth.V, t_pad, spec), B)


def place_users(a, t_pad: int, sharding) -> jax.Array:
    """``a (t, ...)`` zero-padded to ``(t_pad, ...)``, placed on ``sharding``."""
    t = a.shape[0]

    def block(index):
        rows = index[0]
        start = rows.start or 0
        stop = t_pad if rows.stop is None else rows.stop
        out = np.zeros((stop - start,) + tuple(a.shape[1:]), a.dtype)
        real = max(0, min(stop, t) - start)
        if real:
            out[:real] = np.asarray(a[start : start + real])
        return out[(slice(None),) + tuple(index[1:])]

    shape = (t_pad,) + tuple(a.shape[1:])
    return jax.make_array_from_callback(shape, sharding, block)


def gathered(a: jax.Array) -> jax.Array:
    """A (possibly multi-host) global array, whole, on the default device."""
    if jax.process_count() > 1 and not a.is_fully_addressable:
        from jax.experimental import multihost_utils

        a = multihost_utils.process_allgather(a, tiled=True)
    return jnp.asarray(np.asarray(a))
