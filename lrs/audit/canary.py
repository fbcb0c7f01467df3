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
* ``'overflow'``: D' holds the crafted user of theta = s (U* e_1 + w) and D
  the same user with X and y multiplied by ``overflow_scale`` (1e20: in
  float32 its statistics overflow). A fit that let such a user break the
  clipping (NaN sums, a refusal) would tell D from D' with certainty; with
  the overflow-proof clipping the scaled user contributes exactly zero, so D
  is D' without the canary.

The data are in ``problem.dtype`` (float64 by default; they are built under
``jax.enable_x64``, as the audit runs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lrs.data import UserData
from lrs.synthetic import make_problem

CANARIES = ("crafted", "ordinary", "overflow")
DTYPES = ("float64", "float32")


def _finite_positive(name: str, value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value < math.inf
    ):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class AuditProblem:
    """The planted problem around the canary.

    Attributes:
      d, r, k, m: features, rank, sparsity, samples per user.
      t: base users (the data sets have t + 1 users).
      noise: label noise of the base users.
      canary: ``'crafted'``, ``'ordinary'`` or ``'overflow'``.
      canary_scale: s, the size of the crafted canary's model (large enough
        that its contributions are clipped in every release).
      dtype: ``'float64'`` or ``'float32'``, the data's dtype, which decides
        the audited program's (its noise is drawn in float64 either way).
      overflow_scale: the factor on X and y of the ``'overflow'`` canary's
        scaled user (default 1e20, whose statistics overflow float32).
    """

    d: int = 10
    r: int = 2
    k: int = 1
    m: int = 20
    t: int = 50
    noise: float = 0.1
    canary: str = "crafted"
    canary_scale: float = 10.0
    dtype: str = "float64"
    overflow_scale: float = 1e20

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
        if self.canary != "ordinary" and self.m < self.d:
            raise ValueError(
                f"the {self.canary} canary needs an orthonormal design, m >= d; "
                f"got m={self.m}, d={self.d}"
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
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}; got {self.dtype!r}")
        _finite_positive("overflow_scale", self.overflow_scale)


class Neighbours(NamedTuple):
    """D and D', the planted U*, and the canary's geometry.

    ``anchor`` (U* e_1) and ``direction`` (w, orthogonal to U*) are unit
    vectors of shape ``(d,)``; ``moment_out`` and ``moment_in`` are the slot
    users' a = X^T y / m (``(d,)`` each; the ``'ordinary'`` canary's score
    reads them; inf where the ``'overflow'`` user overflows).
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

    In ``problem.dtype``; built under ``jax.enable_x64(True)``, so float64
    data need no global flag (the audit itself runs under it).
    """
    if not isinstance(problem, AuditProblem):
        raise ValueError(
            f"problem must be an AuditProblem; got {type(problem).__name__}"
        )
    sizes = dataclasses.replace(
        problem, canary="crafted", canary_scale=1.0, overflow_scale=1.0, dtype="float64"
    )
    with jax.enable_x64(True):
        neighbours = _neighbours(
            sizes,
            key,
            jnp.asarray(problem.canary != "ordinary"),
            jnp.asarray(problem.canary == "overflow"),
            jnp.asarray(problem.canary_scale, jnp.float64),
            jnp.asarray(problem.overflow_scale, jnp.float64),
        )
        # float32 data are the float64 data rounded: one compilation, and the
        # float32 audits see the same users as the float64 ones.
        dtype = jnp.dtype(problem.dtype)
        return jax.tree.map(
            lambda a: a.astype(dtype) if a.dtype.kind == "f" else a, neighbours
        )


@functools.partial(jax.jit, static_argnums=0)
def _neighbours(sizes: AuditProblem, key, crafted, overflow, scale, blow_up):
    """Both kinds of slot users are drawn; ``crafted`` and ``overflow``
    (traced) pick them, so one compilation serves every canary (float64)."""
    dtype = jnp.float64
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
    y_plus = X @ (scale * (anchor + direction))
    y_minus = jnp.where(overflow, y_plus, X @ (scale * (anchor - direction)))
    factor = jnp.where(overflow, blow_up, 1)
    X_out = jnp.where(crafted, factor * X, data.X[p.t])
    X_in = jnp.where(crafted, X, data.X[p.t + 1])
    y_out = jnp.where(crafted, factor * y_minus, data.y[p.t])
    y_in = jnp.where(crafted, y_plus, data.y[p.t + 1])
    return Neighbours(
        data_out=_with_slot(base, X_out, y_out),
        data_in=_with_slot(base, X_in, y_in),
        truth_U=U,
        anchor=anchor,
        direction=direction,
        moment_out=_moment(X_out, y_out),
        moment_in=_moment(X_in, y_in),
    )
