"""AMHT-LRS: alternating minimization with hard thresholding.

U   <- top-r eigenvectors of sum_ij y_ij^2 x_ij x_ij^T        (moment_init)
V,B <- per user: v_i, k-sparse b_i given U                    (per_user_step)
repeat:
  U   <- least squares given V, B; re-orthonormalize          (shared.update_U)
  V,B <- per user given the new U                             (per_user_step)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lrs import loop, metrics, peruser, sharding
from lrs.config import AMHTConfig
from lrs.data import UserData
from lrs.diagnostics import Diagnostics
from lrs.errors import FitError, raise_if_nonfinite
from lrs.linalg import orthonormalize
from lrs.params import LRSParams, SparseRows, weights
from lrs.peruser import (  # noqa: F401 (per_user_step: re-exported)
    chunk_size,
    cold_supports,
    fit_users,
    per_user_step,
    relative_residual,
)
from lrs.sharding import UserAxis, all_users, psum
from lrs.shared import moment_init, update_U
from lrs.validation import check_data, check_init, check_key, check_truth


class AMHTState(NamedTuple):
    """Iterate of AMHT-LRS; V and the sparse part are optimal for U."""

    U: jax.Array  # (d, r)
    V: jax.Array  # (t, r)
    indices: jax.Array  # (t, k) int32
    values: jax.Array  # (t, k)
    loss: jax.Array  # () mean squared training residual
    score: jax.Array  # (t,) relative residual ||res_i||^2 / ||y_i||^2 of each user
    half_step: jax.Array  # () int32, counts steps for fresh_samples batches
    # () subspace distance moved by the last shared step (inf before the
    # first); the next shared step's CG tolerance follows it.
    u_change: jax.Array = float("inf")
    # The last per-user step's peruser.UserCache, on its samples: each
    # user's residual and low-rank predictions X_i U v_i (t, m), which the
    # next shared step reads instead of forming X_i b_i and X_i U v_i again,
    # and the support's columns X_i[:, S_i] (t, m, k), which the next
    # per-user step reads instead of gathering them. None: unknown (computed
    # then), and always under fresh_samples (the steps see other samples).
    residual: jax.Array | None = None
    low_rank: jax.Array | None = None
    columns: jax.Array | None = None


STOP_REASONS = loop.STOP_REASONS  # AMHTInfo.stop_code indexes it
stop_code = loop.stop_code


# The fits' one diagnostics type; the name AMHTInfo is kept for existing code.
AMHTInfo = Diagnostics


def _batch_mask(data: UserData, config: AMHTConfig, half_step) -> jax.Array:
    """The samples used at ``half_step`` under ``fresh_samples`` splitting."""
    n = config.fresh_samples
    if n <= 1:
        return data.mask
    rank = jnp.cumsum(data.mask, axis=1) - 1
    count = jnp.maximum(jnp.sum(data.mask, axis=1, keepdims=True), 1)
    return data.mask & ((rank * n) // count == half_step % n)


def _state(U, fits, data: UserData, config, half_step, axis=None):
    """The state after a per-user step's ``(UserFit, UserCache)``."""
    fits, cache = fits
    sums = psum((jnp.sum(fits.sq_residual), jnp.sum(data.mask)), axis)
    loss = sums[0] / sums[1]
    score = relative_residual(data, fits.sq_residual)
    inf = jnp.full((), jnp.inf, U.dtype)
    if not keeps_cache(config):
        cache = (None, None, None)
    return AMHTState(
        U, fits.v, fits.support, fits.b, loss, score, half_step, inf, *cache
    )


def keeps_cache(config: AMHTConfig) -> bool:
    """Whether a step can reuse the last per-user step's
    :class:`lrs.peruser.UserCache`: every step sees the same samples (no
    ``fresh_samples`` split)."""
    return config.fresh_samples <= 1


def initial_U(data: UserData, config: AMHTConfig, key, U0=None, axis=None):
    """The starting ``U (d, r)``: ``U0`` if given, else random or moments."""
    d = data.X.shape[2]
    if U0 is not None:
        return orthonormalize(U0)[0]
    if config.init == "random":
        return orthonormalize(jax.random.normal(key, (d, config.rank), data.X.dtype))[0]
    solver = eigensolver(config, d)
    return moment_init(
        data._replace(mask=_batch_mask(data, config, 0)),
        config.rank,
        key,
        eigensolver=solver,
        iters=config.init_iters,
        chunk_size=chunk_size(data, config),
        axis=axis,
    )


def eigensolver(config: AMHTConfig, d: int) -> str:
    """The initialization's eigensolver: ``config.init_eigensolver``, resolved."""
    if config.init_eigensolver == "auto":
        return "dense" if d <= 4096 else "subspace"
    return config.init_eigensolver


def init(data: UserData, config: AMHTConfig, key, U0=None) -> AMHTState:
    """Initial U (:func:`initial_U`) and the cold-started per-user fit against it.

    Unlike :func:`fit`, this does not validate its inputs.
    """
    U = initial_U(data, config, key, U0)
    masked = data._replace(mask=_batch_mask(data, config, 1))
    fits = fit_users(masked, U, None, config)
    return _state(U, fits, masked, config, jnp.asarray(2, jnp.int32))


def _shared_update(state: AMHTState, data: UserData, config: AMHTConfig, axis=None):
    """The shared step of :func:`step`: ``(U_new, cg_iters)``."""
    _, cg_tol = config.tolerances(data.X.dtype)
    median = jnp.median(all_users(state.score, axis))
    inlier = inlier_users(state.score, median)
    shared_mask = _batch_mask(data, config, state.half_step) & inlier[:, None]
    predictions = None
    if keeps_cache(config) and state.residual is not None:
        predictions = (state.residual, state.low_rank)
    U, _, stats = update_U(
        data._replace(mask=shared_mask),
        state.U,
        state.V,
        state.indices,
        state.values,
        ridge=config.ridge,
        solver=config.u_solver,
        max_iters=config.cg_iters,
        tol=shared_tolerance(cg_tol, median, state.u_change),
        chunk_size=chunk_size(data, config),
        axis=axis,
        predictions=predictions,
    )
    return U, stats.cg_iters


def inlier_users(score, median_score):
    """``(t,)`` bool: the users whose fit takes part in the shared step.

    A user whose relative residual exceeds 100x the median (typically a
    wrong support) sits out rather than bias U.
    """
    return score <= 100 * median_score + jnp.finfo(score.dtype).eps


# Fraction of sqrt(median score) (the users' relative residual) that a shared
# step's CG must reach while U moves a lot. 0.3: one CG product per step on
# P0 with the same iterations to 1e-4 as 0.1 (two products), a slightly
# faster rate; near convergence the tenth of the U change binds anyway.
RESIDUAL_FRACTION = 0.3


def shared_tolerance(cg_tol, median_score, u_change):
    """CG tolerance of a shared step: ``max(cg_tol, min(0.3 sqrt(median score),
    0.1 u_change))``.

    Inexact U steps: no more accuracy than the current fit warrants (the
    users' relative residual) while U moves a lot, but a tenth of the last U
    change once it is small, so a small change is a fixed point of the exact
    step and not a CG step that barely moved (issue 16).
    """
    loose = jnp.minimum(RESIDUAL_FRACTION * jnp.sqrt(median_score), 0.1 * u_change)
    return jnp.maximum(cg_tol, loose)


def _iterate(state: AMHTState, data: UserData, config: AMHTConfig, first, axis=None):
    """Shared step (skipped when ``first``, which may be traced) + per-user step."""
    if first is False:
        U, cg_iters = _shared_update(state, data, config, axis)
        steps = config.inner_steps
    else:
        U, cg_iters = jax.lax.cond(
            first,
            lambda s: (s.U, jnp.zeros((), jnp.int32)),
            lambda s: _shared_update(s, data, config, axis),
            state,
        )
        steps = config.inner_steps + 3 * first.astype(jnp.int32)
    user_data = data._replace(mask=_batch_mask(data, config, state.half_step + 1))
    columns = state.columns if keeps_cache(config) else None
    fits = fit_users(
        user_data, U, state.indices, config, steps, axis=axis, columns=columns
    )
    new = _state(U, fits, user_data, config, state.half_step + 2, axis)
    nan = jnp.full((), jnp.nan, U.dtype)
    change = jnp.where(first, nan, metrics.subspace_distance(state.U, U))
    new = new._replace(u_change=jnp.where(first, jnp.inf, change).astype(U.dtype))
    zero = jnp.zeros((), jnp.int32)
    return new, AMHTInfo(new.loss, change, cg_iters, nan, nan, zero)


def step(state: AMHTState, data: UserData, config: AMHTConfig):
    """One iteration: the shared U step, then the per-user step."""
    return _iterate(state, data, config, False)


def _params(state: AMHTState, d: int) -> LRSParams:
    return LRSParams(state.U, state.V, SparseRows(state.indices, state.values, d))


def _with_truth(info: AMHTInfo, state: AMHTState, truth, d: int, axis=None):
    if truth is None:
        return info
    params = _params(state, d)
    if axis is None:
        error = metrics.relative_error(params, truth)
    else:  # the sums over users run over every device
        W_star = weights(truth)
        num, den = psum((_sq_norm(weights(params) - W_star), _sq_norm(W_star)), axis)
        error = jnp.sqrt(num) / jnp.sqrt(den)
    return info._replace(
        relative_error=error,
        subspace_distance=metrics.subspace_distance(state.U, truth.U),
    )


def _fit_start(data, key, U0, truth, config: AMHTConfig, axis=None):
    """The fit before iteration 0: ``(data, truth, scale, carry)``.

    The labels (and ``truth``'s outputs) are divided by ``scale``, their root
    mean square: the model is linear in (V, B), every tolerance is relative,
    and float32 norms of y^2-sized statistics then neither overflow nor
    underflow; the scale is undone on the way out. ``carry`` is the loop's
    :class:`lrs.loop.Carry` around the starting state: U from
    :func:`initial_U` and the cold supports. With ``axis`` this runs inside
    ``shard_map`` on one device's users.
    """
    tol, _ = config.tolerances(data.X.dtype)
    scale = _label_scale(data, axis)
    data = data._replace(y=data.y / scale)
    if truth is not None:
        truth = _scale_values(truth, 1 / scale)
    U = initial_U(data, config, key, U0, axis)
    cold = cold_supports(data._replace(mask=_batch_mask(data, config, 1)), U, config)
    t, m, _ = data.X.shape
    zeros = jnp.zeros((t, config.sparsity), data.X.dtype)
    cache = (None, None, None)
    if keeps_cache(config):
        empty = jnp.zeros((t, m), U.dtype)
        cache = (empty, empty, peruser.support_columns(data.X, data.mask, cold))
    state = AMHTState(
        U,
        jnp.zeros((t, config.rank), U.dtype),
        cold,
        zeros,
        jnp.zeros((), U.dtype),
        jnp.zeros((t,), U.dtype),
        jnp.zeros((), jnp.int32),
        jnp.full((), jnp.inf, U.dtype),
        *cache,
    )
    zero, nan = jnp.zeros((), jnp.int32), jnp.zeros((), U.dtype)
    info = AMHTInfo(nan, nan, zero, nan, nan, zero)
    return data, truth, scale, loop.start(state, info, _stop_rule(config, tol))


def _stop_rule(config: AMHTConfig, tol: float) -> loop.StopRule:
    return loop.StopRule(config.num_iters, tol, config.stall_iters)


def _fit_advance(data, truth, scale, carry, until, config: AMHTConfig, axis=None):
    """Iterations ``carry.i, ...`` up to the stop rule or ``until`` (traced).

    Iteration 0 is :func:`init`'s per-user step (cold supports, no shared
    step); iterations 1.. are :func:`step`. Same results as calling them.
    """
    d = data.X.shape[2]
    tol, _ = config.tolerances(data.X.dtype)

    def step(i, state):
        state, info = _iterate(state, data, config, i == 0, axis)
        info = _with_truth(info, state, truth, d, axis)
        return state, info._replace(loss=info.loss * scale**2)  # user's units

    return loop.advance(step, carry, _stop_rule(config, tol), until=until)


def _fit_program(data, config: AMHTConfig, key, U0=None, truth=None, axis=None):
    """The whole fit as one traceable function: ``(params, history, last)``
    (for programs that run many fits, e.g. :mod:`lrs.selection`)."""
    data, truth, scale, carry = _fit_start(data, key, U0, truth, config, axis)
    until = config.num_iters + 1
    carry = _fit_advance(data, truth, scale, carry, until, config, axis)
    state, history, last = loop.finish(carry)
    return _scale_values(_params(state, data.X.shape[2]), scale), history, last


_start = jax.jit(_fit_start, static_argnames=("config", "axis"))
_advance = jax.jit(_fit_advance, static_argnames=("config", "axis"))


def _sharded_programs(config: AMHTConfig, mesh, t: int, has_truth: bool):
    """:func:`_fit_start` and :func:`_fit_advance` under ``shard_map``, users
    split over ``mesh`` (same signatures as ``_start`` / ``_advance``)."""
    axis = UserAxis(sharding.AXIS, t)
    users, every = P(sharding.AXIS), P()
    truth_spec = LRSParams(every, users, users) if has_truth else None
    cache = (users,) * 3 if keeps_cache(config) else (None,) * 3
    state_spec = AMHTState(
        every, users, users, users, every, users, every, every, *cache
    )
    carry_spec = loop.Carry(every, state_spec, every, every, every, every)

    def shard(f, in_specs, out_specs):
        mapped = jax.shard_map(
            f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )
        return jax.jit(mapped)

    start = shard(
        lambda data, key, U0, truth: _fit_start(data, key, U0, truth, config, axis),
        (users, every, every, truth_spec),
        (users, truth_spec, every, carry_spec),
    )
    advance = shard(
        lambda data, truth, scale, carry, until: _fit_advance(
            data, truth, scale, carry, until, config, axis
        ),
        (users, truth_spec, every, carry_spec, every),
        carry_spec,
    )
    return start, advance


def _sq_norm(a) -> jax.Array:
    return jnp.sum(a * a)


def _label_scale(data: UserData, axis=None) -> jax.Array:
    """Root mean square of the real labels (1 when they are all zero)."""
    y_sq = jnp.sum(jnp.where(data.mask, data.y, 0) ** 2)
    y_sq, count = psum((y_sq, jnp.sum(data.mask)), axis)
    return label_scale(y_sq, count, data.y.dtype)


def label_scale(y_sq, count, dtype) -> jax.Array:
    """The fits' unit of labels: ``sqrt(y_sq / count)`` from the sum of the
    squared real labels and their count, 1 when that is 0.

    Every fit works with ``y`` divided by it: the model is linear in
    ``(V, B)``, every tolerance is relative, and float32 norms of
    ``y^2``-sized statistics then neither overflow nor underflow.
    """
    rms = jnp.sqrt(y_sq / jnp.maximum(count, 1))
    return jnp.where(rms > 0, rms, 1).astype(dtype)


def _scale_values(params: LRSParams, factor) -> LRSParams:
    """The same model with its outputs multiplied by ``factor``: (U, c V, c B)."""
    B = params.B._replace(values=params.B.values * factor)
    return LRSParams(params.U, params.V * factor, B)


def fit(
    data: UserData,
    config: AMHTConfig,
    *,
    key=None,
    U0=None,
    callback: Callable[[int, AMHTInfo], None] | None = None,
    truth: LRSParams | None = None,
    mesh: jax.sharding.Mesh | None = None,
):
    """Fits AMHT-LRS: the whole loop is one jitted program.

    Args:
      data: the users' data.
      config: an :class:`AMHTConfig`.
      key: ``jax.random`` key (used by ``init='random'`` and the matrix-free
        initialization); default ``jax.random.key(0)``.
      U0: a starting ``U (d, rank)`` of your own (full column rank, finite);
        it replaces ``config.init`` and is orthonormalized first.
      callback: called as ``callback(iteration, info)`` after the initialization
        (iteration 0) and every iteration, with ``info`` an :class:`AMHTInfo` of
        Python floats; e.g. to draw a progress bar.
      truth: planted parameters; when given, the diagnostics track the relative
        error and the subspace distance to them.
      mesh: a ``jax.sharding.Mesh`` with an axis ``'users'``: the users are
        split over its devices (any ``t``; see docs/scale.md) and the result
        equals the single-device fit up to rounding. ``V`` and ``B`` come back
        whole on the default device. ``None``: the default device only.

    Returns:
      ``(params, diagnostics)``: :class:`LRSParams` and an :class:`AMHTInfo` of
      numpy arrays, entry ``i`` after iteration ``i`` (0 = initialization).

    Raises:
      ValueError: on bad data or configuration (the message names the argument).
      FitError: if the iterates become non-finite (names the iteration).
    """
    if not isinstance(config, AMHTConfig):
        raise ValueError(
            f"config must be an lrs.AMHTConfig; got {type(config).__name__}"
        )
    if mesh is not None:
        sharding.check_mesh(mesh)
    data = check_data(data, config)
    t, _, d = data.X.shape
    config.check_features(d)
    if U0 is not None:
        U0 = jnp.asarray(check_init(U0, d, config.rank, data.X.dtype))
    if truth is not None:
        check_truth(truth, t, d)
    key = check_key(key, default=jax.random.key(0))
    t = data.num_users
    if mesh is None:
        start = functools.partial(_start, config=config)
        advance = functools.partial(_advance, config=config)
    else:
        start, advance = _sharded_programs(config, mesh, t, truth is not None)
        data = sharding.shard_data(data, mesh)
        if truth is not None:
            truth = sharding.shard_truth(truth, mesh)
    data, truth, scale, carry = start(data, key, U0, truth)
    if callback is None:
        carry = advance(data, truth, scale, carry, config.num_iters + 1)
    else:  # one iteration per call of the same compiled program: same results
        while int(carry.code) == 0:
            i = int(carry.i)
            carry = advance(data, truth, scale, carry, i + 1)
            info = jax.tree.map(lambda h: np.asarray(h[i]).item(), carry.history)
            callback(i, info)
    state, history, last = loop.finish(carry)
    params = _scale_values(_params(state, data.X.shape[2]), scale)
    if mesh is not None:  # back to the default device, without the padded users
        params, history = jax.tree.map(sharding.gathered, (params, history))
        B = params.B
        B = SparseRows(B.indices[:t], B.values[:t], B.dim)
        params = LRSParams(params.U, params.V[:t], B)
    n = int(last) + 1
    diagnostics = jax.tree.map(lambda h: np.asarray(h)[:n], history)
    raise_if_nonfinite(params, diagnostics.loss)
    return params, diagnostics


def personalize(U, data_new: UserData, config: AMHTConfig):
    """Cold start: fits ``(V_new (t, r), B_new SparseRows)`` for new users, U fixed.

    Uses all of each new user's samples (``fresh_samples`` does not apply).
    """
    if not isinstance(config, AMHTConfig):
        raise ValueError(
            f"config must be an lrs.AMHTConfig; got {type(config).__name__}"
        )
    # The initialization is irrelevant here; drop an init array so the config
    # stays hashable for jit.
    config = dataclasses.replace(config, fresh_samples=0, init="moments")
    data_new = check_data(data_new, config, name="data_new")
    U = jnp.asarray(U, data_new.X.dtype)
    d = data_new.X.shape[2]
    if U.shape != (d, config.rank):
        raise ValueError(
            f"U must have shape (d, rank) = {(d, config.rank)}; got {U.shape}"
        )
    if not bool(jnp.isfinite(U).all()):
        raise ValueError("U contains NaN or inf values")
    V, idx, val = _personalize(U, data_new, config)
    if not (bool(jnp.isfinite(V).all()) and bool(jnp.isfinite(val).all())):
        raise FitError("personalize produced non-finite values (overflow?)")
    return V, SparseRows(idx, val, d)


@functools.partial(jax.jit, static_argnames=("config",))
def _personalize(U, data, config):
    scale = _label_scale(data)  # as in _fit_start
    data = data._replace(y=data.y / scale)
    fits = per_user_step(data, U, None, config)
    fits = per_user_step(data, U, fits.support, config)
    return fits.v * scale, fits.support, fits.b * scale
