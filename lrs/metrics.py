"""Error measures between fitted and planted parameters (pure, jittable)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lrs.linalg import subspace_distance
from lrs.params import LRSParams, weights

__all__ = [
    "mean_squared_error",
    "per_user_error",
    "relative_error",
    "subspace_distance",
    "support_recovery",
    "user_supports_correct",
]


def relative_error(params: LRSParams, truth: LRSParams) -> jax.Array:
    """``||W_hat - W*||_F / ||W*||_F`` over the dense ``(t, d)`` per-user weights."""
    W_star = weights(truth)
    return jnp.linalg.norm(weights(params) - W_star) / jnp.linalg.norm(W_star)


def per_user_error(params: LRSParams, truth: LRSParams) -> jax.Array:
    """``(t,)`` relative errors ``||theta_i - theta_i*|| / ||theta_i*||``."""
    W_star = weights(truth)
    num = jnp.linalg.norm(weights(params) - W_star, axis=1)
    return num / jnp.maximum(
        jnp.linalg.norm(W_star, axis=1), jnp.finfo(W_star.dtype).tiny
    )


def user_supports_correct(params: LRSParams, truth: LRSParams) -> jax.Array:
    """``(t,)`` bool: the user's fitted support equals the planted one (as sets)."""
    if params.B.indices.shape != truth.B.indices.shape:
        raise ValueError(
            f"params and truth must have the same (t, k) sparse shape; got "
            f"{params.B.indices.shape} and {truth.B.indices.shape}"
        )
    return jnp.all(
        jnp.sort(params.B.indices, axis=1) == jnp.sort(truth.B.indices, axis=1), axis=1
    )


def support_recovery(params: LRSParams, truth: LRSParams) -> jax.Array:
    """Fraction of users whose support is exactly right."""
    return jnp.mean(user_supports_correct(params, truth))


def mean_squared_error(params: LRSParams, data) -> jax.Array:
    """Mean squared prediction error over the real samples of ``data`` (UserData)."""
    pred = jnp.einsum("tmd,td->tm", data.X, weights(params))
    res = jnp.where(data.mask, pred - data.y, 0)
    return jnp.sum(res * res) / jnp.sum(data.mask)
