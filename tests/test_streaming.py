"""Specification of the streamed fit: ``lrs.fit_streamed(data, config, chunk_users=c)``.

Data on the host (numpy or a memory-mapped ``.npy``) is copied to the device
``c`` users at a time for every pass; the result equals the in-memory fit.
"""

import jax
import numpy as np
import pytest

import lrs
from lrs import host_stream, validation

pytestmark = pytest.mark.usefixtures("cheap_compiles")

# Rescue on (0.2 of 20 users), two iterations after the initialization.
CONFIG = lrs.AMHTConfig(rank=2, sparsity=1, num_iters=2, tol=0.0, rescue_fraction=0.2)


@pytest.fixture(scope="module")
def problem():
    return lrs.synthetic.make_problem(
        jax.random.key(5), d=12, t=20, m=12, r=2, k=1, dtype="float64"
    )


@pytest.fixture(scope="module")
def in_memory(problem):
    data, truth = problem
    return lrs.fit(data, CONFIG, truth=truth)


def _host(data) -> lrs.UserData:
    return lrs.UserData.from_host(*(np.array(a) for a in data))


def _assert_same_fit(streamed, in_memory):
    (p1, d1), (p2, d2) = in_memory, streamed
    np.testing.assert_allclose(lrs.weights(p2), lrs.weights(p1), atol=1e-10)
    np.testing.assert_allclose(p2.U, p1.U, atol=1e-10)
    np.testing.assert_array_equal(d2.cg_iters, d1.cg_iters)
    np.testing.assert_allclose(d2.relative_error, d1.relative_error, atol=1e-10)
    np.testing.assert_allclose(d2.loss, d1.loss, rtol=1e-9)
    np.testing.assert_array_equal(d2.stop_code, d1.stop_code)
    assert d2.stop_reason == d1.stop_reason == "max_iterations"


def test_streamed_from_a_memory_mapped_file_equals_the_in_memory_fit(
    problem, in_memory, tmp_path
):
    data, truth = problem
    np.save(tmp_path / "X.npy", np.asarray(data.X))
    X = np.load(tmp_path / "X.npy", mmap_mode="r")
    host = lrs.UserData.from_host(X, np.array(data.y))
    assert isinstance(host.X, np.memmap)  # not copied
    seen = []
    # 3 users per chunk: 7 chunks, the last one with 2 users.
    out = lrs.fit_streamed(
        host, CONFIG, chunk_users=3, truth=truth, callback=lambda i, _: seen.append(i)
    )
    _assert_same_fit(out, in_memory)
    assert seen == [0, 1, 2]
    assert out[0].V.shape == (20, 2) and out[0].B.indices.shape == (20, 1)


@pytest.mark.parametrize("chunk_users", [1, 1000])
def test_any_chunk_size_gives_the_same_fit(problem, in_memory, chunk_users):
    data, truth = problem
    host = _host(data)
    before = [a.copy() for a in host]
    out = lrs.fit_streamed(host, CONFIG, chunk_users=chunk_users, truth=truth)
    _assert_same_fit(out, in_memory)
    for a, b in zip(host, before):  # the inputs are not modified
        np.testing.assert_array_equal(a, b)


def test_chunks_cover_every_user_once_and_pad_the_last():
    X = np.arange(5 * 2 * 3, dtype=np.float64).reshape(5, 2, 3)
    stream = host_stream.Stream(lrs.UserData.from_host(X, np.ones((5, 2))), 2)
    chunks = list(stream.chunks(np.arange(5)))
    assert [rows for rows, _ in chunks] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    _, (X_last, y_last, mask_last, ids_last) = chunks[-1]
    assert X_last.shape == (2, 2, 3)  # one shape for every chunk
    np.testing.assert_array_equal(X_last[0], X[4])
    assert mask_last[0].all() and not mask_last[1].any()  # padding: no samples
    assert host_stream.Stream(stream.data, 99).c == 5


@pytest.mark.parametrize("chunk_users", [0, -3, 2.5, True, "4", None])
def test_bad_chunk_users_raise(problem, chunk_users):
    data, _ = problem
    with pytest.raises(ValueError, match="chunk_users must be an integer >= 1"):
        lrs.fit_streamed(_host(data), CONFIG, chunk_users=chunk_users)


def test_bad_data_raise(problem):
    data, _ = problem
    with pytest.raises(ValueError, match="data must be an lrs.UserData"):
        lrs.fit_streamed(np.asarray(data.X), CONFIG, chunk_users=4)
    X = np.array(data.X)
    X[7, 3, 2] = np.nan
    with pytest.raises(ValueError, match="data.X contains NaN or inf"):
        lrs.fit_streamed(
            lrs.UserData.from_host(X, np.array(data.y)), CONFIG, chunk_users=4
        )
    short = _host(data)._replace(mask=np.zeros((20, 12), bool))
    with pytest.raises(ValueError, match=r"fewer samples than rank \+ sparsity = 3"):
        lrs.fit_streamed(short, CONFIG, chunk_users=4)


def test_from_host_checks_shapes_and_dtypes():
    X, y = np.zeros((4, 3, 5)), np.zeros((4, 3))
    assert lrs.UserData.from_host(X, y).mask.all()
    with pytest.raises(ValueError, match="X must be a real floating array"):
        lrs.UserData.from_host(X.astype(int), y)
    with pytest.raises(ValueError, match="y must have shape"):
        lrs.UserData.from_host(X, y[:3])
    with pytest.raises(ValueError, match="mask must be a boolean"):
        lrs.UserData.from_host(X, y, np.ones((4, 3)))
    with pytest.raises(ValueError, match="X must be a numpy array"):
        lrs.UserData.from_host(list(X), y)


def _memmap_with_nan(data, path, user):
    """``data.X`` written to a raw float64 file with a NaN in ``user``'s rows."""
    X = np.memmap(path, np.float64, "w+", shape=data.X.shape)
    X[:] = np.asarray(data.X)
    X[user, 5, 7] = np.nan
    X.flush()
    del X
    return np.memmap(path, np.float64, "r+", shape=data.X.shape)  # writable


def test_streamed_fit_rejects_a_nan_in_a_memory_mapped_file(problem, tmp_path):
    data, _ = problem
    path = tmp_path / "X.f64"
    X = _memmap_with_nan(data, path, user=13)
    before = path.read_bytes()
    host = lrs.UserData.from_host(X, np.array(data.y))
    with pytest.raises(ValueError, match="data.X contains NaN or inf"):
        lrs.fit_streamed(host, CONFIG, chunk_users=4)
    del host, X
    assert path.read_bytes() == before  # the input file is not modified


def test_check_data_reads_a_memory_mapped_X_a_block_of_users_at_a_time(
    problem, tmp_path, monkeypatch
):
    data, _ = problem
    X = _memmap_with_nan(data, tmp_path / "X.f64", user=19)  # the last user
    user_bytes = X[0].nbytes
    monkeypatch.setattr(validation, "CHECK_BLOCK_BYTES", 3 * user_bytes)
    blocks = []
    isfinite = np.isfinite
    monkeypatch.setattr(np, "isfinite", lambda a: blocks.append(a.shape) or isfinite(a))
    host = lrs.UserData.from_host(X, np.array(data.y))
    with pytest.raises(ValueError, match="data.X contains NaN or inf"):
        validation.check_data(host, CONFIG)
    # 20 users, 3 at a time: 7 blocks, none larger than 3 users.
    assert [b[0] for b in blocks] == [3] * 6 + [2]
    assert all(b[1:] == X.shape[1:] for b in blocks)
    blocks.clear()
    X[19, 5, 7] = 0.0
    out = validation.check_data(host, CONFIG)
    assert np.shares_memory(out.X, X)  # checked in place, not copied
    assert len(blocks) == 7 + 1  # X in 7 blocks, y (20 x 12) in one


def test_streamed_fit_reports_the_same_stop_reason_and_honours_sparse_options(problem):
    """Converged, stalled or out of iterations: the same rule as lrs.fit; the
    sparse options (shrinkage, feature subset) reach the streamed solver."""
    data, _ = problem
    config = lrs.AMHTConfig(
        rank=2,
        sparsity=1,
        num_iters=4,
        rescue_fraction=0.2,
        sparse_ridge=0.5,
        sparse_features=(0, 3, 5, 7),
    )
    p1, d1 = lrs.fit(data, config)
    p2, d2 = lrs.fit_streamed(_host(data), config, chunk_users=6)
    np.testing.assert_allclose(lrs.weights(p2), lrs.weights(p1), atol=1e-9)
    np.testing.assert_array_equal(d2.stop_code, d1.stop_code)
    assert d2.stop_reason == d1.stop_reason
    assert set(np.unique(p2.B.indices)) <= {0, 3, 5, 7}
