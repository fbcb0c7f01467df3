"""Small linear-algebra building blocks shared by the solvers."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_indices(scores: jax.Array, k: int) -> jax.Array:
    """Indices ``(..., k)`` int32 of the ``k`` largest ``scores (..., d)``, in order.

    Ties go to the lower index. For small ``k`` this is ``k`` rounds of argmax,
    several times faster than ``lax.top_k`` (a sort) on CPU.
    """
    if k > 32:
        return jax.lax.top_k(scores, k)[1].astype(jnp.int32)
    positions = jnp.arange(scores.shape[-1])

    def pick(j, carry):
        remaining, chosen = carry
        best = jnp.argmax(remaining, axis=-1).astype(jnp.int32)
        remaining = jnp.where(positions == best[..., None], -jnp.inf, remaining)
        return remaining, chosen.at[..., j].set(best)

    chosen = jnp.zeros(scores.shape[:-1] + (k,), jnp.int32)
    return jax.lax.fori_loop(0, k, pick, (scores, chosen))[1]


def hard_threshold(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The ``k`` largest-magnitude entries of ``x (..., d)``.

    Returns:
      ``(indices (..., k) int32, values (..., k))``, sorted by decreasing magnitude;
      ties are broken towards the lower index.
    """
    if k == 0:
        return (
            jnp.zeros(x.shape[:-1] + (0,), jnp.int32),
            jnp.zeros(x.shape[:-1] + (0,), x.dtype),
        )
    idx = top_k_indices(jnp.abs(x), k)
    return idx, jnp.take_along_axis(x, idx, axis=-1)


def orthonormalize(A: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Thin QR ``A (d, r) = Q R`` with ``diag(R) >= 0``, so the result is unique."""
    Q, R = jnp.linalg.qr(A)
    signs = jnp.where(jnp.diag(R) < 0, -1.0, 1.0).astype(A.dtype)
    return Q * signs, R * signs[:, None]


def jitter(dtype) -> float:
    """Relative diagonal shift that keeps Cholesky of a Gram matrix well defined."""
    return 1e-12 if jnp.dtype(dtype) == jnp.float64 else 1e-6


def spd_solve(G: jax.Array, h: jax.Array, ridge: float | jax.Array = 0.0) -> jax.Array:
    """Solves ``(G + ridge I) x = h`` for a symmetric PSD ``G (p, p)`` by Cholesky.

    A relative jitter of ``jitter(dtype) * trace(G) / p`` keeps it defined when
    ``G`` is singular (e.g. a user with fewer samples than unknowns).
    """
    p = G.shape[-1]
    trace = jnp.trace(G)
    shift = ridge + jitter(G.dtype) * (trace / p + 1e-30)
    L = jnp.linalg.cholesky(G + shift * jnp.eye(p, dtype=G.dtype))
    x = jax.scipy.linalg.cho_solve((L, True), h)
    # An overflowed system must not pass for a zero solution: make it NaN so
    # the fit's non-finite check reports it. For a PSD G an infinite entry
    # means an infinite diagonal (|G_ij| <= sqrt(G_ii G_jj)), so the trace
    # tells; a NaN anywhere in G gives a NaN factor already.
    return jnp.where(jnp.isfinite(trace) & jnp.isfinite(h).all(), x, jnp.nan)


def subspace_distance(U1: jax.Array, U2: jax.Array) -> jax.Array:
    """Sine of the largest principal angle between the spans of ``U1, U2 (d, r)``.

    Both must have orthonormal columns: ``|| (I - U1 U1^T) U2 ||_2``.
    """
    residual = U2 - U1 @ (U1.T @ U2)
    return jnp.minimum(jnp.linalg.norm(residual, ord=2), 1.0)
