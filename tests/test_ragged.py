"""Ragged users: ``lrs.RaggedData`` stores ``N`` samples without padding and
``lrs.fit_streamed`` packs users of similar counts into chunks; the fit equals
the padded one (the global selections see the same per-user numbers)."""

import dataclasses

import jax
import numpy as np
import pytest

import lrs
from lrs import datasets, host_stream, streaming

pytestmark = pytest.mark.usefixtures("cheap_compiles")

# Rescue on (0.2 of 20 users); it first runs after a few iterations.
CONFIG = lrs.AMHTConfig(rank=2, sparsity=1, num_iters=5, tol=0.0, rescue_fraction=0.2)
# float32 results agree to rounding amplified by the fit (measured: weights
# 1e-3 apart in 4, on the users whose labels are pure noise).
ATOL = {np.float64: 1e-10, np.float32: 5e-3}


def _ragged_problem(dtype, seed=5, t=20, m=16, d=12, fewest=9):
    """A planted problem whose users have ``fewest..m`` samples, the real
    samples scattered over the padded rows (not left-packed); users 3 and
    ``t - 9`` have labels of pure noise: they fit worst, the rescue runs."""
    data, truth = lrs.synthetic.make_problem(
        jax.random.key(seed), d=d, t=t, m=m, r=2, k=1, dtype=dtype
    )
    rng = np.random.default_rng(seed)
    counts = rng.integers(fewest, m + 1, size=t)
    counts[0] = m  # one user has the most
    mask = np.arange(m)[None, :] < counts[:, None]
    mask = np.array([rng.permutation(row) for row in mask])
    y = np.array(data.y)
    y[[3, t - 9]] = rng.normal(size=(2, m))
    return data._replace(y=jax.numpy.asarray(y), mask=jax.numpy.asarray(mask)), truth


def _ragged_fit(data, truth, config=CONFIG, chunk_users=3, U0=None, **kwargs):
    """``(params, diagnostics, shapes of the rescue chunks)`` of the ragged
    streamed fit of ``data``; checks that its input is not modified."""
    ragged = lrs.RaggedData.from_padded(data)
    before = [a.copy() for a in ragged]
    calls = []
    rescue = streaming._rescue_chunk

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return rescue(*args, **kwargs)

    streaming._rescue_chunk = counted
    try:
        params, diagnostics = lrs.fit_streamed(
            ragged, config, chunk_users=chunk_users, truth=truth, U0=U0, **kwargs
        )
    finally:
        streaming._rescue_chunk = rescue
    for a, b in zip(ragged, before):
        np.testing.assert_array_equal(a, b)
    return params, diagnostics, calls


def _assert_same_fit(ragged, padded, dtype):
    (p2, d2), (p1, d1) = ragged, padded
    atol = ATOL[dtype]
    assert p2.V.dtype == dtype and np.asarray(p2.U).dtype == dtype
    np.testing.assert_allclose(lrs.weights(p2), lrs.weights(p1), atol=atol)
    np.testing.assert_allclose(p2.U, p1.U, atol=atol / 10)
    if dtype == np.float64:  # the same supports
        np.testing.assert_array_equal(p2.B.indices, p1.B.indices)
    np.testing.assert_array_equal(d2.cg_iters, d1.cg_iters)
    np.testing.assert_allclose(d2.loss, d1.loss, rtol=atol * 100)
    np.testing.assert_allclose(d2.relative_error, d1.relative_error, atol=atol)
    np.testing.assert_array_equal(d2.stop_code, d1.stop_code)


def test_ragged_streamed_fit_equals_the_padded_streamed_fit():
    """Users of 9..16 samples in chunks of 3: every chunk is 16 wide, like the
    padded stream's, so both runs share their compiled programs (float64,
    from a given U0, no truth and no l1 candidate: fewer programs to compile;
    the float32 and multi-width checks against lrs.fit are slow)."""
    data, _ = _ragged_problem(np.float64)
    U0 = np.linalg.qr(np.random.default_rng(0).normal(size=(12, 2)))[0]
    config = dataclasses.replace(CONFIG, l1_steps=0)
    host = lrs.UserData.from_host(*(np.array(a) for a in data))
    padded = lrs.fit_streamed(host, config, chunk_users=3, U0=U0)
    *ragged, calls = _ragged_fit(data, None, config, U0=U0)
    _assert_same_fit(ragged, padded, np.float64)
    assert calls and set(calls) == {(3, 16, 12)}  # the rescue ran, packed
    # The chunks kept on the device after the first pass: the same numbers.
    *resident, _ = _ragged_fit(data, None, config, U0=U0, resident=True)
    for a, b in zip(jax.tree.leaves(resident), jax.tree.leaves(ragged)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ragged_streamed_fit_equals_lrs_fit_across_widths(dtype):
    """Users of 3..16 samples: chunks 4, 8 and 16 wide, equal to the padded
    single-device fit (the median, rescue and inlier selections alike)."""
    data, truth = _ragged_problem(dtype, fewest=3)
    padded = lrs.fit(data, CONFIG, truth=truth, key=jax.random.key(0))
    *ragged, calls = _ragged_fit(data, truth)
    _assert_same_fit(ragged, padded, dtype)
    assert calls and {shape[1] for shape in calls} <= {4, 8, 16}


def test_chunks_pack_users_of_similar_counts_into_power_of_two_widths():
    rng = np.random.default_rng(1)
    counts = rng.integers(2, 17, size=11)
    n = int(counts.sum())
    ragged = lrs.RaggedData(rng.normal(size=(n, 12)), rng.normal(size=n), counts)
    stream = host_stream.RaggedStream(ragged, 4)
    seen, widths = [], []
    residual = stream.sample_buffer()
    residual.flat[:] = np.arange(len(ragged.y))
    for rows, (X, y, mask, ids, res) in stream.chunks(np.arange(11.0), residual):
        n, counts = len(rows), ragged.counts[rows]
        widths.append(X.shape[1])
        assert X.shape == (4, X.shape[1], 12) and X.shape[1] >= counts.max()
        assert X.shape[1] & (X.shape[1] - 1) == 0  # a power of two
        assert X.shape[1] < 2 * counts.max()
        np.testing.assert_array_equal(ids[:n], rows)
        np.testing.assert_array_equal(np.asarray(mask).sum(1)[:n], counts)
        assert not np.asarray(mask)[n:].any()  # padding users: no samples
        for j, user in enumerate(rows):
            start = ragged.offsets[user]
            real = slice(start, start + counts[j])
            np.testing.assert_array_equal(X[j, : counts[j]], ragged.X[real])
            np.testing.assert_array_equal(y[j, : counts[j]], ragged.y[real])
            np.testing.assert_array_equal(res[j, : counts[j]], residual.flat[real])
        stream.store(residual, rows, n, -np.asarray(res))  # writes back in place
        seen += list(rows)
    assert sorted(seen) == list(range(11))  # every user once
    assert widths == sorted(widths)  # users sorted by count
    np.testing.assert_array_equal(residual.flat, -np.arange(len(ragged.y)))


def test_from_long_equals_the_padded_from_long_without_padding():
    rng = np.random.default_rng(0)
    ids = np.array(["b", "a", "c", "a", "b", "a"])
    X, y = rng.normal(size=(6, 3)), rng.normal(size=6)
    before = (ids.copy(), X.copy(), y.copy())
    ragged, names = lrs.RaggedData.from_long(ids, X, y, return_ids=True)
    padded, padded_names = lrs.UserData.from_long(ids, X, y, return_ids=True)
    np.testing.assert_array_equal(names, padded_names)
    np.testing.assert_array_equal(ragged.counts, [3, 2, 1])
    assert ragged.X.shape == (6, 3) and ragged.num_users == 3 and ragged.dim == 3
    again = ragged.padded()
    for a, b in zip(again, padded):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(lrs.RaggedData.from_padded(padded), ragged):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(ragged.to_long(), padded.to_long()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip((ids, X, y), before):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="user_ids must be"):
        lrs.RaggedData.from_long(np.zeros((2, 2)), X[:2], y[:2])
    with pytest.raises(ValueError, match="X contains NaN"):
        lrs.RaggedData.from_long(ids, np.full((6, 3), np.nan), y)
    with pytest.raises(ValueError, match="m must be an integer >= 3"):
        ragged.padded(2)


def test_bad_ragged_data_raise():
    X, y = np.zeros((10, 4)), np.zeros(10)
    good = lrs.RaggedData(X, y, np.array([4, 6]))
    cases = [
        (good._replace(counts=np.array([4, 5])), "counts be >= 0 with sum N"),
        (good._replace(counts=np.array([-1, 11])), "counts be >= 0"),
        (good._replace(counts=np.array([4.0, 6.0])), "counts must be a non-empty"),
        (good._replace(y=np.zeros(9)), r"data.y must have shape \(N,\)"),
        (good._replace(X=X.astype(int)), "data.X must be a real floating"),
        (good._replace(X=X[None]), "data.X must be 2-d"),
        (good._replace(counts=np.array([2, 8])), "fewer samples than rank"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError, match=message):
            lrs.fit_streamed(data, CONFIG, chunk_users=2)
    with pytest.raises(ValueError, match="rank must be < d = 4"):
        lrs.fit_streamed(good, lrs.AMHTConfig(rank=4, sparsity=0), chunk_users=2)
    with pytest.raises(ValueError, match="chunk_users must be an integer"):
        lrs.fit_streamed(good, CONFIG, chunk_users=0)
    with pytest.raises(ValueError, match="resident must be a bool"):
        lrs.fit_streamed(good, CONFIG, chunk_users=2, resident=1)
    bad = good._replace(X=np.where(np.arange(10)[:, None] == 7, np.inf, X))
    with pytest.raises(ValueError, match="data.X contains NaN or inf"):
        lrs.fit_streamed(bad, CONFIG, chunk_users=2)


def test_load_ratings_ragged_has_the_padded_samples(tmp_path):
    path = datasets.write_standin(tmp_path, users=40, items=60, ratings=1500)
    load = dict(embedding_dim=2, dtype=np.float64)
    padded = datasets.load_ratings(path, **load)
    ragged = datasets.load_ratings(path, ragged=True, **load)
    for part in ("train", "test"):
        r, p = getattr(ragged, part), getattr(padded, part)
        assert isinstance(r, lrs.RaggedData) and isinstance(r.X, np.ndarray)
        assert r.X.dtype == np.float64 and r.X.shape[0] == int(np.sum(p.mask))
        for a, b in zip(r.padded(p.X.shape[1]), p):
            np.testing.assert_array_equal(a, b)
    assert ragged.counts == padded.counts
    with pytest.raises(ValueError, match="ragged must be a bool"):
        datasets.load_ratings(path, ragged="yes")
