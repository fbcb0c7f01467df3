"""Specification of lrs.datasets: MovieLens text formats -> per-user tasks."""

import hashlib
import os
import pickle

import numpy as np
import pytest

from lrs import datasets

pytestmark = pytest.mark.usefixtures("cheap_compiles")

GENRES_100K = datasets.ML100K_GENRES


def _ratings(seed=0, users=12, per_user=8, items=15):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, users + 1):
        for j in rng.choice(items, per_user, replace=False):
            rows.append(
                (u, int(j) + 1, int(rng.integers(1, 6)), int(rng.integers(1e8, 1e9)))
            )
    rng.shuffle(rows)
    return rows


def _write(directory, kind, rows, items=15):
    os.makedirs(directory, exist_ok=True)
    if kind == "100k":
        path = os.path.join(directory, "u.data")
        text = "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)
        item_text = "".join(
            f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|"
            + "|".join("1" if g == i % 19 else "0" for g in range(19))
            + "\n"
            for i in range(1, items + 1)
        )
        item_name = "u.item"
    elif kind == "1m":
        path = os.path.join(directory, "ratings.dat")
        text = "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows)
        item_text = "".join(
            f"{i}::Movie {i} (1995)::{'Comedy|Drama' if i % 2 else 'Action'}\n"
            for i in range(1, items + 1)
        )
        item_name = "movies.dat"
    else:
        path = os.path.join(directory, "ratings.csv")
        text = "userId,movieId,rating,timestamp\n" + "".join(
            f"{u},{i},{r}.0,{t}\n" for u, i, r, t in rows
        )
        item_text = "movieId,title,genres\n" + "".join(
            f'{i},"Movie, The {i} (1995)",{"Comedy|Drama" if i % 2 else "Action"}\n'
            for i in range(1, items + 1)
        )
        item_name = "movies.csv"
    with open(path, "w") as f:
        f.write(text)
    with open(os.path.join(directory, item_name), "w") as f:
        f.write(item_text)
    return path


@pytest.mark.parametrize("kind", ["100k", "1m", "csv"])
def test_each_format_parses_to_the_same_ratings(tmp_path, kind):
    rows = _ratings()
    parsed = datasets.read_ratings(_write(tmp_path, kind, rows))
    np.testing.assert_array_equal(parsed.user, [r[0] for r in rows])
    np.testing.assert_array_equal(parsed.item, [r[1] for r in rows])
    np.testing.assert_array_equal(parsed.rating, [r[2] for r in rows])
    np.testing.assert_array_equal(parsed.timestamp, [r[3] for r in rows])


@pytest.mark.parametrize("kind", ["100k", "1m", "csv"])
def test_load_ratings_builds_per_user_tasks(tmp_path, kind):
    rows = _ratings()
    path = _write(tmp_path, kind, rows)
    tasks = datasets.load_ratings(tmp_path, embedding_dim=3, test_fraction=0.25)
    assert (
        tasks.path == path
        and tasks.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    )
    t, d = 12, len(tasks.feature_names)
    assert tasks.train.num_users == tasks.test.num_users == t
    assert tasks.train.dim == tasks.test.dim == d
    n_genres = 19 if kind == "100k" else 3  # Action, Comedy, Drama
    assert d == 1 + n_genres + 1 + 3  # offset, genres, item bias, factors
    np.testing.assert_array_equal(tasks.train.counts, 6)  # 8 ratings, 2 held out
    np.testing.assert_array_equal(tasks.test.counts, 2)
    np.testing.assert_array_equal(tasks.user_ids, np.arange(1, 13))
    # the targets are the ratings minus the training mean
    parsed = datasets.read_ratings(path)
    held_out = datasets.split_ratings(parsed, test_fraction=0.25)
    assert tasks.mean == pytest.approx(parsed.rating[~held_out].mean())
    train_y = np.asarray(tasks.train.y)[np.asarray(tasks.train.mask)]
    np.testing.assert_allclose(
        np.sort(train_y + tasks.mean), np.sort(parsed.rating[~held_out]), atol=1e-5
    )
    # the first feature is the offset
    np.testing.assert_array_equal(np.asarray(tasks.train.X)[tasks.train.mask][:, 0], 1)


def test_time_split_holds_out_each_users_latest_ratings():
    rows = _ratings(seed=3)
    parsed = datasets.Ratings(*(np.array(c) for c in zip(*rows)))
    test = datasets.split_ratings(parsed, by="time", test_fraction=0.25)
    for u in range(1, 13):
        mine = parsed.user == u
        assert test[mine].sum() == 2
        assert (
            parsed.timestamp[mine & test].min() > parsed.timestamp[mine & ~test].max()
        )


def test_random_split_is_seeded_and_keeps_a_training_rating():
    rows = _ratings(seed=4)
    parsed = datasets.Ratings(*(np.array(c) for c in zip(*rows)))
    a = datasets.split_ratings(parsed, by="random", test_fraction=0.5, seed=1)
    b = datasets.split_ratings(parsed, by="random", test_fraction=0.5, seed=1)
    c = datasets.split_ratings(parsed, by="random", test_fraction=0.5, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.sum() == 12 * 4
    one = datasets.Ratings(*(np.array([x]) for x in rows[0]))
    assert not datasets.split_ratings(one, test_fraction=0.9).any()  # 1 rating: train


@pytest.mark.parametrize(
    "kind, line, lineno",
    [
        ("100k", "1\t2\tfive\t100", 3),
        ("1m", "1::2::3", 3),
        ("csv", "1,2,3,4,5", 4),  # the header is line 1
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, kind, line, lineno):
    path = _write(tmp_path, kind, _ratings())
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    lines.insert(lineno - 1, line + "\n")
    with open(path, "w") as f:
        f.writelines(lines)
    with pytest.raises(ValueError, match=rf"{os.path.basename(path)}, line {lineno}:"):
        datasets.load_ratings(tmp_path)


def test_bad_item_file_line_is_reported(tmp_path):
    _write(tmp_path, "100k", _ratings())
    with open(tmp_path / "u.item", "a") as f:
        f.write("16|Bad|||url|0|1\n")
    with pytest.raises(ValueError, match=r"u.item, line 16:"):
        datasets.load_ratings(tmp_path)


class _Trap:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def test_a_pickle_is_never_unpickled(tmp_path):
    marker = str(tmp_path / "unpickled")
    with open(tmp_path / "ratings.dat", "wb") as f:
        pickle.dump(_Trap(marker), f)
    with pytest.raises(ValueError, match=r"ratings.dat, line 1:"):
        datasets.load_ratings(tmp_path)
    assert not os.path.exists(marker)


def test_item_factors_fit_low_rank_ratings():
    rng = np.random.default_rng(0)
    P, Q = rng.normal(size=(30, 2)), rng.normal(size=(25, 2))
    users, items = np.divmod(np.arange(30 * 25), 25)
    keep = rng.random(users.size) < 0.7
    values = np.sum(P[users] * Q[items], axis=1)[keep]
    bias, factors = datasets.item_factors(
        users[keep], items[keep], values, dim=2, reg=1e-4, iters=30
    )
    # the factors span Q's column space: regressing Q on them leaves little
    design = np.c_[factors, bias]
    coef = np.linalg.lstsq(design, Q, rcond=None)[0]
    assert np.linalg.norm(design @ coef - Q) < 0.05 * np.linalg.norm(Q)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(split="user"), "split"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(min_ratings=1), "min_ratings"),
        (dict(embedding_dim=-1), "embedding_dim"),
        (dict(max_train=0), "max_train"),
        (dict(test_fraction="0.2"), "test_fraction"),
        (dict(embedding_dim="8"), "embedding_dim"),
        (dict(min_ratings=2.0), "min_ratings"),
        (dict(seed="0"), "seed"),
        (dict(seed=-1), "seed"),
        (dict(genres="yes"), "genres"),
        (dict(dtype=np.int32), "dtype"),
        (dict(dtype="int64"), "dtype"),
        (dict(dtype="not a dtype"), "dtype"),
        (dict(split=None), "split"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, name):
    _write(tmp_path, "1m", _ratings())
    with pytest.raises(ValueError, match=name):
        datasets.load_ratings(tmp_path, **kwargs)


def test_validation_fraction_splits_the_training_ratings_only(tmp_path):
    """For model selection: the test ratings are never used, the latest of the
    training ratings are the validation set, the features see neither."""
    path = _write(tmp_path, "100k", _ratings(per_user=10))
    tasks = datasets.load_ratings(
        tmp_path, embedding_dim=2, test_fraction=0.2, validation_fraction=0.25
    )
    parsed = datasets.read_ratings(path)
    held_out = datasets.split_ratings(parsed, test_fraction=0.2)
    training = datasets.Ratings(*(a[~held_out] for a in parsed))
    valid = datasets.split_ratings(training, test_fraction=0.25)
    np.testing.assert_array_equal(tasks.user_ids, np.arange(1, 13))
    np.testing.assert_array_equal(tasks.train.counts, 6)  # 10 -> 8 -> 6 + 2
    np.testing.assert_array_equal(tasks.test.counts, 2)
    assert tasks.mean == pytest.approx(training.rating[~valid].mean())
    test_y = np.asarray(tasks.test.y)[np.asarray(tasks.test.mask)] + tasks.mean
    np.testing.assert_allclose(
        np.sort(test_y), np.sort(training.rating[valid]), atol=1e-5
    )
    with pytest.raises(ValueError, match="validation_fraction"):
        datasets.load_ratings(tmp_path, validation_fraction=1.5)


def test_a_huge_rating_names_the_file_and_line(tmp_path):
    rows = _ratings()
    _write(tmp_path, "100k", rows)
    path = tmp_path / "u.data"
    lines = path.read_text().splitlines()
    user, item, _, stamp = lines[4].split("\t")
    lines[4] = "\t".join([user, item, "1e300", stamp])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"u\.data, line 5: expected a finite rating"):
        datasets.load_ratings(tmp_path)


def test_missing_or_unknown_files(tmp_path):
    with pytest.raises(ValueError, match="no rating file"):
        datasets.load_ratings(tmp_path)
    (tmp_path / "ratings.txt").write_text("1 2 3 4\n")
    with pytest.raises(ValueError, match="path must"):
        datasets.load_ratings(tmp_path / "ratings.txt")


def test_max_train_keeps_the_latest_and_min_ratings_drops_users(tmp_path):
    rows = _ratings() + [(99, 1, 4, 5)]  # a user with a single rating
    _write(tmp_path, "csv", rows)
    tasks = datasets.load_ratings(tmp_path, max_train=3, embedding_dim=0, genres=False)
    assert tasks.feature_names == ("offset",)
    np.testing.assert_array_equal(tasks.train.counts, 3)
    assert tasks.counts["users"] == 13 and tasks.counts["users_kept"] == 12


# ------------------------------------------------------------------- stand-in


def test_standin_has_heavy_tails_biases_drift_and_loads(tmp_path):
    folder = datasets.write_standin(
        tmp_path / "s", users=200, items=1000, ratings=16_000, seed=1
    )
    ratings = datasets.read_ratings(tmp_path / "s" / "u.data")
    assert abs(len(ratings.user) - 16_000) <= 200
    counts = np.bincount(ratings.user)[1:]
    assert counts.min() >= 20 and counts.max() > 4 * np.median(counts)  # heavy tail
    popularity = np.sort(np.bincount(ratings.item)[1:])[::-1]
    assert popularity[:30].sum() > 0.2 * len(ratings.user)  # popular head
    assert set(np.unique(ratings.rating)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert len(np.unique(ratings.rating)) == 5
    assert np.all(np.diff(ratings.timestamp[ratings.user == 1]) >= 0)
    tasks = datasets.load_ratings(folder, embedding_dim=2)
    assert tasks.train.num_users == 200
    assert sum(n.startswith("genre:") for n in tasks.feature_names) == 19
    again = tmp_path / "again"
    datasets.write_standin(again, users=200, items=1000, ratings=16_000, seed=1)
    assert datasets.sha256(again / "u.data") == tasks.sha256  # reproducible


def test_standin_structure_knob_and_ml1m_format(tmp_path):
    """With no planted taste, the per-user genre effect is gone: the spread of
    users' mean ratings on their most-rated genre shrinks."""
    spread = {}
    for name, kw in (("planted", dict(sparse=1.5)), ("none", dict(sparse=0.0))):
        datasets.write_standin(
            tmp_path / name, users=150, items=200, ratings=12_000, low_rank=0.0,
            drift=0.0, max_genres=8, file_format="1m", seed=2, **kw,
        )  # fmt: skip
        tasks = datasets.load_ratings(tmp_path / name, embedding_dim=0, split="random")
        user, X, y = tasks.train.to_long()
        drama = X[:, tasks.feature_names.index("genre:Drama")] > 0
        gap = [y[(user == u) & drama].mean() - y[(user == u) & ~drama].mean()
               for u in range(150)]  # fmt: skip
        spread[name] = np.nanstd(gap)
    assert os.path.isfile(tmp_path / "none" / "movies.dat")
    assert spread["planted"] > 1.5 * spread["none"]


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(users=0), "users"),
        (dict(ratings=100), "ratings"),
        (dict(sparse=-1.0), "sparse"),
        (dict(noise="a"), "noise"),
        (dict(file_format="csv"), "file_format"),
        (dict(users=2.5), "users"),
    ],
)
def test_standin_bad_arguments_are_named(tmp_path, kw, name):
    with pytest.raises(ValueError, match=name):
        datasets.write_standin(tmp_path, **{"users": 10, "items": 60, **kw})
