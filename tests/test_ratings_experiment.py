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
