"""Map a per-chunk function over users in fixed-size chunks, inside jit.

Peak memory of a pass is then O(chunk * m * d) on top of the data itself. When
the chunk size does not divide ``t``, the last chunk is shifted back to end at
user ``t`` and overlaps its predecessor; the overlapped users are excluded from
reductions through the ``fresh`` mask and rewritten with identical values.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from lrs.sharding import UserAxis, psum


def map_user_chunks(
    fn: Callable, args, chunk_size: int | None, *, axis: UserAxis | None = None
) -> tuple[object, object]:
    """Applies ``fn(chunk_args, fresh) -> (per_user, summed)`` over user chunks.

    Args:
      fn: takes a pytree of ``(c, ...)`` arrays and ``fresh (c,)`` bool (users
        not seen in an earlier chunk) and returns ``(per_user, summed)``:
        per-user outputs with leading axis ``c`` and a pytree of sums over the
        chunk's fresh users.
      args: pytree of arrays with leading user axis ``t``.
      chunk_size: users per chunk; ``None`` or ``>= t`` means one chunk.
      axis: inside ``shard_map``, the users' mesh axis: ``args`` are this
        device's users and ``summed`` is summed over all devices.

    Returns:
      ``(per_user (t, ...), summed)``.
    """
    per_user, summed = _map_local(fn, args, chunk_size)
    return per_user, psum(summed, axis)


def _map_local(fn: Callable, args, chunk_size: int | None):
    t = jax.tree.leaves(args)[0].shape[0]
    if chunk_size is None or chunk_size >= t:
        return fn(args, jnp.ones((t,), bool))
    c = int(chunk_size)
    num_chunks = -(-t // c)

    def take(start):
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, c), args)

    out_shape = jax.eval_shape(fn, take(0), jnp.ones((c,), bool))
    per_user = jax.tree.map(
        lambda s: jnp.zeros((t,) + s.shape[1:], s.dtype), out_shape[0]
    )
    summed = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape[1])

    def body(i, carry):
        per_user, summed = carry
        start = jnp.minimum(i * c, t - c)
        fresh = start + jnp.arange(c) >= i * c
        out, part = fn(take(start), fresh)
        per_user = jax.tree.map(
            lambda buf, o: jax.lax.dynamic_update_slice_in_dim(buf, o, start, 0),
            per_user,
            out,
        )
        return per_user, jax.tree.map(jnp.add, summed, part)

    return jax.lax.fori_loop(0, num_chunks, body, (per_user, summed))
