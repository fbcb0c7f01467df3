"""Specification of lrs.selection.select: (rank, sparsity, ridge, sparse_ridge)
chosen by held-out error inside the training data, refitted, plotted."""

import json

import jax
import numpy as np
import pytest

import lrs
from lrs import selection

pytestmark = pytest.mark.usefixtures("cheap_compiles")


@pytest.fixture(scope="module")
def planted():
    return lrs.synthetic.make_problem(
        jax.random.key(3), d=12, t=60, m=20, r=2, k=1, noise=0.05, dtype="float64"
    )


@pytest.fixture(scope="module")
def chosen(planted):
    data, _ = planted
    config = lrs.AMHTConfig(1, 0, num_iters=15, rescue_fraction=0.0)
    return selection.select(
        data,
        config,
        ranks=(1, 2),
        sparsities=(1,),
        ridges=(0.0, 1000.0),
        sparse_ridges=(0.0, 1000.0),
        seed=4,
    )


def test_select_finds_the_planted_rank_and_refits(chosen, planted):
    data, truth = planted
    assert chosen.chosen == dict(
        rank=2, sparsity=1, ridge=0.0, sparse_ridge=0.0, sparse_significance=0.0
    )
    assert len(chosen.table) == 2 * 1 * 2 * 2
    best = min(row.validation_mse for row in chosen.table)
    assert chosen.table[[r.validation_mse for r in chosen.table].index(best)].rank == 2
    assert chosen.params.U.shape == (12, 2)
    assert float(lrs.metrics.subspace_distance(chosen.params.U, truth.U)) < 0.05
    assert chosen.validation_samples == (int(round(0.2 * 20)) * 60,)
    json.dumps(chosen.to_dict())  # JSON-ready


def test_plot_writes_a_png(chosen, tmp_path):
    path = selection.plot(chosen, tmp_path / "curve.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_validation_masks_split_each_users_samples():
    mask = np.arange(30)[None, :] < np.array([30, 12, 5, 20])[:, None]
    train, valid = selection.validation_masks(
        mask, folds=1, holdout=0.25, need=5, seed=0
    )
    assert train.shape == valid.shape == (1, 4, 30)
    assert not (train & valid).any() and ((train | valid) == mask).all()
    np.testing.assert_array_equal(valid[0].sum(1), [8, 3, 0, 5])  # user 2: too few
    again = selection.validation_masks(mask, folds=1, holdout=0.25, need=5, seed=0)
    np.testing.assert_array_equal(again[1], valid)  # reproducible
    other = selection.validation_masks(mask, folds=1, holdout=0.25, need=5, seed=1)
    assert (other[1] != valid).any()
    train, valid = selection.validation_masks(
        mask, folds=3, holdout=0.2, need=4, seed=0
    )
    assert valid.shape == (3, 4, 30)
    assert (valid.sum(0) <= 1).all()  # each sample held out at most once
    np.testing.assert_array_equal(valid.sum(0)[0], mask[0])  # the folds cover user 0
    assert not valid[:, 2].any()  # 5 samples: holding out 2 leaves 3 < 4
    assert ((train & mask).sum(2) >= 4).all()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(ranks=()), "ranks must be a non-empty"),
        (dict(ranks=(0,)), "ranks must hold integers >= 1"),
        (dict(ranks=(2.5,)), "ranks must hold integers"),
        (dict(ranks="12"), "ranks must be a non-empty sequence"),
        (dict(sparsities=(1, 1)), "sparsities has repeated values"),
        (dict(ridges=(-1.0,)), "ridges must be a finite number >= 0"),
        (dict(ridges=(float("nan"),)), "ridges must be a finite number"),
        (dict(sparse_ridges=("a",)), "sparse_ridges must be a finite number"),
        (dict(ranks=(12,)), "rank must be < d"),
        (dict(folds=0), "folds must be an integer >= 1"),
        (dict(holdout=1.0), r"holdout must be a number in \(0, 1\)"),
        (dict(seed=-1), "seed must be an integer >= 0"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(refit="yes"), "refit must be a bool"),
        (dict(ranks=(8,), sparsities=(3,)), "fewer samples than rank"),
    ],
)
def test_bad_grids_raise_naming_the_argument(planted, kw, match):
    data, _ = planted
    data = data._replace(mask=data.mask.at[0, 10:].set(False))
    with pytest.raises(ValueError, match=match):
        selection.select(data, **kw)


def test_sparse_features_of_the_base_config_are_kept(planted):
    data, _ = planted
    config = lrs.AMHTConfig(1, 0, num_iters=3, sparse_features=(0, 1, 2))
    with pytest.raises(ValueError, match="sparsity must be <= len"):
        selection.select(data, config, ranks=(1,), sparsities=(4,))


def test_a_validation_set_of_the_same_users_is_scored_instead(planted):
    data, truth = planted
    # new samples of the same users: their first 5
    fresh, _ = lrs.synthetic.make_problem(
        jax.random.key(3), d=12, t=60, m=25, r=2, k=1, noise=0.05, dtype="float64"
    )
    validation = fresh._replace(mask=fresh.mask.at[:, 5:].set(False))
    config = lrs.AMHTConfig(1, 0, num_iters=15, rescue_fraction=0.0)
    result = selection.select(
        data, config, ranks=(2,), sparsities=(1,), ridges=(0.0, 1000.0),
        validation=validation, refit=False,
    )  # fmt: skip
    assert result.params is None and result.folds == 1
    assert result.validation_samples == (60 * 5,)
    assert result.chosen["ridge"] == 0.0
    with pytest.raises(ValueError, match="validation must hold the same"):
        short = lrs.UserData(fresh.X[:3], fresh.y[:3], fresh.mask[:3])
        selection.select(data, ranks=(1,), sparsities=(0,), validation=short)


def test_vmapped_candidates_give_the_same_table(planted):
    """batch_size > 1 vmaps candidates inside the program: same numbers."""
    data, _ = planted
    config = lrs.AMHTConfig(1, 0, num_iters=8, rescue_fraction=0.0)
    grid = dict(ranks=(2,), sparsities=(1,), ridges=(0.0, 1.0), refit=False)
    one = selection.select(data, config, batch_size=1, **grid)
    two = selection.select(data, config, batch_size=2, **grid)
    np.testing.assert_allclose(
        [r.validation_mse for r in two.table],
        [r.validation_mse for r in one.table],
        rtol=1e-8,
    )
