"""Neighbouring data sets for the privacy audit: D (canary out) and D' (in).

Both hold the same ``t`` base users plus one slot that differs (the
replace-one relation of docs/privacy.md):

* ``'crafted'``: the slot holds a user with an orthonormal design
  (X^T X = m I) and noiseless labels y = X theta, theta = s (U* e_1 +/- w),
  where w is a unit vector orthogonal to U*. Its per-user fit keeps v close to
  s e_1 in both data sets, so its residual, and with it its gradient
  statistic G = X^T res v^T, flips sign between D' (+w) and D (-w): the two
  clipped contributions point in opposite directions, the worst case the
  sensitivity bound 2 allows. It pushes the released U to tilt U* e_1 toward
  +w or -w.
* ``'ordinary'``: the slot holds one user drawn like the base users in D and
  another one in D' -- the canary an attacker usually has to work with.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lrs.data import UserData
from lrs.synthetic import make_problem

CANARIES = ("crafted", "ordinary")


@dataclasses.dataclass(frozen=True)
class AuditProblem:
    """The planted problem around the canary.

    Attributes:
      d, r, k, m: features, rank, sparsity, samples per user.
      t: base users (the data sets have t + 1 users).
      noise: label noise of the base users.
      canary: ``'crafted'`` or ``'ordinary'``.
      canary_scale: s, the size of the crafted canary's model (large enough
        that its contributions are clipped in every release).
    """

    d: int = 10
    r: int = 2
    k: int = 1
    m: int = 20
    t: int = 50
    noise: float = 0.1
    canary: str = "crafted"
    canary_scale: float = 10.0

    def __post_init__(self):
        for name in ("d", "r", "m", "t"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"k must be an int >= 0; got {self.k!r}")
        if not self.r + self.k < self.d:
            raise ValueError(f"need r + k < d; got r={self.r}, k={self.k}, d={self.d}")
        if self.canary not in CANARIES:
            raise ValueError(f"canary must be one of {CANARIES}; got {self.canary!r}")
        if self.canary == "crafted" and self.m < self.d:
            raise ValueError(
                "the crafted canary needs an orthonormal design, m >= d; got "
                f"m={self.m}, d={self.d}"
            )
        for name in ("noise", "canary_scale"):
            value = getattr(self, name)
            if (
                not isinstance(value, int | float)
                or not value >= 0
                or value == float("inf")
            ):
                raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
        if self.canary_scale <= 0:
            raise ValueError(f"canary_scale must be > 0; got {self.canary_scale!r}")


class Neighbours(NamedTuple):
    """D and D', the planted U*, and the canary's geometry.

    ``anchor`` (U* e_1) and ``direction`` (w, orthogonal to U*) are unit
    vectors of shape ``(d,)``; for ``'ordinary'`` canaries ``moment_out`` and
    ``moment_in`` are the slot users' a = X^T y / m (``(d,)`` each).
    """

    data_out: UserData
    data_in: UserData
    truth_U: jax.Array  # (d, r) the planted U*
    anchor: jax.Array
    direction: jax.Array
    moment_out: jax.Array
    moment_in: jax.Array


def _with_slot(base: UserData, X, y) -> UserData:
    mask = jnp.ones((1, X.shape[0]), bool)
    return UserData(
        jnp.concatenate([base.X, X[None]]),
        jnp.concatenate([base.y, y[None]]),
        jnp.concatenate([base.mask, mask]),
    )


def _moment(X, y) -> jax.Array:
    return X.T @ y / X.shape[0]


def neighbouring_datasets(problem: AuditProblem, key) -> Neighbours:
    """D (canary out) and D' (canary in) for ``problem``, from ``key``.

    Float64 under ``jax_enable_x64`` (as ``lrs audit`` runs), else float32.
    """
    if not isinstance(problem, AuditProblem):
        raise ValueError(
            f"problem must be an AuditProblem; got {type(problem).__name__}"
        )
    sizes = dataclasses.replace(problem, canary="crafted", canary_scale=1.0)
    crafted = jnp.asarray(problem.canary == "crafted")
    return _neighbours(sizes, key, crafted, problem.canary_scale)


@functools.partial(jax.jit, static_argnums=0)
def _neighbours(sizes: AuditProblem, key, crafted, scale) -> Neighbours:
    """Both kinds of slot users are drawn; ``crafted`` (traced) picks one, so
    one compilation serves both canaries."""
    dtype = jnp.zeros(()).dtype
    p = sizes
    k_base, k_design, k_dir = jax.random.split(key, 3)
    data, truth = make_problem(
        k_base, d=p.d, t=p.t + 2, m=p.m, r=p.r, k=p.k, noise=p.noise, dtype=dtype
    )
    base = UserData(data.X[: p.t], data.y[: p.t], data.mask[: p.t])
    U = truth.U
    anchor = U[:, 0]
    direction = jax.random.normal(k_dir, (p.d,), dtype)
    direction = direction - U @ (U.T @ direction)
    direction = direction / jnp.linalg.norm(direction)
    Q, _ = jnp.linalg.qr(jax.random.normal(k_design, (p.m, p.d), dtype))
    X = jnp.sqrt(jnp.asarray(p.m, dtype)) * Q
    X_out = jnp.where(crafted, X, data.X[p.t])
    X_in = jnp.where(crafted, X, data.X[p.t + 1])
    y_out = jnp.where(crafted, X @ (scale * (anchor - direction)), data.y[p.t])
    y_in = jnp.where(crafted, X @ (scale * (anchor + direction)), data.y[p.t + 1])
    return Neighbours(
        data_out=_with_slot(base, X_out, y_out),
        data_in=_with_slot(base, X_in, y_in),
        truth_U=U,
        anchor=anchor,
        direction=direction,
        moment_out=_moment(X_out, y_out),
        moment_in=_moment(X_in, y_in),
    )
