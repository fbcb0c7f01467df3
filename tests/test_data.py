"""Specification of lrs.data.UserData: construction, padding, validation."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrs.data import UserData


def _ragged_lists(rng, counts, d, dtype=np.float64):
    Xs = [rng.standard_normal((m, d)).astype(dtype) for m in counts]
    ys = [rng.standard_normal(m).astype(dtype) for m in counts]
    return Xs, ys


def _shuffle_keeping_user_order(rng, user_ids):
    """A row order that interleaves users at random but keeps each user's order."""
    slots = rng.permutation(user_ids)  # which user each output slot belongs to
    order = np.empty(len(user_ids), int)
    for u in np.unique(user_ids):
        order[slots == u] = np.flatnonzero(user_ids == u)
    return order


# --------------------------------------------------------------------- from_arrays


def test_from_arrays_shapes_counts_and_mask():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((4, 5, 3)), rng.standard_normal((4, 5))
    data = UserData.from_arrays(X, y)
    assert data.num_users == 4
    assert data.dim == 3
    assert data.X.shape == (4, 5, 3) and data.y.shape == (4, 5)
    assert data.mask.dtype == bool and bool(data.mask.all())
    np.testing.assert_array_equal(data.counts, [5, 5, 5, 5])
    assert isinstance(data.counts, np.ndarray)
    np.testing.assert_array_equal(np.asarray(data.X), X)
    np.testing.assert_array_equal(np.asarray(data.y), y)


def test_user_data_is_a_pytree():
    rng = np.random.default_rng(0)
    data = UserData.from_arrays(rng.standard_normal((2, 3, 4)), np.ones((2, 3)))
    leaves, treedef = jax.tree.flatten(data)
    assert len(leaves) == 3
    again = jax.tree.unflatten(treedef, leaves)
    assert isinstance(again, UserData)
    doubled = jax.jit(lambda u: u._replace(y=2 * u.y))(data)
    np.testing.assert_array_equal(np.asarray(doubled.y), 2 * np.ones((2, 3)))


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (np.float64, np.float64),
        (np.float32, np.float32),
        (np.int32, np.float64),  # x64 is on in the test session
        (np.int64, np.float64),
        (np.float16, np.float64),  # too narrow to compute in
    ],
)
def test_from_arrays_dtype(dtype, expected):
    X = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(dtype)
    y = np.arange(6).reshape(2, 3).astype(dtype)
    data = UserData.from_arrays(X, y)
    assert data.X.dtype == expected
    assert data.y.dtype == expected


def test_from_arrays_integer_input_converted_and_caller_array_unchanged():
    X = np.arange(2 * 3 * 4, dtype=np.int64).reshape(2, 3, 4)
    y = np.arange(6, dtype=np.int32).reshape(2, 3)
    X_before, y_before = X.copy(), y.copy()
    data = UserData.from_arrays(X, y)
    assert np.issubdtype(data.X.dtype, np.floating)
    assert np.issubdtype(data.y.dtype, np.floating)
    np.testing.assert_array_equal(np.asarray(data.X), X.astype(np.float64))
    assert X.dtype == np.int64 and y.dtype == np.int32
    np.testing.assert_array_equal(X, X_before)
    np.testing.assert_array_equal(y, y_before)


def test_from_arrays_y_takes_the_dtype_of_X():
    X = np.ones((2, 3, 4), np.float32)
    y = np.ones((2, 3), np.float64)
    assert UserData.from_arrays(X, y).y.dtype == np.float32


def test_from_arrays_accepts_nested_lists_and_jax_arrays():
    data = UserData.from_arrays([[[1, 2], [3, 4]]], [[1.0, 2.0]])
    assert data.X.shape == (1, 2, 2) and data.X.dtype == np.float64
    X = jax.numpy.ones((2, 3, 4))
    assert UserData.from_arrays(X, jax.numpy.zeros((2, 3))).X.shape == (2, 3, 4)


@pytest.mark.parametrize(
    "X, y, match",
    [
        (np.ones((2, 3, 4), complex), np.ones((2, 3)), r"\bX\b.*real"),
        (np.ones((2, 3, 4)), np.ones((2, 3), complex), r"\by\b.*real"),
        (np.full((2, 3, 4), "a"), np.ones((2, 3)), r"\bX\b"),
        (np.ones((2, 3)), np.ones((2, 3)), r"\bX\b.*shape"),
        (np.ones((2, 3, 4, 1)), np.ones((2, 3)), r"\bX\b.*shape"),
        (np.ones((2, 3, 4)), np.ones((2, 4)), r"\by\b.*shape"),
        (np.ones((2, 3, 4)), np.ones((3, 3)), r"\by\b.*shape"),
        (np.ones((2, 3, 4)), np.ones(6), r"\by\b.*shape"),
        (np.ones((0, 3, 4)), np.ones((0, 3)), r"\bX\b.*zero users"),
    ],
    ids=[
        "complex-X",
        "complex-y",
        "string-X",
        "X-2d",
        "X-4d",
        "y-wrong-m",
        "y-wrong-t",
        "y-flat",
        "zero-users",
    ],
)
def test_from_arrays_refuses_bad_input(X, y, match):
    with pytest.raises(ValueError, match=match):
        UserData.from_arrays(X, y)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["X", "y"])
def test_from_arrays_refuses_non_finite(bad, where):
    X, y = np.ones((2, 3, 4)), np.ones((2, 3))
    (X if where == "X" else y)[1, 2, ...] = bad
    with pytest.raises(ValueError, match=rf"\b{where}\b.*NaN or inf"):
        UserData.from_arrays(X, y)


def test_from_arrays_refuses_non_finite_jax_input():
    X = jax.numpy.ones((2, 3, 4)).at[0, 0, 0].set(jax.numpy.nan)
    with pytest.raises(ValueError, match=r"\bX\b.*NaN"):
        UserData.from_arrays(X, jax.numpy.ones((2, 3)))


# --------------------------------------------------------------------- from_ragged


def test_from_ragged_pads_with_zeros_and_masks():
    rng = np.random.default_rng(1)
    counts = [3, 1, 5, 2]
    Xs, ys = _ragged_lists(rng, counts, d=4)
    data = UserData.from_ragged(Xs, ys)
    assert data.X.shape == (4, 5, 4) and data.y.shape == (4, 5)
    assert data.num_users == 4 and data.dim == 4
    np.testing.assert_array_equal(data.counts, counts)
    mask = np.asarray(data.mask)
    np.testing.assert_array_equal(
        mask, np.arange(5)[None, :] < np.array(counts)[:, None]
    )
    X, y = np.asarray(data.X), np.asarray(data.y)
    for i, m in enumerate(counts):
        np.testing.assert_array_equal(X[i, :m], Xs[i])
        np.testing.assert_array_equal(y[i, :m], ys[i])
        assert not X[i, m:].any() and not y[i, m:].any()


def test_from_ragged_equal_counts_matches_from_arrays():
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((3, 4, 2)), rng.standard_normal((3, 4))
    a = UserData.from_ragged(list(X), list(y))
    b = UserData.from_arrays(X, y)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_from_ragged_integer_users_become_float_and_inputs_unchanged():
    Xs = [np.arange(6).reshape(3, 2), np.arange(4).reshape(2, 2)]
    ys = [np.arange(3), np.arange(2)]
    before = [a.copy() for a in Xs + ys]
    data = UserData.from_ragged(Xs, ys)
    assert data.X.dtype == np.float64 and data.y.dtype == np.float64
    for a, b in zip(Xs + ys, before):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


@pytest.mark.parametrize(
    "Xs, ys, match",
    [
        ([np.ones((2, 3))], [np.ones(2), np.ones(2)], r"\bXs\b.*\bys\b"),
        ([], [], r"\bXs\b.*zero users"),
        ([np.ones((2, 3)), np.ones((2, 4))], [np.ones(2)] * 2, r"Xs\[1\].*shape"),
        ([np.ones((2, 3)), np.ones(3)], [np.ones(2)] * 2, r"Xs\[1\].*shape"),
        ([np.ones((2, 3)), np.ones((2, 3))], [np.ones(2), np.ones(3)], r"ys\[1\]"),
        ([np.ones((2, 3))], [np.ones((2, 1))], r"ys\[0\]"),
        ([np.ones((2, 3), complex)], [np.ones(2)], r"Xs\[0\].*real"),
        ([np.ones((2, 3))], [np.ones(2, complex)], r"ys\[0\].*real"),
    ],
    ids=[
        "length-mismatch",
        "zero-users",
        "wrong-d",
        "1d-user",
        "wrong-m",
        "y-2d",
        "complex-X",
        "complex-y",
    ],
)
def test_from_ragged_refuses_bad_input(Xs, ys, match):
    with pytest.raises(ValueError, match=match):
        UserData.from_ragged(Xs, ys)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_from_ragged_refuses_non_finite_and_names_the_user(bad):
    Xs = [np.ones((2, 3)), np.ones((4, 3)), np.ones((1, 3))]
    ys = [np.ones(2), np.ones(4), np.ones(1)]
    Xs[2][0, 1] = bad
    with pytest.raises(ValueError, match=r"Xs\[2\].*NaN or inf"):
        UserData.from_ragged(Xs, ys)
    Xs[2][0, 1] = 0.0
    ys[1][3] = bad
    with pytest.raises(ValueError, match=r"ys\[1\].*NaN or inf"):
        UserData.from_ragged(Xs, ys)


# ----------------------------------------------------------------------- from_long


def test_from_long_orders_users_by_id_and_keeps_within_user_order():
    rng = np.random.default_rng(3)
    ids_sorted = np.repeat([-7, 3, 10, 42], [2, 4, 1, 3])  # not 0..t-1
    N, d = len(ids_sorted), 3
    X_sorted = rng.standard_normal((N, d))
    y_sorted = rng.standard_normal(N)
    order = _shuffle_keeping_user_order(rng, ids_sorted)
    assert not np.array_equal(order, np.arange(N))  # really shuffled
    ids, X, y = ids_sorted[order], X_sorted[order], y_sorted[order]

    data = UserData.from_long(ids, X, y)
    assert data.num_users == 4 and data.dim == d
    np.testing.assert_array_equal(data.counts, [2, 4, 1, 3])
    expected = UserData.from_ragged(
        [X_sorted[ids_sorted == u] for u in (-7, 3, 10, 42)],
        [y_sorted[ids_sorted == u] for u in (-7, 3, 10, 42)],
    )
    for got, want in zip(data, expected):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_from_long_user_i_is_the_ith_smallest_id():
    ids = np.array([5, 2, 9, 2])
    X = np.array([[50.0], [20.0], [90.0], [21.0]])
    y = np.array([5.0, 2.0, 9.0, 2.5])
    data = UserData.from_long(ids, X, y)
    np.testing.assert_array_equal(np.asarray(data.y), [[2.0, 2.5], [5.0, 0], [9.0, 0]])
    np.testing.assert_array_equal(np.asarray(data.X)[:, 0, 0], [20.0, 50.0, 90.0])


def test_to_long_round_trip():
    rng = np.random.default_rng(4)
    Xs, ys = _ragged_lists(rng, [3, 1, 4], d=2)
    data = UserData.from_ragged(Xs, ys)
    users, X, y = data.to_long()
    np.testing.assert_array_equal(users, np.repeat([0, 1, 2], [3, 1, 4]))
    np.testing.assert_array_equal(X, np.concatenate(Xs))
    np.testing.assert_array_equal(y, np.concatenate(ys))
    again = UserData.from_long(users, X, y)
    for got, want in zip(again, data):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@settings(max_examples=40, deadline=None)
@given(
    ids=st.lists(st.integers(-1000, 1000), min_size=1, max_size=30),
    d=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_from_long_to_long_property(ids, d, seed):
    """to_long(from_long(ids, X, y)) lists the rows grouped by ascending id."""
    rng = np.random.default_rng(seed)
    ids = np.array(ids)
    X, y = rng.standard_normal((len(ids), d)), rng.standard_normal(len(ids))
    data = UserData.from_long(ids, X, y)
    unique = np.unique(ids)
    assert data.num_users == len(unique)
    np.testing.assert_array_equal(data.counts, [np.sum(ids == u) for u in unique])
    users, X2, y2 = data.to_long()
    order = np.argsort(ids, kind="stable")
    np.testing.assert_array_equal(unique[users], ids[order])
    np.testing.assert_array_equal(X2, X[order])
    np.testing.assert_array_equal(y2, y[order])


@pytest.mark.parametrize(
    "ids, X, y, match",
    [
        (np.array([0.0, 1.0]), np.ones((2, 2)), np.ones(2), r"\buser_ids\b.*integer"),
        (np.array([[0, 1]]), np.ones((2, 2)), np.ones(2), r"\buser_ids\b"),
        (np.array([0, 1]), np.ones((3, 2)), np.ones(2), r"\bX\b.*\(N, d\)"),
        (np.array([0, 1]), np.ones(2), np.ones(2), r"\bX\b.*\(N, d\)"),
        (np.array([0, 1]), np.ones((2, 2)), np.ones(3), r"\by\b.*\(N,\)"),
        (np.array([0, 1]), np.ones((2, 2), complex), np.ones(2), r"\bX\b.*real"),
        (np.array([0, 1]), np.ones((2, 2)), np.ones(2, complex), r"\by\b.*real"),
    ],
    ids=["float-ids", "2d-ids", "X-rows", "X-1d", "y-rows", "complex-X", "complex-y"],
)
def test_from_long_refuses_bad_input(ids, X, y, match):
    with pytest.raises(ValueError, match=match):
        UserData.from_long(ids, X, y)


def test_from_long_refuses_zero_rows():
    with pytest.raises(ValueError, match=r"user_ids|zero users"):
        UserData.from_long(np.zeros(0, int), np.zeros((0, 3)), np.zeros(0))


def test_from_long_non_finite_message_names_the_argument():
    X = np.ones((3, 2))
    X[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"\bX\b"):
        UserData.from_long(np.array([4, 1, 1]), X, np.ones(3))


def test_from_long_non_finite_is_refused():
    y = np.ones(3)
    y[0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        UserData.from_long(np.array([4, 1, 1]), np.ones((3, 2)), y)


def test_from_long_accepts_string_ids_and_returns_the_row_of_each_id():
    ids = np.array(["bob", "alice", "bob", "carol", "alice"])
    X = np.arange(10.0).reshape(5, 2)
    y = np.arange(5.0)
    data, rows = UserData.from_long(ids, X, y, return_ids=True)
    assert list(rows) == ["alice", "bob", "carol"]
    np.testing.assert_array_equal(data.counts, [2, 2, 1])
    np.testing.assert_array_equal(np.asarray(data.y)[1, :2], [0.0, 2.0])  # bob
    as_objects = UserData.from_long(list(ids), X, y, return_ids=True)
    np.testing.assert_array_equal(as_objects[1], rows)
    numeric, ids_out = UserData.from_long([7, 3, 7], X[:3], y[:3], return_ids=True)
    assert list(ids_out) == [3, 7] and numeric.num_users == 2
    with pytest.raises(ValueError, match="all integers or all strings"):
        UserData.from_long(np.array(["a", 1], dtype=object), X[:2], y[:2])
