"""experiments/ratings.py runs end to end on a generated stand-in (slow)."""

import json
import os
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("cheap_compiles")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


@pytest.mark.slow
def test_ratings_experiment_selects_and_reports_buckets(tmp_path):
    import ratings

    grids = ["--ranks", "2", "--sparsities", "0", "1", "--ridges", "1"]
    grids += ["--sparse-ridges", "20", "--embedding-dim", "2", "--num-iters", "5"]
    record = ratings.main(["--quick", "--out", str(tmp_path), *grids])
    rows = record["test_rmse_by_activity"]
    assert {"amht_selected", "low_rank_only_selected", "global_mean"} <= set(rows)
    for row in rows.values():
        assert set(row) == {"all", "20-39", "40-99", "100+"}
        assert np.isfinite(row["all"]) and row["all"] < 2
    chosen = record["selection"]["amht_selected"]["chosen"]
    assert chosen["rank"] == 2 and chosen["sparsity"] in (0, 1)
    assert record["selection"]["low_rank_only_selected"]["chosen"]["sparsity"] == 0
    saved = json.loads((tmp_path / "ratings.json").read_text())
    assert saved["clipped_to"] == [1.0, 5.0]
    assert (tmp_path / "selection_amht_selected.png").stat().st_size > 0


def test_rmse_table_is_the_same_on_ragged_and_padded_tasks(tmp_path):
    """The ratings script scores ragged tasks (large files) like padded ones."""
    import types

    import ratings

    import lrs
    from lrs import datasets

    path = datasets.write_standin(tmp_path, users=40, items=60, ratings=1500)
    ragged = datasets.load_ratings(path, ragged=True, embedding_dim=2)
    padded = ragged._replace(train=ragged.train.padded(), test=ragged.test.padded())
    rng = np.random.default_rng(0)
    t, d = ragged.train.num_users, ragged.train.dim
    params = lrs.LRSParams(
        np.linalg.qr(rng.normal(size=(d, 2)))[0],
        rng.normal(size=(t, 2)),
        lrs.SparseRows(np.zeros((t, 1), np.int32), rng.normal(size=(t, 1)), d),
    )
    rows = [
        ratings.rmse_table(ratings.predictions(params, tasks.test), tasks)
        for tasks in (ragged, padded)
    ]
    assert rows[0].keys() == {"all", "20-39", "40-99", "100+"}
    for key in rows[0]:  # a bucket without users is None in both
        assert (rows[0][key] is None) == (rows[1][key] is None)
        if rows[1][key] is not None:
            assert rows[0][key] == pytest.approx(rows[1][key], rel=1e-6)
    assert 0 < rows[0]["all"] < 10
    zero = ratings.rmse_table(np.zeros(ragged.counts["test"]), ragged)
    assert zero["all"] != rows[0]["all"]
    args = types.SimpleNamespace(ragged="auto", padded_mb=1e-3)
    assert ratings.is_ragged(ragged, args)  # a few KB padded: over 1e-3 MB
    assert not ratings.is_ragged(ragged, types.SimpleNamespace(ragged="no"))
    large = types.SimpleNamespace(ragged="auto", padded_mb=1e3)
    assert not ratings.is_ragged(ragged, large)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ratings_experiment_runs_ragged(tmp_path):
    import ratings

    grids = ["--ranks", "2", "--sparsities", "0", "1", "--ridges", "1"]
    grids += ["--sparse-ridges", "20", "--embedding-dim", "2", "--num-iters", "5"]
    record = ratings.main(
        ["--quick", "--out", str(tmp_path), "--ragged", "yes", "--chunk-users", "64"]
        + grids
    )
    assert record["ragged"] is True
    rows = record["test_rmse"]
    baselines = {"low_rank_only", "sparse_only", "local_ridge", "global_model"}
    selected = {"amht_selected", "low_rank_only_selected"}
    assert {"global_mean", "biased_mf", "amht"} | baselines | selected == set(rows)
    assert all(np.isfinite(v) and v < 2 for v in rows.values())
    assert set(record["skipped"]) == {"convex"}
    assert set(record["seconds"]) >= baselines | selected | {"selection"}


def _tasks(tmp_path, **kwargs):
    from lrs import datasets

    path = datasets.write_standin(tmp_path, users=40, items=60, ratings=1500)
    return datasets.load_ratings(path, ragged=True, embedding_dim=2, **kwargs)


def test_biased_mf_is_the_als_user_step_with_a_user_bias(tmp_path):
    """Per user: weight 1 on item_bias, (bias, factors) the ridge fit with
    penalty reg * m_i to the rest; the same on ragged and padded tasks."""
    import ratings

    tasks = _tasks(tmp_path)
    names = tasks.feature_names
    params = ratings.biased_mf(tasks.train, names)
    padded = ratings.biased_mf(tasks.train.padded(), names)
    W = np.asarray(params.B.dense())
    np.testing.assert_allclose(W, np.asarray(padded.B.dense()), rtol=1e-5, atol=1e-6)
    cols = [names.index("offset"), names.index("factor:0"), names.index("factor:1")]
    X, y, offsets = tasks.train.X, tasks.train.y, tasks.train.offsets
    for i in (0, 17):
        Xi, yi = X[offsets[i] : offsets[i + 1]], y[offsets[i] : offsets[i + 1]]
        A = Xi[:, cols].astype(np.float64)
        target = yi - Xi[:, names.index("item_bias")]
        ridge = ratings.MF_REG * len(yi) * np.eye(3)
        np.testing.assert_allclose(
            W[i, cols], np.linalg.solve(A.T @ A + ridge, A.T @ target), rtol=1e-5
        )
        assert W[i, names.index("item_bias")] == 1
        genres = [j for j, n in enumerate(names) if n.startswith("genre:")]
        assert not W[i, genres].any()
    assert ratings.biased_mf(tasks.train, ("offset",) * len(names)) is None
    table = ratings.rmse_table(ratings.predictions(params, tasks.test), tasks)
    assert 0 < table["all"] < 2


def test_low_rank_part_is_the_sparsity_zero_selection():
    import ratings

    import lrs
    from lrs import selection

    def row(r, k, ridge, mse):
        return selection.Candidate(r, k, ridge, 0.0, mse, (mse,), (3,), ("x",))

    table = (row(2, 0, 1.0, 0.9), row(2, 0, 5.0, 0.8), row(2, 1, 1.0, 0.5))
    table += (row(3, 0, 1.0, 0.8), row(3, 1, 5.0, 0.7))
    base = lrs.AMHTConfig(2, 1, ridge=1.0, sparse_ridge=20.0, sparse_features=(1,))
    result = selection.Selection(table, base, None, None, 1, 0.2, 0, (10,))
    part = ratings.low_rank_part(result)
    assert part.table == tuple(r for r in table if r.sparsity == 0)
    expected = dict(rank=2, sparsity=0, ridge=5.0, sparse_ridge=0.0)
    assert {name: part.chosen[name] for name in expected} == expected
    assert part.config.sparse_features == (1,)  # the rest of the base kept
    only_sparse = selection.Selection(table[2:3], base, None, None, 1, 0.2, 0, (10,))
    assert ratings.low_rank_part(only_sparse) is None


def test_grids_default_to_the_large_grid_on_ragged_tasks():
    import types

    import ratings

    def args(**given):
        names = ("ranks", "sparsities", "ridges", "sparse_ridges", "significances")
        return types.SimpleNamespace(**dict(quick=False) | dict.fromkeys(names) | given)

    for ragged, quick, grids in (
        (True, False, ratings.LARGE_GRIDS),
        (False, False, ratings.GRIDS),
        (True, True, ratings.QUICK_GRIDS),
    ):
        a = args(quick=quick)
        ratings.resolve_grids(a, ragged)
        assert a.ranks == list(grids["ranks"])
        assert a.sparse_ridges == list(grids["sparse_ridges"])
    a = args(ranks=[4])
    ratings.resolve_grids(a, True)
    assert a.ranks == [4] and a.ridges == list(ratings.LARGE_GRIDS["ridges"])
