"""Per-user sparsity (``AMHTConfig.sparse_significance``): each user keeps the
sparse values its data supports, at most ``k``; noiseless recovery is
unchanged; every fit path applies the same rule; selection can choose it."""

import dataclasses

import jax
import numpy as np
import pytest

import lrs
from lrs import peruser, selection

pytestmark = pytest.mark.usefixtures("cheap_compiles")

D, T, M, R, K = 20, 120, 60, 2, 2


def _kept(params) -> np.ndarray:
    return np.asarray(params.B.values != 0).sum(axis=1)


@pytest.fixture(scope="module")
def noisy_no_sparse():
    """Heavy-tailed activity (10 to 60 samples), noise, no planted sparse part."""
    data, truth = lrs.synthetic.make_problem(
        jax.random.key(5), d=D, t=T, m=M, r=R, k=1, noise=0.5, b_scale=0.0,
        m_min=10, dtype="float32",
    )  # fmt: skip
    return data, truth


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_noiseless_recovery_keeps_every_value(dtype):
    data, truth = lrs.synthetic.make_problem(
        jax.random.key(1), d=30, t=100, m=30, r=3, k=3, dtype=dtype
    )
    config = lrs.AMHTConfig(3, 3, sparse_significance=3.0)
    params, _ = lrs.fit(data, config, key=jax.random.key(0))
    assert float(lrs.metrics.relative_error(params, truth)) < (
        1e-8 if dtype == "float64" else 1e-4
    )
    assert (_kept(params) == 3).all()


def test_spurious_values_are_dropped_and_the_error_falls(noisy_no_sparse):
    data, truth = noisy_no_sparse
    errors, kept = {}, {}
    for level in (0.0, 3.0):
        config = lrs.AMHTConfig(R, K, num_iters=15, sparse_significance=level)
        params, _ = lrs.fit(data, config, key=jax.random.key(0))
        errors[level] = float(lrs.metrics.relative_error(params, truth))
        kept[level] = _kept(params)
    assert (kept[0.0] == K).all()
    assert kept[3.0].mean() < 0.25 * K
    assert errors[3.0] < 0.8 * errors[0.0]


def test_a_user_too_small_for_its_search_keeps_no_value(noisy_no_sparse):
    data, _ = noisy_no_sparse
    config = lrs.AMHTConfig(R, K, num_iters=5, sparse_significance=0.5)
    params, _ = lrs.fit(data, config, key=jax.random.key(0))
    counts = np.asarray(data.mask.sum(axis=1))
    small = counts <= R + peruser.search_dof(K, D)
    assert small.any() and (~small).any()
    assert (_kept(params)[small] == 0).all()
    assert _kept(params)[~small].mean() > 0


def test_streamed_and_ragged_fits_apply_the_same_rule():
    data, _ = lrs.synthetic.make_problem(
        jax.random.key(6), d=12, t=40, m=30, r=R, k=1, noise=0.5, b_scale=0.0,
        m_min=10, dtype="float64",
    )  # fmt: skip
    config = lrs.AMHTConfig(R, K, num_iters=3, sparse_significance=1.0, tol=0.0)
    key = jax.random.key(0)
    expected, _ = lrs.fit(data, config, key=key)
    host = lrs.UserData.from_host(*map(np.asarray, data))
    streamed, _ = lrs.fit_streamed(host, config, chunk_users=20, key=key)
    ragged, _ = lrs.fit_streamed(
        lrs.RaggedData.from_padded(host), config, chunk_users=20, key=key
    )
    assert 0 < _kept(expected).mean() < K  # the rule acts
    for got in (streamed, ragged):
        np.testing.assert_array_equal(_kept(got), _kept(expected))
        np.testing.assert_allclose(
            lrs.weights(got), lrs.weights(expected), rtol=1e-7, atol=1e-9
        )


def test_selection_chooses_the_level_by_validation(noisy_no_sparse):
    data, _ = noisy_no_sparse
    config = lrs.AMHTConfig(R, K, num_iters=8, rescue_fraction=0.0)
    result = selection.select(
        data, config, ranks=(R,), sparsities=(K,), ridges=(0.0,),
        significances=(0.0, 3.0), refit=False,
    )  # fmt: skip
    assert [row.sparse_significance for row in result.table] == [0.0, 3.0]
    assert result.chosen["sparse_significance"] == 3.0
    assert result.config == dataclasses.replace(config, sparse_significance=3.0)


@pytest.mark.parametrize("level", [-1.0, float("nan"), "2"])
def test_a_bad_level_is_refused_by_name(level):
    with pytest.raises(ValueError, match="sparse_significance"):
        lrs.AMHTConfig(2, 1, sparse_significance=level)
