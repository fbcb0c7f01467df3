"""One contract for every fit path: in memory, streamed, sharded, private,
private streamed, private sharded. Each row of ``PATHS`` is a way to fit; each
test states one promise and checks it on every row (float32, the users'
default, unless said otherwise)."""

import jax
import numpy as np
import pytest

import lrs
from lrs import private

pytestmark = pytest.mark.usefixtures("cheap_compiles")

D, T, M, R, K = 12, 40, 16, 2, 1
CONFIG = lrs.AMHTConfig(rank=R, sparsity=K, num_iters=4)
DP = private.DPConfig(epsilon=8.0, delta=1e-5)


def _mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("users",))


def _host(data):
    return lrs.UserData.from_host(
        np.asarray(data.X), np.asarray(data.y), np.asarray(data.mask)
    )


PATHS = {
    "fit": lambda data, config, key: lrs.fit(data, config, key=key),
    "fit_streamed": lambda data, config, key: lrs.fit_streamed(
        _host(data), config, chunk_users=16, key=key
    ),
    "fit_sharded": lambda data, config, key: lrs.fit(
        data, config, key=key, mesh=_mesh()
    ),
    "private.fit": lambda data, config, key: private.fit(data, config, DP, key=key),
    "private.fit_streamed": lambda data, config, key: private.fit_streamed(
        _host(data), config, DP, chunk_users=16, key=key
    ),
    "private.fit_sharded": lambda data, config, key: private.fit(
        data, config, DP, key=key, mesh=_mesh()
    ),
}
path = pytest.mark.parametrize("name", list(PATHS))


@pytest.fixture(scope="module")
def data32():
    with jax.enable_x64(False):
        data, _ = lrs.synthetic.make_problem(
            jax.random.key(0), d=D, t=T, m=M, r=R, k=K, noise=0.1
        )
        return jax.tree.map(np.asarray, data)


def _fit(name, data, config=CONFIG, key=None):
    key = jax.random.key(1) if key is None else key
    with jax.enable_x64(False):
        return PATHS[name](data, config, key)


@path
def test_returns_the_model_with_its_shapes_in_the_data_dtype(name, data32):
    params, _ = _fit(name, data32)
    assert isinstance(params, lrs.LRSParams)
    assert params.U.shape == (D, R) and params.U.dtype == np.float32
    assert np.asarray(params.V).shape == (T, R)
    assert np.asarray(params.B.indices).shape == (T, K)
    for leaf in (params.U, params.V, params.B.values):
        assert np.all(np.isfinite(np.asarray(leaf)))


@path
def test_never_modifies_the_data(name, data32):
    before = jax.tree.map(np.copy, data32)
    _fit(name, data32)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(data32), strict=True):
        np.testing.assert_array_equal(a, b)


@path
def test_the_same_key_gives_the_same_model(name, data32):
    a, _ = _fit(name, data32)
    b, _ = _fit(name, data32)
    np.testing.assert_array_equal(np.asarray(a.U), np.asarray(b.U))


@path
@pytest.mark.parametrize("key", [0, "seed", np.uint32(3)])
def test_a_key_that_is_not_a_jax_key_is_refused_by_name(name, data32, key):
    with pytest.raises(ValueError, match="key"):
        _fit(name, data32, key=key)


@path
def test_a_config_that_is_not_an_amht_config_is_refused_by_name(name, data32):
    with pytest.raises(ValueError, match="config"):
        _fit(name, data32, config=dict(rank=R, sparsity=K))


@path
def test_a_rank_above_the_features_is_refused(name, data32):
    with pytest.raises(ValueError, match="rank"):
        _fit(name, data32, config=lrs.AMHTConfig(rank=D + 1, sparsity=K))


WITH_BASELINES = {
    **PATHS,
    **{
        f"baselines.{name}": (
            lambda fit: lambda data, config, key: fit(data, config, key=key)
        )(fit)
        for name, fit in lrs.baselines.BASELINES.items()
    },
}


@pytest.mark.parametrize("name", list(WITH_BASELINES))
def test_every_fit_reports_one_diagnostics_type(name, data32):
    with jax.enable_x64(False):
        _, diag = WITH_BASELINES[name](data32, CONFIG, jax.random.key(1))
    assert isinstance(diag, lrs.Diagnostics)
    n = len(diag.u_change)
    assert n >= 1
    for field in ("loss", "cg_iters", "relative_error", "subspace_distance"):
        assert np.asarray(getattr(diag, field)).shape == (n,), field
    assert np.all(np.asarray(diag.stop_code)[:-1] == 0)
    assert diag.stop_reason in ("converged", "max_iterations", "stalled")
    private_fit = name.startswith("private.")
    # a private fit releases no raw-data loss; every other fit reports it
    assert np.all(np.isnan(diag.loss)) == private_fit
    assert (diag.privacy is not None) == private_fit
    assert (diag.excluded is not None) == private_fit
    if private_fit:
        assert np.asarray(diag.excluded).shape == (T,)
        assert diag.stop_reason == "max_iterations" and n == CONFIG.num_iters + 1
