"""Specification of lrs.AMHTConfig: validation, hashing, derived settings."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrs
from lrs.linalg import subspace_distance

NAN, INF = float("nan"), float("inf")

BAD_VALUES = [
    ("rank", 0),
    ("rank", -2),
    ("rank", 2.0),
    ("rank", True),
    ("rank", "3"),
    ("rank", None),
    ("sparsity", -1),
    ("sparsity", 1.5),
    ("sparsity", False),
    ("num_iters", -1),
    ("num_iters", 10.0),
    ("tol", -1e-3),
    ("tol", NAN),
    ("tol", INF),
    ("inner_steps", -1),
    ("inner_steps", 2.5),
    ("init", "svd"),
    ("init", np.ones((5, 3))),  # rank is 2
    ("init", np.ones(5)),
    ("init", None),
    ("fresh_samples", -1),
    ("fresh_samples", 1.0),
    ("ridge", -0.1),
    ("ridge", NAN),
    ("ridge", INF),
    ("u_solver", "qr"),
    ("u_solver", None),
    ("cg_iters", 0),
    ("cg_iters", 5.0),
    ("cg_tol", -1.0),
    ("cg_tol", NAN),
    ("rescue_fraction", -0.01),
    ("rescue_fraction", 1.5),
    ("rescue_fraction", NAN),
    ("l1_steps", -1),
    ("l1_steps", 1.0),
    ("user_chunk_size", 0),
    ("user_chunk_size", 8.0),
    ("chunk_bytes", 0),
    ("chunk_bytes", 1e6),
    ("init_eigensolver", "lanczos"),
    ("init_iters", 0),
    ("init_iters", 3.0),
    ("sparse_ridge", -1.0),
    ("sparse_ridge", NAN),
    ("sparse_ridge", "1"),
    ("sparse_features", ()),
    ("sparse_features", [0, 1]),
    ("sparse_features", (0, -1)),
    ("sparse_features", (0, 0)),
    ("sparse_features", (0.0, 1)),
    ("stall_iters", -1),
    ("stall_iters", 2.0),
]


@pytest.mark.parametrize(
    "field, value", BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES]
)
def test_bad_value_raises_value_error_naming_the_field(field, value):
    kw = dict(rank=2, sparsity=1)
    kw[field] = value
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        lrs.AMHTConfig(**kw)


NON_NUMBERS = ["tol", "cg_tol", "ridge", "rescue_fraction"]


@pytest.mark.parametrize("field", NON_NUMBERS)
def test_non_numeric_float_field_raises_value_error(field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        lrs.AMHTConfig(rank=2, sparsity=1, **{field: "0.1"})


@pytest.mark.parametrize(
    "kw",
    [
        dict(rank=1, sparsity=0),
        dict(rank=np.int64(3), sparsity=np.int32(2)),
        dict(rank=2, sparsity=1, tol=0.0, cg_tol=0.0, ridge=0.0),
        dict(rank=2, sparsity=1, tol=None, cg_tol=None, user_chunk_size=None),
        dict(rank=2, sparsity=1, rescue_fraction=0.0, l1_steps=0, num_iters=0),
        dict(rank=2, sparsity=1, rescue_fraction=1.0, fresh_samples=3),
        dict(rank=2, sparsity=1, init="random", u_solver="dense"),
        dict(rank=2, sparsity=1, init_eigensolver="subspace", init_iters=1),
    ],
)
def test_good_values_are_accepted(kw):
    config = lrs.AMHTConfig(**kw)
    for name, value in kw.items():
        assert getattr(config, name) is value


def test_defaults():
    config = lrs.AMHTConfig(rank=2, sparsity=1)
    assert config.init == "moments" and config.u_solver == "cg"
    assert config.fresh_samples == 0 and config.ridge == 0.0
    assert config.tol is None and config.cg_tol is None


def test_config_is_frozen_hashable_and_a_jit_static_argument():
    a = lrs.AMHTConfig(rank=2, sparsity=1, tol=1e-6)
    b = lrs.AMHTConfig(rank=2, sparsity=1, tol=1e-6)
    c = dataclasses.replace(a, tol=1e-7)
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.rank = 3

    calls = []

    def f(x, config):
        calls.append(config)
        return x * config.rank

    g = jax.jit(f, static_argnames="config")
    assert float(g(jnp.ones(()), config=a)) == 2.0
    assert float(g(jnp.ones(()), config=b)) == 2.0
    assert len(calls) == 1  # an equal config reuses the compiled function
    g(jnp.ones(()), config=c)
    assert len(calls) == 2


def test_an_init_array_is_refused_pointing_to_U0():
    with pytest.raises(ValueError, match=r"U0=U"):
        lrs.AMHTConfig(rank=2, sparsity=1, init=np.ones((5, 2)))


@pytest.mark.parametrize(
    "dtype, expected", [(np.float32, (1e-5, 1e-5)), (np.float64, (1e-10, 1e-10))]
)
def test_tolerances_default_by_dtype_and_explicit_values_win(dtype, expected):
    assert lrs.AMHTConfig(rank=1, sparsity=0).tolerances(dtype) == expected
    explicit = lrs.AMHTConfig(rank=1, sparsity=0, tol=0.0, cg_tol=3e-3)
    assert explicit.tolerances(dtype) == (0.0, 3e-3)


def test_chunk_size():
    config = lrs.AMHTConfig(rank=1, sparsity=0, chunk_bytes=1000)
    assert config.chunk_size(m=5, d=10, itemsize=4) == 5  # 1000 // 200
    assert config.chunk_size(m=50, d=10, itemsize=8) == 1  # at least one user
    fixed = dataclasses.replace(config, user_chunk_size=7)
    assert fixed.chunk_size(m=5, d=10, itemsize=4) == 7


# ------------------------------------------------------- a starting U in fit


pytestmark = pytest.mark.usefixtures("cheap_compiles")


@pytest.fixture(scope="module")
def tiny_problem():
    return lrs.synthetic.make_problem(
        jax.random.key(21), d=10, t=30, m=25, r=2, k=1, dtype="float64"
    )


@pytest.mark.parametrize("kind", ["numpy", "jax", "list"])
def test_a_starting_U_works_through_fit(tiny_problem, kind):
    data, truth = tiny_problem
    rng = np.random.default_rng(0)
    U0 = np.asarray(truth.U) + 0.05 * rng.standard_normal((10, 2))
    init = {"numpy": U0, "jax": jnp.asarray(U0), "list": U0.tolist()}[kind]
    config = lrs.AMHTConfig(rank=2, sparsity=1, rescue_fraction=0.0)
    params, diag = lrs.fit(data, config, U0=init, truth=truth)
    # the fit started from span(U0), not from the moment initialization
    start = float(subspace_distance(jnp.linalg.qr(jnp.asarray(U0))[0], truth.U))
    assert diag.subspace_distance[0] == pytest.approx(start, rel=1e-9)
    assert float(lrs.metrics.relative_error(params, truth)) < 1e-8
    assert config.init == "moments"  # the caller's config is left as it was


def test_sparse_options_are_hashable_and_checked_against_d():
    a = lrs.AMHTConfig(rank=2, sparsity=2, sparse_features=(5, 1, 3))
    b = lrs.AMHTConfig(rank=2, sparsity=2, sparse_features=(1, np.int64(3), 5))
    assert a.sparse_features == (1, 3, 5) and a == b and hash(a) == hash(b)
    assert all(type(j) is int for j in b.sparse_features)
    with pytest.raises(ValueError, match="sparsity must be <= len"):
        lrs.AMHTConfig(rank=2, sparsity=4, sparse_features=(1, 3, 5))
    a.check_features(6)
    with pytest.raises(ValueError, match="sparse_features must be indices below d"):
        a.check_features(5)
    config = lrs.AMHTConfig(rank=2, sparsity=1)
    assert config.sparse_ridge == 0.0 and config.sparse_features is None
    assert config.stall_iters == 10
