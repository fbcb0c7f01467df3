"""``lrs dp`` (lrs.studies.privacy_utility): the study runs end to end at a tiny
size, and its record keeps the exact, non-private statistics apart."""

import json

import pytest

from lrs.studies import privacy_utility as experiment

pytestmark = pytest.mark.usefixtures("cheap_compiles")

TINY = experiment.Setting(
    d=8,
    r=2,
    k=1,
    m=12,
    private_iters=2,
    epsilon_users=150,
    user_counts=(150, 300),
    benchmark_users=150,
    seeds=1,
)


@pytest.mark.slow
def test_lrs_dp_keeps_exact_statistics_apart_from_the_privacy_record(tmp_path):
    results = experiment.run(tmp_path, quick=True, setting=TINY, plot=False)
    saved = json.loads((tmp_path / "privacy_utility.json").read_text())
    assert saved["benchmark"]["mse_ratio"] > 0
    rows = [r["private"] for r in saved["epsilon"] + saved["users"]]
    assert len(rows) == 5 + 2
    rows.append(saved["benchmark"]["private"])
    for row in rows:
        assert row["privacy"]["epsilon"] <= row["privacy"]["epsilon_target"]
        assert "clipped_fraction" not in row and "loss" not in row
        assert set(row["nonprivate_diagnostics"]) == {
            "clipped_fraction",
            "training_loss",
            "excluded_users",
        }
    text = experiment.summary(results)
    table, exact = text.split("NOT PRIVATE")
    assert "clipped" not in table and exact.count(", loss ") == len(rows)


@pytest.mark.slow
def test_benchmark_only_runs_the_benchmark_point_alone(tmp_path):
    results = experiment.run(
        tmp_path, quick=True, setting=TINY, plot=False, benchmark_only=True
    )
    assert results["epsilon"] == [] and results["users"] == []
    bench = results["benchmark"]
    assert bench["t"] == TINY.benchmark_users and bench["mse_ratio"] > 0
    private = bench["private"]
    assert "clipped_fraction" not in private and "loss" not in private
    assert private["privacy"]["epsilon"] <= 1.0
    table, exact = experiment.summary(results).split("NOT PRIVATE")
    assert "benchmark t=" in table and "clipped" not in table
    assert exact.count(", loss ") == 1


def _row(t, epsilon, seed=0):
    evaluation = dict(subspace_distance=0.01, test_mse=0.02, relative_error=0.1)
    private = dict(
        evaluation,
        privacy=dict(epsilon=epsilon, epsilon_target=epsilon),
        nonprivate_diagnostics=dict(
            clipped_fraction=0.5, training_loss=0.03, excluded_users=0
        ),
    )
    return dict(
        t=t,
        seed=seed,
        epsilon=epsilon,
        private=private,
        noiseless=evaluation,
        non_private=evaluation,
    )


def test_the_summary_prints_exact_statistics_only_under_not_private():
    bench = dict(_row(500, 1.0), mse_ratio=1.0, target_met=True)
    results = dict(
        epsilon=[_row(100, e) for e in experiment.EPSILONS],
        users=[_row(100, 1.0), _row(200, 1.0)],
        benchmark=bench,
        users_slope=dict(subspace=None, mse_excess=None),
    )
    table, exact = experiment.summary(results).split("NOT PRIVATE")
    assert "benchmark t=500" in table and "clipped" not in table
    assert exact.count(", loss ") == len(experiment.EPSILONS) + 2 + 1
