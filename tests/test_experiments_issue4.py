"""The comparison table (experiments/comparison.py) runs end to end."""

import json
import os
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("cheap_compiles")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


@pytest.mark.slow
def test_comparison_table_runs_end_to_end(tmp_path):
    import comparison

    # the data shape (t, m, d) = (40, 20, 20) and the settings of
    # test_baselines.py, so most programs are already compiled
    sizes = dict(d=20, t=40, r=2, k=2, m_test=4, noise=0.1, seeds=1)
    sizes |= dict(convex_steps=150, convex_grid=(0.1, 0.03))
    parser = comparison.c.parser("test", str(tmp_path))
    parser.add_argument("--seeds", type=int, default=None)
    record = comparison.run(parser.parse_args(["--out", str(tmp_path)]), sizes)
    table = record["table"]
    assert set(table) == set(comparison.TRUTHS)
    for regimes in table.values():
        assert set(regimes) == {"scarce", "rich"}
        for values in regimes.values():
            assert set(values) == set(comparison.c.METHODS)
            assert all(v is not None and np.isfinite(v) for v in values.values())
    # with enough data the oracle is near the noise floor on its own model class
    rich = table["low_rank_plus_sparse"]["rich"]
    assert rich["oracle"] < 3 * record["noise_mse_floor"] < rich["global_model"]
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["table"] == table and saved["environment"]["args"]["seed"] == 0
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert "| low_rank_plus_sparse | scarce (6) |" in comparison.markdown(record)
