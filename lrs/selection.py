"""Model selection: choose (rank, sparsity, ridge, sparse_ridge, significance)
by validation.

:func:`select` holds out samples of each user inside the training data (a
random share, or K folds), fits AMHT-LRS for every candidate on the rest,
scores the held-out samples, and refits the best candidate on all the data.
Any :class:`lrs.UserData` will do (ratings, synthetic, your own).

Batching: rank and sparsity fix array shapes, so each ``(rank, sparsity)``
pair is one compiled program; the penalties (``ridge``, ``sparse_ridge``, the
per-user sparsity rule's ``sparse_significance``) and the folds are array
inputs of that program, which runs over all of them with ``lax.map``
(``batch_size`` candidates vmapped at a time: 1 keeps memory at one fit,
larger trades memory for fewer sequential passes).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrs import amht
from lrs.chunking import map_user_chunks
from lrs.config import AMHTConfig
from lrs.data import UserData
from lrs.params import LRSParams, weights
from lrs.peruser import chunk_size
from lrs.validation import (
    check_data,
    check_fraction,
    check_integer,
    check_key,
    check_layout,
    check_real,
)

__all__ = ["Candidate", "Selection", "plot", "select", "validation_masks"]


class Candidate(NamedTuple):
    """One row of the validation table."""

    rank: int
    sparsity: int
    ridge: float
    sparse_ridge: float
    validation_mse: float  # pooled over the folds' held-out samples
    fold_mse: tuple[float, ...]  # one per fold
    iterations: tuple[int, ...]  # of each fold's fit
    stop_reasons: tuple[str, ...]  # of each fold's fit
    sparse_significance: float = 0.0


@dataclasses.dataclass(frozen=True)
class Selection:
    """Result of :func:`select`.

    Attributes:
      table: every candidate's :class:`Candidate` row, in grid order.
      config: the chosen :class:`lrs.AMHTConfig` (the base config with the
        chosen rank, sparsity, ridge, sparse_ridge and sparse_significance).
      params, diagnostics: the chosen config refitted on all of ``data``
        (None with ``refit=False``).
      folds, holdout, seed: the validation scheme.
      validation_samples: held-out samples per fold.
    """

    table: tuple[Candidate, ...]
    config: AMHTConfig
    params: LRSParams | None
    diagnostics: amht.AMHTInfo | None
    folds: int
    holdout: float
    seed: int
    validation_samples: tuple[int, ...]

    @property
    def chosen(self) -> dict:
        """``{'rank', 'sparsity', 'ridge', 'sparse_ridge', 'sparse_significance'}``
        of the chosen config."""
        c = self.config
        return dict(
            rank=c.rank,
            sparsity=c.sparsity,
            ridge=c.ridge,
            sparse_ridge=c.sparse_ridge,
            sparse_significance=c.sparse_significance,
        )

    def to_dict(self) -> dict:
        """Plain Python (JSON-ready): the table, chosen values and the scheme."""
        return dict(
            chosen=self.chosen,
            sparse_features=self.config.sparse_features,
            folds=self.folds,
            holdout=self.holdout,
            seed=self.seed,
            validation_samples=list(self.validation_samples),
            table=[row._asdict() for row in self.table],
        )


# ------------------------------------------------------------- the split


def validation_masks(
    mask, *, folds: int, holdout: float, need: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, valid)``, each ``(F, t, m)`` bool, within each user's samples.

    ``folds == 1``: one split holding out ``round(holdout m_i)`` (at least 1)
    random samples of each user; ``folds >= 2``: each user's samples are
    dealt at random into ``folds`` near-equal parts, part ``f`` held out in
    fold ``f``. A user keeps all samples for training (and is not scored)
    whenever holding out would leave fewer than ``need`` training samples.
    """
    mask = np.asarray(mask, bool)
    counts = mask.sum(axis=1)
    keys = np.random.default_rng(seed).random(mask.shape)
    keys[~mask] = np.inf
    position = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1)
    if folds == 1:
        n_val = np.maximum(np.rint(holdout * counts), 1).astype(np.int64)
        n_val = np.where(counts - n_val >= need, n_val, 0)
        valid = (mask & (position < n_val[:, None]))[None]
    else:
        fold_of = (position * folds) // np.maximum(counts, 1)[:, None]
        eligible = counts - -(-counts // folds) >= need
        valid = np.stack(
            [mask & (fold_of == f) & eligible[:, None] for f in range(folds)]
        )
    return mask[None] & ~valid, valid


# ----------------------------------------------------------- the fits


PENALTIES = ("ridge", "sparse_ridge", "sparse_significance")


def _with_penalties(config: AMHTConfig, values) -> AMHTConfig:
    """A copy of ``config`` whose :data:`PENALTIES` are the traced ``values``
    (inside jit only; it never leaves the traced function and is never
    hashed)."""
    traced = copy.copy(config)
    for i, name in enumerate(PENALTIES):
        object.__setattr__(traced, name, values[i])
    return traced


def _squared_error(params: LRSParams, data: UserData, valid, chunk) -> jax.Array:
    """``(sum of squared errors, count)`` over the ``valid (t, m)`` samples."""
    W = weights(params)

    def fn(args, fresh):
        X, y, v, w = args
        res = jnp.where(v & fresh[:, None], y - jnp.einsum("cmd,cd->cm", X, w), 0)
        return None, jnp.sum(res * res)

    sq = map_user_chunks(fn, (data.X, data.y, valid, W), chunk)[1]
    return sq, jnp.sum(valid)


@functools.partial(jax.jit, static_argnames=("config", "batch_size"))
def _score_candidates(data, train, scored, valid, penalties, key, config, batch_size):
    """Validation error of every (fold, penalties row): ``(F, P)`` arrays.

    Fits on ``data`` with the mask ``train[fold]``, scores the samples
    ``valid[fold]`` of ``scored`` (``data`` itself, or a validation set of
    the same users)."""
    chunk = chunk_size(scored, config)
    F, P = train.shape[0], penalties.shape[0]

    def one(args):
        fold, pair = args
        cfg = _with_penalties(config, penalties[pair])
        fit_data = data._replace(mask=train[fold])
        params, history, done = amht._fit_program(fit_data, cfg, key)
        sq, n = _squared_error(params, scored, valid[fold], chunk)
        return sq, n, done, history.stop_code[done]

    folds, pairs = jnp.meshgrid(jnp.arange(F), jnp.arange(P), indexing="ij")
    out = jax.lax.map(one, (folds.ravel(), pairs.ravel()), batch_size=batch_size)
    return jax.tree.map(lambda a: a.reshape(F, P), out)


# ------------------------------------------------------------- checks


def _grid(name: str, values, check) -> tuple:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a non-empty sequence; got {values!r}")
    values = tuple(values)
    if not values:
        raise ValueError(f"{name} must be a non-empty sequence; got {values!r}")
    for v in values:
        check(v)
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has repeated values: {values!r}")
    return values


def _ints(name: str, low: int):
    def check(v):
        try:
            check_integer(name, v, low)
        except ValueError:
            raise ValueError(f"{name} must hold integers >= {low}; got {v!r}") from None

    return check


def _reals(name: str):
    def check(v):
        check_real(name, v, "a finite number >= 0", low=0)

    return check


def _check_scheme(folds, holdout, seed, batch_size) -> None:
    check_integer("folds", folds, 1)
    check_fraction("holdout", holdout)
    check_integer("seed", seed, 0)
    check_integer("batch_size", batch_size, 1)


# ------------------------------------------------------------- select


def select(
    data: UserData,
    config: AMHTConfig | None = None,
    *,
    ranks: Sequence[int] = (1, 2, 3, 5),
    sparsities: Sequence[int] = (0, 1, 2, 3),
    ridges: Sequence[float] = (0.0, 1.0, 10.0),
    sparse_ridges: Sequence[float] = (0.0,),
    significances: Sequence[float] = (0.0,),
    folds: int = 1,
    holdout: float = 0.2,
    seed: int = 0,
    key=None,
    refit: bool = True,
    batch_size: int = 1,
    validation: UserData | None = None,
) -> Selection:
    """Chooses ``(rank, sparsity, ridge, sparse_ridge, sparse_significance)``
    by held-out error.

    Every combination of the grids is fitted (``sparse_ridge`` and the
    significance only matter, and are only tried, when ``sparsity > 0``) on
    each fold's training samples and scored by the mean squared error of the
    held-out ones, pooled over the folds. The smallest error wins; ties go to
    the earlier candidate in grid order (so list the simpler values first).

    Args:
      data: any :class:`lrs.UserData`; every user needs ``max(ranks) +
        max(sparsities)`` samples. Users with too few samples to hold any out
        train in every fold and are not scored.
      config: base :class:`lrs.AMHTConfig` for every other setting (e.g.
        ``sparse_features``, ``num_iters``); its rank, sparsity, ridge and
        sparse_ridge and sparse_significance are replaced. Default ``AMHTConfig(1, 0)``.
      ranks: the grid of ranks.
      sparsities: the grid of sparsities.
      ridges: the grid of ridges (on ``v_i`` and the sparse values).
      sparse_ridges: the grid of extra shrinkage on the sparse values.
      significances: the grid of the per-user sparsity rule's level
        (:attr:`lrs.AMHTConfig.sparse_significance`; 0 keeps ``k`` values
        for every user).
      folds: 1 for a single held-out share (``holdout``), ``K >= 2`` for K
        folds of each user's samples.
      holdout: share of each user's samples held out when ``folds == 1``.
      seed: of the split (numpy); the same seed gives the same split.
      key: ``jax.random`` key of the fits (as :func:`lrs.fit`).
      refit: refit the chosen config on all of ``data``.
      batch_size: candidates vmapped at a time within one ``(rank,
        sparsity)`` program (memory grows with it).
      validation: a held-out :class:`lrs.UserData` of the same users (row
        ``i`` = user ``i`` of ``data``; any number of samples each, e.g. each
        user's latest ratings for a time split), scored instead of samples
        held out of ``data``: every candidate then fits all of ``data``, and
        ``folds`` / ``holdout`` are not used. Use it when the features of
        ``data`` were themselves fitted on its samples (e.g. item factors
        from the training ratings), which would leak into held-out samples.

    Returns:
      a :class:`Selection`.

    Raises:
      ValueError: on a bad grid or argument (named), or data that does not
        fit the largest candidate.
    """
    config = AMHTConfig(1, 0) if config is None else config
    if not isinstance(config, AMHTConfig):
        raise ValueError(f"config must be an lrs.AMHTConfig; got {config!r}")
    ranks = _grid("ranks", ranks, _ints("ranks", 1))
    sparsities = _grid("sparsities", sparsities, _ints("sparsities", 0))
    ridges = _grid("ridges", ridges, _reals("ridges"))
    sparse_ridges = _grid("sparse_ridges", sparse_ridges, _reals("sparse_ridges"))
    significances = _grid("significances", significances, _reals("significances"))
    _check_scheme(folds, holdout, seed, batch_size)
    if not isinstance(refit, bool):
        raise ValueError(f"refit must be a bool; got {refit!r}")
    largest = _replace(config, max(ranks), max(sparsities), (0.0, 0.0, 0.0))
    data = check_data(data, largest)
    config.check_features(data.dim)
    key = check_key(key, default=jax.random.key(0))
    need = largest.rank + largest.sparsity
    if validation is None:
        scored = data
        train, valid = validation_masks(
            data.mask, folds=folds, holdout=holdout, need=need, seed=seed
        )
    else:
        scored = _check_validation(validation, data)
        train, valid = np.asarray(data.mask)[None], np.asarray(scored.mask)[None]
        folds = 1
    if not valid.any(axis=(1, 2)).all():
        raise ValueError(
            f"data: no user has enough samples to hold any out (need more than "
            f"max(ranks) + max(sparsities) = {need})"
        )
    rows = []
    for r, k in itertools.product(ranks, sparsities):
        sparse_grid = list(itertools.product(sparse_ridges, significances))
        pairs = [(a, *b) for a in ridges for b in (sparse_grid if k else [(0.0, 0.0)])]
        base = _replace(config, r, k, (0.0, 0.0, 0.0))
        penalties = jnp.asarray(pairs, data.X.dtype)
        sq, n, done, code = jax.device_get(
            _score_candidates(
                data, jnp.asarray(train), scored, jnp.asarray(valid), penalties,
                key, base, batch_size,
            )
        )  # fmt: skip
        for p, values in enumerate(pairs):
            fold_mse = tuple(float(x) for x in sq[:, p] / np.maximum(n[:, p], 1))
            pooled = float(sq[:, p].sum() / max(n[:, p].sum(), 1))
            reasons = tuple(amht.STOP_REASONS[int(c)] for c in code[:, p])
            rows.append(
                Candidate(r, k, float(values[0]), float(values[1]), pooled,
                          fold_mse, tuple(int(i) for i in done[:, p]), reasons,
                          float(values[2]))
            )  # fmt: skip
    best = min(rows, key=lambda row: row.validation_mse)  # first of equals
    if not math.isfinite(best.validation_mse):
        raise ValueError("every candidate's validation error is non-finite")
    values = tuple(getattr(best, name) for name in PENALTIES)
    chosen = _replace(config, best.rank, best.sparsity, values)
    params = diagnostics = None
    if refit:
        params, diagnostics = amht.fit(data, chosen, key=key)
    counts = tuple(int(v.sum()) for v in valid)
    return Selection(
        tuple(rows), chosen, params, diagnostics, folds, holdout, seed, counts
    )


def _check_validation(validation, data: UserData) -> UserData:
    checked = check_layout(validation, AMHTConfig(1, 0), name="validation")
    for name, a in (("X", checked.X), ("y", checked.y)):
        if not bool(jnp.isfinite(jnp.asarray(a)).all()):
            raise ValueError(f"validation.{name} contains NaN or inf values")
    if checked.num_users != data.num_users or checked.dim != data.dim:
        raise ValueError(
            f"validation must hold the same t = {data.num_users} users and "
            f"d = {data.dim} features as data; got t = {checked.num_users}, "
            f"d = {checked.dim}"
        )
    return checked


def _replace(config, rank, sparsity, values) -> AMHTConfig:
    try:
        penalties = dict(zip(PENALTIES, values))
        return dataclasses.replace(config, rank=rank, sparsity=sparsity, **penalties)
    except ValueError as error:
        raise ValueError(f"the grid does not fit config: {error}") from None


# ------------------------------------------------------------------ plot


def plot(selection: Selection, path: str | os.PathLike, title: str | None = None):
    """Saves a PNG of the validation curve: validation MSE against the rank,
    one line per (sparsity, ridge, sparse_ridge, significance), the chosen
    point circled.

    Drawn in the studies' one style (:mod:`lrs.studies.plotting`: an Agg
    canvas, no pyplot state; matplotlib is imported here only). Returns the
    path written.
    """
    from lrs.studies import plotting

    fig, axes = plotting.figure(size=(7, 4.5))
    ax = axes[0, 0]
    plotting.grid(ax)
    lines: dict[tuple, list] = {}
    for row in selection.table:
        label = (row.sparsity, row.ridge, row.sparse_ridge, row.sparse_significance)
        lines.setdefault(label, []).append((row.rank, row.validation_mse))
    for (k, a, b, s), points in sorted(lines.items()):
        xs, ys = zip(*sorted(points))
        name = f"k={k}, ridge={a:g}"
        name += f", sparse_ridge={b:g}, significance={s:g}" if k else ""
        ax.plot(xs, ys, marker="o", lw=1, ms=3, label=name)
    c = selection.chosen
    best = [
        row.validation_mse
        for row in selection.table
        if all(getattr(row, name) == value for name, value in c.items())
    ]
    ax.plot([c["rank"]], best, "o", ms=12, mfc="none", mec="k", label="chosen")
    ax.set_xticks(sorted({row.rank for row in selection.table}))
    ax.set_xlabel("rank r")
    ax.set_ylabel("validation MSE")
    scheme = (
        f"{selection.folds} folds"
        if selection.folds > 1
        else f"{selection.holdout:g} held out"
    )
    ax.set_title(title or f"model selection ({scheme}): chosen {c}", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    return plotting.save(fig, path)
