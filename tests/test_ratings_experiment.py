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
    assert {"global_mean", "amht", "amht_selected", "low_rank_only_selected"} == set(
        rows
    )
    assert all(np.isfinite(v) and v < 2 for v in rows.values())
    assert "convex" in record["skipped"]
