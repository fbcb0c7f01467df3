"""What users run: float32 (x64 off), features on any scale, default arguments.

The suite turns x64 on globally; these tests turn it off around each fit, so
every intermediate is what a user's default float32 session computes.
"""

import jax
import numpy as np
import pytest

import lrs

pytestmark = pytest.mark.usefixtures("cheap_compiles")

CONFIG = lrs.AMHTConfig(rank=3, sparsity=3)


@pytest.fixture(scope="module")
def problem():
    with jax.enable_x64(False):
        return lrs.synthetic.make_problem(
            jax.random.key(0), d=30, t=300, m=30, r=3, k=3
        )


def _scaled(data, truth, s):
    """Features times ``s``: the same problem with weights divided by ``s``."""
    B = truth.B._replace(values=truth.B.values / s)
    return lrs.UserData(data.X * s, data.y, data.mask), truth._replace(
        V=truth.V / s, B=B
    )


FITS = {
    "fit": lambda data, config, **kw: lrs.fit(data, config, **kw),
    "streamed": lambda data, config, **kw: lrs.fit_streamed(
        lrs.UserData.from_host(*(np.asarray(a) for a in data)),
        config,
        chunk_users=128,
        **kw,
    ),
}


@pytest.mark.parametrize("scale", [1e-8, 1e-4, 1e4, 1e10])
def test_float32_fits_recover_features_on_any_scale(problem, scale):
    """The CG U-step's preconditioner is scaled to the features (it assumed
    x^T x ~ d and overflowed float32 at 1e10, underflowed at 1e-8)."""
    data, truth = _scaled(*problem, scale)
    with jax.enable_x64(False):
        params, diagnostics = lrs.fit(data, CONFIG, truth=truth)
    assert params.U.dtype == np.float32
    assert diagnostics.relative_error[-1] < 1e-4, scale


@pytest.mark.parametrize("fit", FITS.values(), ids=FITS.keys())
def test_float32_streamed_and_in_memory_fits_recover_scaled_features(problem, fit):
    data, truth = _scaled(*problem, 1e10)
    with jax.enable_x64(False):
        _, diagnostics = fit(data, CONFIG, truth=truth)
    assert diagnostics.relative_error[-1] < 1e-4


@pytest.mark.parametrize("t, r", [(1, 2), pytest.param(2, 3, marks=pytest.mark.slow)])
def test_fewer_users_than_the_rank_fit_without_error(t, r):
    with jax.enable_x64(False):
        data, _ = lrs.synthetic.make_problem(
            jax.random.key(1), d=10, t=t, m=20, r=r, k=1
        )
        params, diagnostics = lrs.fit(data, lrs.AMHTConfig(rank=r, sparsity=1))
    assert np.all(np.isfinite(np.asarray(lrs.weights(params))))
    assert diagnostics.loss[-1] < 1e-6 * diagnostics.loss[0]


@pytest.mark.parametrize("fit", FITS.values(), ids=FITS.keys())
def test_bad_key_and_truth_are_refused_naming_them(problem, fit):
    data, truth = problem
    config = lrs.AMHTConfig(rank=3, sparsity=3, init="random", num_iters=1)
    for bad in (0, np.zeros(3, np.uint32), jax.random.split(jax.random.key(0))):
        with pytest.raises(ValueError, match="key must be one jax.random key"):
            fit(data, config, key=bad)
    with pytest.raises(ValueError, match="truth must be an lrs.LRSParams"):
        fit(data, config, truth=tuple(truth))
