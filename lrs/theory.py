"""Scalings that the experiments check AMHT-LRS against (host-side numpy).

Model: ``y_ij = <x_ij, U* v_i* + b_i*> + N(0, sigma^2)``, ``x_ij ~ N(0, I_d)``,
``t`` users with ``m`` samples each, rank ``r``, sparsity ``k``. The
functions state *how* a quantity scales; where the analysis fixes the
constant it is used (:func:`least_squares_error` is exact), elsewhere the
constant ``c`` is unknown and is fitted from measurements by
:func:`fit_constant` (the experiments record the fitted values, and
docs/results.md says which constants were fitted).

1. Per-user sample complexity (:func:`per_user_samples`): with ``U`` known a
   user has ``r + k`` unknowns plus an unknown support; hard thresholding
   needs ``m ~ c (r + k log(e d / k))`` samples (compressed sensing), and
   ``m >= r + k`` is the information floor.
2. Total samples for ``U`` (:func:`total_samples`): ``t m ~ c d r``.
3. Linear convergence (:func:`linear_rate`): ``err_T ~ rho^T err_0`` with
   ``rho < 1`` (fitted, not predicted).
4. Noise floor (:func:`noise_floor`): least squares on the right support and
   subspace costs ``sigma sqrt((r + k) / (m - r - k - 1))`` per user (exact
   for Gaussian designs), plus the error of the shared ``U``, ``~ sigma
   sqrt(c d r / (t m))``; linear in ``sigma`` (slope 1 on log axes).
5. Privacy (:func:`privacy_error`): a user-level (epsilon, delta) Gaussian
   mechanism on the shared statistics adds ``~ c sqrt(d r log(1.25 / delta))
   / (epsilon t)`` to the error of ``U``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "fifty_percent_point",
    "fit_constant",
    "least_squares_error",
    "linear_rate",
    "log_slope",
    "noise_floor",
    "per_user_samples",
    "privacy_error",
    "relative_noise_floor",
    "total_samples",
]


def _positive(name: str, value, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float | np.number) and not isinstance(value, bool)
    if (
        not ok
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {expected}; got {value!r}")
    return float(value)


def per_user_samples(r: int, k: int, d: int, *, c: float = 1.0) -> float:
    """Samples per user to recover ``v_i`` and a k-sparse ``b_i`` given ``U``.

    ``c (r + k log(e d / k))`` (``c r`` when ``k = 0``). ``c`` is unknown:
    fit it from the 50% points of a phase transition.
    """
    r, k, d = (
        _positive("r", r, allow_zero=True),
        _positive("k", k, allow_zero=True),
        _positive("d", d),
    )
    if r + k >= d:
        raise ValueError(f"r + k must be < d = {d}; got r = {r}, k = {k}")
    return c * (r + (k * math.log(math.e * d / k) if k else 0.0))


def total_samples(d: int, r: int, *, c: float = 1.0) -> float:
    """Total samples ``t m`` to estimate the shared ``U``: ``c d r``."""
    return c * _positive("d", d) * _positive("r", r)


def least_squares_error(sigma: float, m: int, p: int) -> float:
    """Root expected squared error of least squares with ``p`` unknowns.

    For ``m`` Gaussian samples ``N(0, I_p)`` and noise ``N(0, sigma^2)``:
    ``E ||w_hat - w||^2 = sigma^2 p / (m - p - 1)`` (``inf`` for ``m <= p + 1``).
    """
    sigma, m, p = (
        _positive("sigma", sigma, allow_zero=True),
        _positive("m", m),
        _positive("p", p, allow_zero=True),
    )
    if m <= p + 1:
        return math.inf
    return sigma * math.sqrt(p / (m - p - 1))


def noise_floor(
    sigma: float, *, m: int, t: int, d: int, r: int, k: int, c: float = 1.0
) -> float:
    """Predicted root mean squared per-user error ``||theta_i - theta_i*||``.

    ``sqrt(per-user least squares^2 + c sigma^2 d r / (t m))``: the exact
    per-user term of :func:`least_squares_error` with ``p = r + k`` and the
    shared-factor term with an unknown constant ``c``.
    """
    own = least_squares_error(sigma, m, r + k)
    shared = (
        c
        * sigma**2
        * _positive("d", d)
        * _positive("r", r)
        / (_positive("t", t) * _positive("m", m))
    )
    return math.sqrt(own**2 + shared)


def relative_noise_floor(
    sigma: float,
    *,
    m: int,
    t: int,
    d: int,
    r: int,
    k: int,
    v_scale: float = 1.0,
    b_scale: float = 1.0,
    c: float = 1.0,
) -> float:
    """:func:`noise_floor` over ``sqrt(E ||theta_i*||^2) = sqrt(r v^2 + k b^2)``,
    comparable with :func:`lrs.metrics.relative_error` on
    :func:`lrs.synthetic.make_problem` data."""
    norm = math.sqrt(r * v_scale**2 + k * b_scale**2)
    return noise_floor(sigma, m=m, t=t, d=d, r=r, k=k, c=c) / norm


def privacy_error(
    epsilon: float, delta: float, *, t: int, d: int, r: int, c: float = 1.0
) -> float:
    """Error of ``U`` added by user-level (epsilon, delta) Gaussian noise.

    ``c sqrt(d r log(1.25 / delta)) / (epsilon t)``: the Gaussian mechanism's
    standard deviation (sensitivity over ``t`` users) times the ``sqrt(d r)``
    entries of ``U``. ``c`` (clipping level, number of releases) is unknown.
    """
    epsilon = _positive("epsilon", epsilon)
    delta = _positive("delta", delta)
    if not delta < 1:
        raise ValueError(f"delta must lie in (0, 1); got {delta!r}")
    return c * math.sqrt(d * r * math.log(1.25 / delta)) / (epsilon * _positive("t", t))


def fit_constant(predicted, measured) -> float:
    """``c`` with ``measured ~ c * predicted``, least squares in log space.

    Entries that are not finite and positive in both are ignored.

    Raises:
      ValueError: shapes differ or no usable pair.
    """
    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    if predicted.shape != measured.shape:
        raise ValueError(
            f"predicted and measured must have the same shape; got "
            f"{predicted.shape} and {measured.shape}"
        )
    ok = (
        np.isfinite(predicted)
        & np.isfinite(measured)
        & (predicted > 0)
        & (measured > 0)
    )
    if not ok.any():
        raise ValueError("measured: no finite positive value to fit the constant to")
    return float(np.exp(np.mean(np.log(measured[ok]) - np.log(predicted[ok]))))


def log_slope(x, y) -> float:
    """Slope of ``log y`` against ``log x`` (least squares): 1 for ``y ~ x``."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        raise ValueError("x, y: need at least two finite positive pairs")
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def linear_rate(errors, *, low: float = 1e-8, high: float = 1e-1) -> float:
    """Contraction factor per iteration ``rho`` with ``err_T ~ rho^T``.

    Fitted to the iterations whose error lies in ``(low, high)`` (the linear
    phase, above the rounding or noise floor); NaN with fewer than 3 of them.
    """
    errors = np.asarray(errors, float)
    steps = np.flatnonzero((errors > low) & (errors < high))
    if steps.size < 3:
        return math.nan
    return float(10 ** np.polyfit(steps, np.log10(errors[steps]), 1)[0])


def fifty_percent_point(xs, success) -> float:
    """Smallest ``x`` where ``success(x)`` crosses 0.5, linearly interpolated.

    ``xs`` increasing; NaN if success never reaches 0.5, ``xs[0]`` if it
    starts there.
    """
    xs, success = np.asarray(xs, float), np.asarray(success, float)
    if xs.shape != success.shape or xs.ndim != 1:
        raise ValueError(
            f"xs and success must be 1-d of the same length; got {xs.shape}, "
            f"{success.shape}"
        )
    above = np.flatnonzero(success >= 0.5)
    if above.size == 0:
        return math.nan
    j = above[0]
    if j == 0:
        return float(xs[0])
    x0, x1, s0, s1 = xs[j - 1], xs[j], success[j - 1], success[j]
    return float(x0 + (0.5 - s0) * (x1 - x0) / (s1 - s0))
