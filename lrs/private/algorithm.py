"""Private AMHT-LRS: the fit loop (docs/privacy.md).

U_0   <- top-r eigenvectors of the noisy, clipped sum_i a_i a_i^T
V,B   <- per user, locally, given the released U
repeat T times:
  G, H <- noisy clipped sums of X_i^T res_i v_i^T and m_i v_i v_i^T
  U    <- orth(U + G H^-1)                       (released)
  V,B  <- per user, locally
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lrs import metrics, peruser, sharding
from lrs.chunking import map_user_chunks
from lrs.config import AMHTConfig
from lrs.data import UserData
from lrs.errors import FitError
from lrs.linalg import orthonormalize
from lrs.params import LRSParams, SparseRows
from lrs.params import weights as dense_weights
from lrs.private import accounting
from lrs.private import mechanism as mech
from lrs.private.config import DPConfig
from lrs.sharding import UserAxis, first_user, psum
from lrs.shared import sparse_predictions
from lrs.validation import check_data, check_init, check_truth


@dataclasses.dataclass(frozen=True)
class PrivacyRecord:
    """What was spent, and how: the public part of the diagnostics.

    ``epsilon`` is the epsilon spent at ``delta`` over ``compositions``
    Gaussian releases, computed by ``accountant`` for the noise multiplier
    actually used; ``non_private=True`` marks the debugging mode (no noise, no
    clipping, epsilon infinite: nothing may be released).
    """

    non_private: bool
    epsilon: float
    epsilon_target: float | None
    delta: float | None
    noise_multiplier: float
    histogram_noise_multiplier: float
    compositions: int
    steps: int
    accountant: str
    neighbouring_relation: str
    sampling_rate: float
    batch_size: int
    clip_quantile: float | None
    clip_moment: float | None
    clip_gradient: tuple[float, ...]
    clip_gram: tuple[float, ...]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class PrivateDiagnostics(NamedTuple):
    """Per-iteration diagnostics (entry 0: initialization) and the record.

    Only ``privacy`` and the clip levels are released quantities; the other
    fields are computed from raw data for experiments.
    """

    loss: np.ndarray  # mean squared training residual
    u_change: np.ndarray  # subspace distance between successive released U
    relative_error: np.ndarray  # against ``truth`` (NaN without)
    subspace_distance: np.ndarray  # against ``truth`` (NaN without)
    clipped_fraction: np.ndarray  # users whose contribution was scaled down
    privacy: PrivacyRecord


class NoiseLevels(NamedTuple):
    """The noise and clip levels of a fit (traced arguments of the jitted fit)."""

    z: jax.Array  # statistic noise multiplier (0: none)
    z_histogram: jax.Array
    clip_moment: jax.Array  # NaN: choose privately
    clip_step: jax.Array  # (2,) for (G, H); NaN: choose privately


# ------------------------------------------------------------- statistics


def _masked(data: UserData):
    X = jnp.where(data.mask[..., None], data.X, 0)
    return X, jnp.where(data.mask, data.y, 0)


def _moment_vectors(X, y, mask) -> jax.Array:
    """``(c, d)`` a_i = X_i^T y_i / m_i."""
    count = jnp.maximum(jnp.sum(mask, axis=1), 1).astype(X.dtype)
    return jnp.einsum("cmd,cm->cd", X, y) / count[:, None]


def moment_norms(data: UserData, chunk: int | None) -> jax.Array:
    """``(t,)`` Frobenius norms ``||a_i a_i^T|| = ||a_i||^2``."""

    def fn(args, fresh):
        X, y, mask = args
        a = _moment_vectors(*_masked(UserData(X, y, mask)), mask)
        return jnp.sum(a * a, axis=1), None

    return map_user_chunks(fn, tuple(data), chunk)[0]


def moment_sum(data: UserData, weights, chunk: int | None, *, axis=None) -> jax.Array:
    """``(d, d)`` ``sum_i w_i a_i a_i^T`` (over all devices' users with ``axis``)."""

    def fn(args, fresh):
        X, y, mask, w = args
        a = _moment_vectors(*_masked(UserData(X, y, mask)), mask)
        return None, jnp.einsum("cd,ce->de", a * (w * fresh)[:, None], a)

    return map_user_chunks(fn, (*data, weights), chunk, axis=axis)[1]


def user_statistics(X, y, mask, U, fit: peruser.UserFit):
    """Per-user ``G_i = X_i^T res_i v_i^T (c, d, r)`` and ``H_i = m_i v_i v_i^T``."""
    X = jnp.where(mask[..., None], X, 0)
    pred = jnp.einsum("cmd,dr,cr->cm", X, U, fit.v) + sparse_predictions(
        X, fit.support, fit.b
    )
    res = jnp.where(mask, y - pred, 0)
    G = jnp.einsum("cmd,cm,cr->cdr", X, res, fit.v)
    count = jnp.sum(mask, axis=1).astype(X.dtype)
    H = count[:, None, None] * fit.v[:, :, None] * fit.v[:, None, :]
    return G, H


def _frobenius(a) -> jax.Array:
    return jnp.sqrt(jnp.sum(a * a, axis=tuple(range(1, a.ndim))))


def step_norms(data: UserData, U, fits: peruser.UserFit, chunk) -> jax.Array:
    """``(t, 2)`` Frobenius norms of each user's ``(G_i, H_i)``."""

    def fn(args, fresh):
        X, y, mask, fit = args
        G, H = user_statistics(X, y, mask, U, fit)
        return jnp.stack([_frobenius(G), _frobenius(H)], axis=1), None

    return map_user_chunks(fn, (*data, fits), chunk)[0]


def step_sums(data: UserData, U, fits: peruser.UserFit, weights, chunk, *, axis=None):
    """``(sum_i w_i G_i, sum_i w_i H_i)``, shapes ``(d, r)`` and ``(r, r)``.

    With ``axis`` (inside ``shard_map``) the sums run over all devices' users.
    """

    def fn(args, fresh):
        X, y, mask, fit, w = args
        G, H = user_statistics(X, y, mask, U, fit)
        w = w * fresh
        return None, (jnp.einsum("cdr,c->dr", G, w), jnp.einsum("crs,c->rs", H, w))

    return map_user_chunks(fn, (*data, fits, weights), chunk, axis=axis)[1]


# ------------------------------------------------------------ the releases


def _valid(t_local: int, axis: UserAxis | None):
    """``(t_local,)`` True for this device's real users; None on one device."""
    if axis is None:
        return None
    return first_user(t_local, axis) + jnp.arange(t_local) < axis.num_users


def _clip_level(key, norms, fixed, noise: NoiseLevels, quantile, axis=None):
    """Fixed clip levels, or the private ``quantile`` of ``norms (t, s)`` per column.

    With ``axis``, ``norms`` are this device's users and the quantile's counts
    are summed over all devices before the noise (the same on every device).
    """
    chosen = mech.private_quantile(
        key,
        norms,
        quantile,
        2 * noise.z_histogram,
        valid=_valid(norms.shape[0], axis),
        axis=axis,
    )
    return jnp.where(jnp.isnan(fixed), chosen.astype(norms.dtype), fixed)


def init_weights(key, norms, noise, quantile, non_private: bool, axis=None):
    """The initialization's clip level and ``(t,)`` clip weights from the
    ``(t,)`` moment norms (the noisy quantile uses the first half of ``key``)."""
    k_hist, _ = jax.random.split(key)
    clip = _clip_level(
        k_hist, norms[:, None], noise.clip_moment[None], noise, quantile, axis
    )[0]
    weights = jnp.ones_like(norms)
    if not non_private:
        weights = mech.clip_weights(norms[:, None], clip[None])
    return clip, weights


def init_release(key, M, clip, z, rank: int):
    """The released ``U_0 (d, r)`` from the clipped moment sum ``M (d, d)``
    (its noise uses the second half of ``key``)."""
    _, k_noise = jax.random.split(key)
    M = mech.noisy_sum(k_noise, M, clip, z, symmetric=True)
    _, vectors = jnp.linalg.eigh(M)
    return orthonormalize(vectors[:, ::-1][:, :rank])[0]


def _private_init(
    data, config, key, noise, quantile, chunk, non_private: bool, axis=None
):
    """Released ``U_0 (d, r)`` and the moment clip level used."""
    norms = moment_norms(data, chunk)
    clip, weights = init_weights(key, norms, noise, quantile, non_private, axis)
    M = moment_sum(data, weights, chunk, axis=axis)  # summed over devices
    return init_release(key, M, clip, noise.z, config.rank), clip


def _newton_direction(G, H, noise_std) -> jax.Array:
    """``G H^-1``, H's eigenvalues floored where its noise could flip them.

    The floor is the larger of 1e-6 of H's largest eigenvalue magnitude and
    twice the typical spectral norm of H's symmetric noise, ``2 sqrt(r)
    noise_std``: a function of released values only (post-processing).
    """
    lam, Q = jnp.linalg.eigh((H + H.T) / 2)
    r = H.shape[0]
    floor = jnp.maximum(1e-6 * jnp.max(jnp.abs(lam)), 2 * math.sqrt(r) * noise_std)
    lam = jnp.maximum(lam, jnp.maximum(floor, jnp.finfo(H.dtype).tiny))
    return (G @ Q / lam) @ Q.T


def noisy_step_statistics(
    data, U, fits, key, noise, quantile, batch, chunk, non_private
):
    """The Gaussian release of one shared step, before post-processing.

    Returns ``(G (d, r), H (r, r), clips (2,), clipped_fraction)``: the noisy
    clipped sums of ``G_i`` and ``H_i`` and the clip levels used. Only
    ``clipped_fraction`` is not released. :mod:`lrs.audit` audits this
    function on its own.
    """
    return _step_statistics(
        data, U, fits, key, noise, quantile, batch, chunk, non_private
    )


def _step_statistics(
    data, U, fits, key, noise, quantile, batch, chunk, non_private, axis=None
):
    """:func:`noisy_step_statistics`; with ``axis``, on this device's users.

    Sharded, every sum (the quantile's counts, ``G``, ``H``) is reduced over
    the devices before its noise is added, the noise and the batch come from
    the same key on every device, and the release equals the single-device one
    up to the summation order.
    """
    norms = step_norms(data, U, fits, chunk)
    clips, weights, clipped = step_weights(
        key, norms, noise, quantile, batch, non_private, axis
    )
    G, H = step_sums(data, U, fits, weights, chunk, axis=axis)
    G, H = step_noise(key, G, H, clips, noise.z)
    return G, H, clips, clipped


def step_weights(key, norms, noise, quantile, batch, non_private, axis=None):
    """A step's clip levels, ``(t,)`` weights (clipping and batch) and clipped
    fraction, from the ``(t, 2)`` norms of ``(G_i, H_i)``; with ``axis``, this
    device's users. Uses the first and fourth quarter of ``key``."""
    t_local = norms.shape[0]
    t = t_local if axis is None else axis.num_users
    k_hist, _, _, k_batch = jax.random.split(key, 4)
    clips = _clip_level(k_hist, norms, noise.clip_step, noise, quantile, axis)
    weights = jnp.ones((t_local,), norms.dtype)
    if not non_private:
        weights = mech.clip_weights(norms, clips)
    if axis is None:
        clipped = jnp.mean(weights < 1)
    else:
        scaled = (weights < 1) & _valid(t_local, axis)
        clipped = psum(jnp.sum(scaled, dtype=jnp.int32), axis) / t
    if batch < t:
        # The batch is drawn over all t users, as on one device; each device
        # keeps the chosen users it holds.
        chosen = jax.random.permutation(k_batch, t)[:batch]
        if axis is not None:
            local = chosen - first_user(t_local, axis)
            mine = (local >= 0) & (local < t_local)
            chosen = jnp.where(mine, local, t_local)
        in_batch = jnp.zeros((t_local,), norms.dtype).at[chosen].set(1, mode="drop")
        weights = weights * in_batch
    return clips, weights, clipped


def step_noise(key, G, H, clips, z):
    """The noisy ``(G, H)`` of a step (the second and third quarter of ``key``)."""
    _, k_G, k_H, _ = jax.random.split(key, 4)
    G = mech.noisy_sum(k_G, G, clips[0], z)
    H = mech.noisy_sum(k_H, H, clips[1], z, symmetric=True)
    return G, H


def step_update(U, G, H, clips, z):
    """The released ``U <- orth(U + G H^-1)`` from the noisy ``(G, H)``."""
    H_noise = 2 * z * clips[1]
    return orthonormalize(U + _newton_direction(G, H, H_noise))[0]


def _shared_release(
    data, U, fits, key, noise, quantile, batch, chunk, non_private, axis=None
):
    """One private shared step: ``(U_new, clips (2,), clipped_fraction)``."""
    G, H, clips, clipped = _step_statistics(
        data, U, fits, key, noise, quantile, batch, chunk, non_private, axis
    )
    return step_update(U, G, H, clips, noise.z), clips, clipped


# ----------------------------------------------------------------- the fit


def _params(U, fits: peruser.UserFit, d: int) -> LRSParams:
    return LRSParams(U, fits.v, SparseRows(fits.support, fits.b, d))


def _fit_program(
    data,
    config,
    key,
    U0,
    truth,
    noise,
    quantile,
    batch,
    non_private,
    private_init,
    axis=None,
):
    """The whole private fit; with ``axis``, inside ``shard_map`` on one device."""
    _, _, d = data.X.shape
    chunk = peruser.chunk_size(data, config)
    k_init, k_steps = jax.random.split(key)
    if private_init:
        U, clip_moment = _private_init(
            data, config, k_init, noise, quantile, chunk, non_private, axis
        )
    else:
        U, clip_moment = U0, jnp.full((), jnp.nan, data.X.dtype)
    fits = peruser.per_user_step(data, U, None, config, axis=axis)
    num = psum(jnp.sum(data.mask), axis)
    nan = jnp.full((), jnp.nan, U.dtype)
    valid = _valid(data.X.shape[0], axis)

    def error(params):
        if axis is None:
            return metrics.relative_error(params, truth)
        W_star = dense_weights(truth)
        diff = jnp.where(valid[:, None], dense_weights(params) - W_star, 0)
        num, den = psum((jnp.sum(diff * diff), jnp.sum(W_star * W_star)), axis)
        return jnp.sqrt(num) / jnp.sqrt(den)

    def record(U_old, U, fits, clips, clipped):
        params = _params(U, fits, d)
        have = truth is not None
        return dict(
            loss=psum(jnp.sum(fits.sq_residual), axis) / num,
            u_change=nan if U_old is None else metrics.subspace_distance(U_old, U),
            relative_error=error(params) if have else nan,
            subspace_distance=metrics.subspace_distance(U, truth.U) if have else nan,
            clipped_fraction=clipped,
            clip_gradient=clips[0],
            clip_gram=clips[1],
        )

    first = record(None, U, fits, jnp.full((2,), jnp.nan, U.dtype), nan)
    history = jax.tree.map(
        lambda a: jnp.zeros((config.num_iters + 1,), a.dtype).at[0].set(a), first
    )

    def body(i, carry):
        U, fits, history = carry
        key = jax.random.fold_in(k_steps, i)
        U_new, clips, clipped = _shared_release(
            data, U, fits, key, noise, quantile, batch, chunk, non_private, axis
        )
        fits = peruser.per_user_step(data, U_new, fits.support, config, axis=axis)
        entry = record(U, U_new, fits, clips, clipped)
        history = jax.tree.map(lambda h, a: h.at[i + 1].set(a), history, entry)
        return U_new, fits, history

    U, fits, history = jax.lax.fori_loop(0, config.num_iters, body, (U, fits, history))
    return _params(U, fits, d), history, clip_moment


_STATIC = ("config", "quantile", "batch", "non_private", "private_init")
_fit = jax.jit(_fit_program, static_argnames=(*_STATIC, "axis"))


@functools.partial(jax.jit, static_argnames=(*_STATIC, "mesh", "t"))
def _fit_sharded(
    data,
    config,
    key,
    U0,
    truth,
    noise,
    quantile,
    batch,
    non_private,
    private_init,
    mesh,
    t: int,
):
    """:func:`_fit_program` under ``shard_map``, users split over ``mesh``."""
    axis = UserAxis(sharding.AXIS, t)
    users, every = P(sharding.AXIS), P()
    params_spec = LRSParams(every, users, users)
    truth_spec = None if truth is None else params_spec

    def local(data, key, U0, truth, noise):
        return _fit_program(
            data,
            config,
            key,
            U0,
            truth,
            noise,
            quantile,
            batch,
            non_private,
            private_init,
            axis,
        )

    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(users, every, every, truth_spec, every),
        out_specs=(params_spec, every, every),
        check_vma=False,
    )
    return run(data, key, U0, truth, noise)


def _check_config(config, dp_config) -> AMHTConfig:
    if not isinstance(config, AMHTConfig):
        raise ValueError(
            f"config must be an lrs.AMHTConfig; got {type(config).__name__}"
        )
    if not isinstance(dp_config, DPConfig):
        raise ValueError(
            f"dp_config must be an lrs.private.DPConfig; got {type(dp_config).__name__}"
        )
    if config.fresh_samples > 1:
        raise ValueError(
            "fresh_samples must be 0 or 1 in the private fit (sample splitting is "
            f"not implemented there); got {config.fresh_samples}"
        )
    # The global rescue of the worst users makes one user's solver depend on
    # the others' residuals: off, so every user's fit stays local.
    return dataclasses.replace(config, rescue_fraction=0.0)


def plan_for(config: AMHTConfig, dp_config: DPConfig, t: int) -> accounting.Plan:
    """The releases a fit of ``t`` users under ``config`` makes."""
    private_init = isinstance(config.init, str) and config.init == "moments"
    return accounting.Plan(
        steps=config.num_iters,
        private_init=private_init,
        moment_histogram=private_init and dp_config.clip_moment is None,
        step_histogram=dp_config.clip_gradient is None or dp_config.clip_gram is None,
        histogram_noise_ratio=dp_config.histogram_noise_ratio,
        quantile_queries=mech.SEARCH_LEVELS,
        num_users=t,
        batch_size=batch_size(dp_config, t),
    )


def batch_size(dp_config: DPConfig, t: int) -> int:
    """Users per shared step: ``round(sampling_rate * t)``, at least 1."""
    return max(1, min(t, round(dp_config.sampling_rate * t)))


def noise_multiplier(config: AMHTConfig, dp_config: DPConfig, t: int) -> float:
    """The z of a fit of ``t`` users: calibrated, or the given one checked.

    Raises:
      ValueError: if a given ``noise_multiplier`` spends more than ``epsilon``.
    """
    plan = plan_for(config, dp_config, t)
    name = dp_config.resolved_accountant
    if dp_config.noise_multiplier is None:
        return accounting.calibrate(plan, dp_config.epsilon, dp_config.delta, name)
    z = float(dp_config.noise_multiplier)
    spent = accounting.epsilon_spent(plan, z, dp_config.delta, name)
    if spent > dp_config.epsilon:
        raise ValueError(
            f"noise_multiplier={z} cannot reach the target: over "
            f"{plan.compositions} releases it spends epsilon={spent:.4g} > "
            f"epsilon={dp_config.epsilon} at delta={dp_config.delta}"
        )
    return z


class Prepared(NamedTuple):
    """A checked, calibrated fit: everything but the data and the key.

    Built by :func:`prepare`; :func:`run_prepared` runs it. ``noise`` may be
    replaced (e.g. by :mod:`lrs.audit`'s deliberately broken variants) without
    changing ``plan`` or ``z``, the claim.
    """

    config: AMHTConfig
    plan: accounting.Plan
    z: float  # the calibrated noise multiplier (the claim's)
    noise: NoiseLevels  # the noise actually added
    quantile: float
    batch: int
    non_private: bool
    private_init: bool
    init_U: jax.Array | None  # a given initial U (``config.init`` an array)


def prepare(data: UserData, config: AMHTConfig, dp_config: DPConfig):
    """Checks the arguments and calibrates the noise: ``(Prepared, data)``."""
    config = _check_config(config, dp_config)
    data = check_data(data, config)
    t, _, d = data.X.shape
    dtype = data.X.dtype
    init_U = None
    private_init = isinstance(config.init, str) and config.init == "moments"
    if not isinstance(config.init, str):
        init_U = jnp.asarray(check_init(config.init, d, config.rank, dtype))
        init_U = orthonormalize(init_U)[0]
        config = dataclasses.replace(config, init="random")
    plan = plan_for(config, dp_config, t)
    z = 0.0 if dp_config.non_private else noise_multiplier(config, dp_config, t)

    def fixed(value):
        return jnp.asarray(np.nan if value is None else value, dtype)

    noise = NoiseLevels(
        jnp.asarray(z, dtype),
        jnp.asarray(z * dp_config.histogram_noise_ratio, jnp.float32),
        fixed(dp_config.clip_moment),
        jnp.stack([fixed(dp_config.clip_gradient), fixed(dp_config.clip_gram)]),
    )
    prepared = Prepared(
        config=config,
        plan=plan,
        z=z,
        noise=noise,
        quantile=float(dp_config.clip_quantile),
        batch=batch_size(dp_config, t),
        non_private=dp_config.non_private,
        private_init=private_init,
        init_U=init_U,
    )
    return prepared, data


def run_prepared(data: UserData, prepared: Prepared, key, truth=None):
    """The jitted fit of :func:`prepare`'d arguments (traceable in ``key``).

    Returns ``(params, history, clip_moment)``.
    """
    return _run(data, prepared, key, truth)


def _initial_U0(prepared: Prepared, key, d: int, dtype) -> jax.Array:
    """The public starting ``U (d, r)``: given, random, or zeros (unused)."""
    config = prepared.config
    if prepared.init_U is not None:
        return prepared.init_U
    if config.init == "random":
        U0 = jax.random.normal(jax.random.fold_in(key, 1), (d, config.rank), dtype)
        return orthonormalize(U0)[0]
    return jnp.zeros((d, config.rank), dtype)


def _run(data: UserData, prepared: Prepared, key, truth=None, mesh=None):
    """:func:`run_prepared`, with the users split over ``mesh`` if given.

    Sharded, ``data`` (and ``truth``) are padded and placed here and the
    results come back whole on the default device, without the padding.
    """
    t, _, d = data.X.shape
    config = prepared.config
    U0 = _initial_U0(prepared, key, d, data.X.dtype)
    args = (
        prepared.noise,
        prepared.quantile,
        prepared.batch,
        prepared.non_private,
        prepared.private_init,
    )
    if mesh is None:
        return _fit(data, config, key, U0, truth, *args)
    data = sharding.shard_data(data, mesh)
    if truth is not None:
        truth = sharding.shard_truth(truth, mesh)
    out = _fit_sharded(data, config, key, U0, truth, *args, mesh, t)
    params, history, clip_moment = jax.tree.map(sharding.gathered, out)
    B = params.B
    B = SparseRows(B.indices[:t], B.values[:t], B.dim)
    return LRSParams(params.U, params.V[:t], B), history, clip_moment


def fit(
    data: UserData,
    config: AMHTConfig,
    dp_config: DPConfig,
    *,
    key=None,
    truth: LRSParams | None = None,
    callback: Callable[[int, dict], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
):
    """Private AMHT-LRS: user-level (epsilon, delta)-DP release of U.

    Runs exactly ``config.num_iters`` shared steps (the number of releases is
    fixed in advance). Each user's ``v_i`` and ``b_i`` are computed from the
    released U and the user's own data only (joint DP; docs/privacy.md). The
    global rescue of the non-private fit is off; ``u_solver``, ``cg_*`` and
    ``rescue_fraction`` of ``config`` are not used.

    Args:
      data: the users' data.
      config: an :class:`lrs.AMHTConfig` (rank, sparsity, num_iters, ...).
        ``init='moments'`` is the private initialization; ``'random'`` or an
        array (public, data-independent) release nothing.
      dp_config: a :class:`DPConfig`.
      key: ``jax.random`` key of the noise, the initialization and the batches
        (default ``jax.random.key(0)``). Never reuse a key across releases of
        the same data.
      truth: planted parameters, to track errors in the diagnostics.
      callback: ``callback(iteration, info)`` after the fit, once per
        iteration with a dict of floats (the fit is one jitted program).
      mesh: a ``jax.sharding.Mesh`` with an axis ``'users'``: the users are
        split over its devices (any ``t``) as in :func:`lrs.fit`; every
        released sum (and every count of the private quantiles) is summed
        over the devices before its noise is added, with the same noise on
        every device, so the result equals the single-device fit with the
        same ``key`` up to rounding, and the privacy record is the same
        (docs/scale.md, "The private fit"). ``None``: the default device.

    Returns:
      ``(params, diagnostics)``: :class:`lrs.LRSParams` and a
      :class:`PrivateDiagnostics` whose ``privacy`` is a :class:`PrivacyRecord`.
    """
    if mesh is not None:
        sharding.check_mesh(mesh)
    prepared, data = prepare(data, config, dp_config)
    t, _, d = data.X.shape
    if truth is not None:
        check_truth(truth, t, d)
    key = jax.random.key(0) if key is None else key
    params, history, clip_moment = _run(data, prepared, key, truth, mesh)
    return _finish(params, history, clip_moment, prepared, dp_config, t, callback)


def _finish(params, history, clip_moment, prepared, dp_config, t: int, callback):
    """``(params, PrivateDiagnostics)`` of a finished fit; runs ``callback``.

    Raises:
      FitError: if the released U is not finite.
    """
    config, plan, z = prepared.config, prepared.plan, prepared.z
    z_h = z * dp_config.histogram_noise_ratio
    private_init = prepared.private_init
    history = jax.tree.map(np.asarray, history)
    if not np.all(np.isfinite(np.asarray(params.U))):
        raise FitError("private fit: the released U became non-finite")
    if dp_config.non_private:
        spent, name = math.inf, "none (non-private debugging mode)"
    else:
        name = dp_config.resolved_accountant
        spent = accounting.epsilon_spent(plan, z, dp_config.delta, name)
    no_clip = dp_config.non_private
    record = PrivacyRecord(
        non_private=dp_config.non_private,
        epsilon=spent,
        epsilon_target=dp_config.epsilon,
        delta=dp_config.delta,
        noise_multiplier=z,
        histogram_noise_multiplier=z_h,
        compositions=0 if no_clip else plan.compositions,
        steps=config.num_iters,
        accountant=name,
        neighbouring_relation="replace one user's entire data set",
        sampling_rate=dp_config.sampling_rate,
        batch_size=batch_size(dp_config, t),
        clip_quantile=None if no_clip else dp_config.clip_quantile,
        clip_moment=None if no_clip or not private_init else float(clip_moment),
        clip_gradient=()
        if no_clip
        else tuple(map(float, history["clip_gradient"][1:])),
        clip_gram=() if no_clip else tuple(map(float, history["clip_gram"][1:])),
    )
    diagnostics = PrivateDiagnostics(
        loss=history["loss"],
        u_change=history["u_change"],
        relative_error=history["relative_error"],
        subspace_distance=history["subspace_distance"],
        clipped_fraction=history["clipped_fraction"],
        privacy=record,
    )
    if callback is not None:
        for i in range(config.num_iters + 1):
            callback(i, {k: float(v[i]) for k, v in history.items()})
    return params, diagnostics
