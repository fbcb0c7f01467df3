"""Specification of lrs.theory: the scalings and the fitting helpers."""

import math

import numpy as np
import pytest

from lrs import theory


def test_least_squares_error_matches_monte_carlo():
    rng = np.random.default_rng(0)
    m, p, sigma = 20, 4, 0.3
    errs = []
    for _ in range(3000):
        X = rng.normal(size=(m, p))
        noise = sigma * rng.normal(size=m)
        errs.append(np.sum(np.linalg.lstsq(X, noise, rcond=None)[0] ** 2))
    predicted = theory.least_squares_error(sigma, m, p)
    assert math.sqrt(np.mean(errs)) == pytest.approx(predicted, rel=0.05)
    assert theory.least_squares_error(sigma, p + 1, p) == math.inf


def test_noise_floor_is_linear_in_sigma_and_falls_with_m_and_t():
    kw = dict(m=30, t=100, d=50, r=3, k=2, c=2.0)
    sigmas = [1e-3, 1e-2, 1e-1]
    floors = [theory.noise_floor(s, **kw) for s in sigmas]
    assert theory.log_slope(sigmas, floors) == pytest.approx(1.0)
    assert theory.noise_floor(0.1, **(kw | dict(m=60))) < floors[2]
    assert theory.noise_floor(0.1, **(kw | dict(t=1000))) < floors[2]
    own = theory.least_squares_error(0.1, 30, 5)
    assert floors[2] > own  # the shared term adds to the per-user one
    rel = theory.relative_noise_floor(0.1, **kw, v_scale=2.0, b_scale=1.0)
    assert rel == pytest.approx(floors[2] / math.sqrt(3 * 4 + 2))


def test_sample_complexities_grow_with_their_arguments():
    base = theory.per_user_samples(3, 2, 100)
    assert base > 5  # more than the r + k unknowns: the support is unknown
    assert theory.per_user_samples(3, 0, 100) == 3
    assert theory.per_user_samples(3, 4, 100) > base
    assert theory.per_user_samples(3, 2, 1000) > base
    assert theory.per_user_samples(3, 2, 100, c=2.0) == pytest.approx(2 * base)
    assert theory.total_samples(100, 5, c=3.0) == 1500


def test_privacy_error_scales_as_one_over_epsilon_t():
    a = theory.privacy_error(1.0, 1e-5, t=1000, d=50, r=3)
    assert theory.privacy_error(2.0, 1e-5, t=1000, d=50, r=3) == pytest.approx(a / 2)
    assert theory.privacy_error(1.0, 1e-5, t=4000, d=50, r=3) == pytest.approx(a / 4)
    assert theory.privacy_error(1.0, 1e-8, t=1000, d=50, r=3) > a


def test_fit_constant_recovers_the_factor():
    predicted = np.array([1.0, 2.0, 4.0, np.nan])
    measured = 3.0 * predicted * np.exp([0.01, -0.01, 0.0, 0.0])
    assert theory.fit_constant(predicted, measured) == pytest.approx(3.0, rel=1e-3)


def test_linear_rate_and_log_slope():
    errors = 0.5 * 0.3 ** np.arange(20)
    errors = np.maximum(errors, 1e-12)  # a floor, outside the fitted window
    assert theory.linear_rate(errors) == pytest.approx(0.3)
    assert math.isnan(theory.linear_rate([1.0, 0.5]))
    assert theory.log_slope([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)


def test_fifty_percent_point_interpolates():
    xs = [10, 20, 30, 40]
    assert theory.fifty_percent_point(xs, [0, 0.25, 0.75, 1]) == pytest.approx(25)
    assert theory.fifty_percent_point(xs, [0.6, 1, 1, 1]) == 10
    assert math.isnan(theory.fifty_percent_point(xs, [0, 0, 0.1, 0.4]))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: theory.least_squares_error(-1.0, 10, 2), "sigma"),
        (lambda: theory.per_user_samples(3, 2, 5), "r \\+ k"),
        (lambda: theory.privacy_error(0.0, 1e-5, t=10, d=5, r=1), "epsilon"),
        (lambda: theory.privacy_error(1.0, 1.5, t=10, d=5, r=1), "delta"),
        (lambda: theory.fit_constant([1, 2], [1]), "same shape"),
        (lambda: theory.fit_constant([1, 2], [-1, 0]), "measured"),
        (lambda: theory.fifty_percent_point([1, 2], [0.5]), "xs"),
        (lambda: theory.total_samples(True, 2), "d"),
    ],
)
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
