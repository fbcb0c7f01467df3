"""Private AMHT-LRS: the fit loop (docs/privacy.md).

U_0   <- top-r eigenvectors of the noisy, clipped sum_i a_i a_i^T
V,B   <- per user, locally, given the released U
repeat T times:
  G, H <- noisy clipped sums of X_i^T res_i v_i^T and m_i v_i v_i^T
  U    <- orth(U + G H^-1)                       (released)
  V,B  <- per user, locally

The noise of every release is drawn in float64 from the secret key before
the program runs (:func:`lrs.private.mechanism.draw_noise`); a public
``U_0`` (``init='random'``) comes from a separate public seed.
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

from lrs import metrics, peruser, sharding
from lrs.config import AMHTConfig
from lrs.data import UserData
from lrs.linalg import orthonormalize
from lrs.params import LRSParams, SparseRows
from lrs.params import weights as dense_weights
from lrs.private import accounting
from lrs.private import mechanism as mech
from lrs.private.config import DPConfig
from lrs.private.releases import (  # noqa: F401  (re-exported for lrs.audit)
    NoiseLevels,
    init_clip,
    init_release,
    noisy_step_statistics,
    release_init,
    release_step_statistics,
    step_noise,
    step_selection,
    step_update,
    sum_clips,
    valid_users,
)
from lrs.private.result import (
    NonPrivateDiagnostics,
    PrivacyRecord,
    PrivateDiagnostics,
    Transcript,
    finish,
)
from lrs.private.statistics import (  # noqa: F401
    local_outputs,
    moment_norms,
    moment_sum,
    step_norms,
    step_sums,
    usable_users,
    user_statistics,
)
from lrs.sharding import UserAxis, psum
from lrs.validation import (
    check_init,
    check_key,
    check_layout,
    check_representable,
    check_truth,
)

__all__ = [
    "NonPrivateDiagnostics",
    "PrivacyRecord",
    "PrivateDiagnostics",
    "Transcript",
    "fit",
    "noise_multiplier",
    "plan_for",
]


# ----------------------------------------------------------------- the fit


def _fit_program(
    data,
    config,
    key,
    U0,
    truth,
    noise,
    draws,
    batch,
    non_private,
    private_init,
    axis=None,
):
    """The whole private fit; with ``axis``, inside ``shard_map`` on one device.

    ``key`` is the secret key (only the batches use it here: the noise comes
    in ``draws``). Returns ``(params, excluded, history, released)``.
    """
    t_local, _, d = data.X.shape
    chunk = peruser.chunk_size(data, config)
    data, eligible = usable_users(data, config.rank + config.sparsity)
    nan = jnp.full((), jnp.nan, data.X.dtype)
    moment = None
    if private_init:
        U, clip_moment, moment = release_init(
            data, eligible, config, noise, draws, chunk, non_private, axis
        )
    else:
        U, clip_moment = U0, nan
    fits = peruser.per_user_step(data, U, None, config, axis=axis)
    num = jnp.maximum(psum(jnp.sum(data.mask), axis), 1)
    valid = valid_users(t_local, axis)

    def error(U, V, B):
        W_star = dense_weights(truth)
        diff = dense_weights(LRSParams(U, V, B)) - W_star
        if valid is not None:
            diff = jnp.where(valid[:, None], diff, 0)
        num, den = psum((jnp.sum(diff * diff), jnp.sum(W_star * W_star)), axis)
        return jnp.sqrt(num) / jnp.sqrt(den)

    def record(U_old, U, fits, G, H, clips, clipped):
        V, B, excluded = local_outputs(fits, eligible, d)
        have = truth is not None
        sq = jnp.where(excluded, 0, fits.sq_residual)
        return dict(
            u_change=nan if U_old is None else metrics.subspace_distance(U_old, U),
            subspace_distance=metrics.subspace_distance(U, truth.U) if have else nan,
            clip_gradient=clips[0],
            clip_gram=clips[1],
            loss=psum(jnp.sum(sq), axis) / num,
            relative_error=error(U, V, B) if have else nan,
            clipped_fraction=clipped,
            U=U,
            G=G,
            H=H,
        )

    none_G, none_H = jnp.full_like(U, jnp.nan), jnp.full((U.shape[1],) * 2, nan)
    first = record(None, U, fits, none_G, none_H, jnp.full((2,), nan), nan)
    history = jax.tree.map(
        lambda a: jnp.zeros((config.num_iters + 1, *a.shape), a.dtype).at[0].set(a),
        first,
    )

    def body(i, carry):
        U, fits, history = carry
        G, H, clips, clipped = release_step_statistics(
            data,
            eligible,
            U,
            fits,
            mech.step_draws(draws, i),
            mech.batch_key(key, i),
            noise,
            batch,
            chunk,
            non_private,
            axis,
        )
        U_new = step_update(U, G, H, clips, noise.z)
        fits = peruser.per_user_step(data, U_new, fits.support, config, axis=axis)
        entry = record(U, U_new, fits, G, H, clips, clipped)
        history = jax.tree.map(lambda h, a: h.at[i + 1].set(a), history, entry)
        return U_new, fits, history

    U, fits, history = jax.lax.fori_loop(0, config.num_iters, body, (U, fits, history))
    V, B, excluded = local_outputs(fits, eligible, d)
    released = dict(
        U=history.pop("U"),
        G=history.pop("G")[1:],
        H=history.pop("H")[1:],
        moment=moment,
        clip_moment=clip_moment,
    )
    return LRSParams(U, V, B), excluded, history, released


_STATIC = ("config", "batch", "non_private", "private_init")
_fit = jax.jit(_fit_program, static_argnames=(*_STATIC, "axis"))


@functools.partial(jax.jit, static_argnames=(*_STATIC, "mesh", "t"))
def _fit_sharded(
    data,
    config,
    key,
    U0,
    truth,
    noise,
    draws,
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

    def local(data, key, U0, truth, noise, draws):
        return _fit_program(
            data,
            config,
            key,
            U0,
            truth,
            noise,
            draws,
            batch,
            non_private,
            private_init,
            axis,
        )

    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(users, every, every, truth_spec, every, every),
        out_specs=(params_spec, users, every, every),
        check_vma=False,
    )
    return run(data, key, U0, truth, noise, draws)


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
    if config.num_iters < 1:
        raise ValueError(
            "num_iters must be >= 1 in the private fit (it releases U after each "
            f"of its num_iters shared steps); got {config.num_iters}"
        )
    # The global rescue of the worst users makes one user's solver depend on
    # the others' residuals: off, so every user's fit stays local.
    return dataclasses.replace(config, rescue_fraction=0.0)


def plan_for(
    config: AMHTConfig, dp_config: DPConfig, t: int, *, public_U0: bool = False
) -> accounting.Plan:
    """The releases a fit of ``t`` users under ``config`` makes (``public_U0``:
    the fit starts from a given, public U0 and releases no initialization)."""
    private_init = config.init == "moments" and not public_U0
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


def noise_multiplier(
    config: AMHTConfig, dp_config: DPConfig, t: int, *, public_U0: bool = False
) -> float:
    """The z of a fit of ``t`` users: calibrated, or the given one checked.

    Raises:
      ValueError: if a given ``noise_multiplier`` spends more than ``epsilon``.
    """
    plan = plan_for(config, dp_config, t, public_U0=public_U0)
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
    init_U: jax.Array | None  # a given, public starting U (``U0``)


def prepare(data: UserData, config: AMHTConfig, dp_config: DPConfig, U0=None):
    """Checks the arguments and calibrates the noise: ``(Prepared, data)``.

    ``U0``: a public starting U (data-independent); the fit then releases no
    initialization.

    Only public facts are checked (types, shapes, the configuration): the
    values of the data never refuse a private fit (:func:`usable_users`).
    """
    config = _check_config(config, dp_config)
    data = check_layout(data, config)
    t, _, d = data.X.shape
    dtype = data.X.dtype
    for name in ("clip_moment", "clip_gradient", "clip_gram"):
        if getattr(dp_config, name) is not None:
            check_representable(f"dp_config.{name}", getattr(dp_config, name), dtype)
    init_U = None
    if U0 is not None:
        init_U = orthonormalize(jnp.asarray(check_init(U0, d, config.rank, dtype)))[0]
    public = init_U is not None
    private_init = config.init == "moments" and not public
    plan = plan_for(config, dp_config, t, public_U0=public)
    z = 0.0
    if not dp_config.non_private:
        z = noise_multiplier(config, dp_config, t, public_U0=public)

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


_draw_noise = jax.jit(mech.draw_noise, static_argnames=("steps", "d", "r"))


def draw_noise(prepared: Prepared, key, t: int, d: int, dtype) -> mech.NoiseDraws:
    """The fit's noise, drawn in float64 from ``key`` and cast to ``dtype``.

    Runs under ``jax.enable_x64(True)``; inside a traced function (the audit's
    ``vmap`` over keys) 64-bit types must already be enabled.
    """
    with jax.enable_x64(True):
        draws = _draw_noise(
            key,
            steps=prepared.config.num_iters,
            d=d,
            r=prepared.config.rank,
            num_users=t,
            quantile=prepared.quantile,
            z_histogram=prepared.noise.z_histogram,
        )
        return jax.tree.map(
            lambda a: a if a.dtype == jnp.int32 else a.astype(dtype), draws
        )


def run_prepared(data: UserData, prepared: Prepared, key, truth=None, public_seed=0):
    """The jitted fit of :func:`prepare`'d arguments (traceable in ``key``).

    Returns ``(params, excluded, history, released)``.
    """
    return _run(data, prepared, key, truth, public_seed=public_seed)


def public_init(rank: int, d: int, dtype, public_seed: int) -> jax.Array:
    """The public random ``U_0 (d, r)`` of ``init='random'``: from
    ``public_seed`` alone, never from the secret key."""
    U0 = jax.random.normal(jax.random.key(public_seed), (d, rank), dtype)
    return orthonormalize(U0)[0]


def initial_U(prepared: Prepared, public_seed: int, d: int, dtype) -> jax.Array:
    """The public starting ``U (d, r)``: given, random, or zeros (unused)."""
    config = prepared.config
    if prepared.init_U is not None:
        return prepared.init_U
    if config.init == "random":
        return public_init(config.rank, d, dtype, public_seed)
    return jnp.zeros((d, config.rank), dtype)


def _run(
    data: UserData, prepared: Prepared, key, truth=None, mesh=None, *, public_seed=0
):
    """:func:`run_prepared`, with the users split over ``mesh`` if given.

    Sharded, ``data`` (and ``truth``) are padded and placed here and the
    results come back whole on the default device, without the padding.
    """
    t, _, d = data.X.shape
    dtype = data.X.dtype
    config = prepared.config
    U0 = initial_U(prepared, public_seed, d, dtype)
    draws = draw_noise(prepared, key, t, d, dtype)
    args = (prepared.batch, prepared.non_private, prepared.private_init)
    if mesh is None:
        return _fit(data, config, key, U0, truth, prepared.noise, draws, *args)
    data = sharding.shard_data(data, mesh)
    if truth is not None:
        truth = sharding.shard_truth(truth, mesh)
    out = _fit_sharded(
        data, config, key, U0, truth, prepared.noise, draws, *args, mesh, t
    )
    params, excluded, history, released = jax.tree.map(sharding.gathered, out)
    B = params.B
    B = SparseRows(B.indices[:t], B.values[:t], B.dim)
    return LRSParams(params.U, params.V[:t], B), excluded[:t], history, released


def check_public_seed(public_seed) -> int:
    if isinstance(public_seed, bool) or not isinstance(public_seed, int | np.integer):
        raise ValueError(f"public_seed must be an int; got {public_seed!r}")
    return int(public_seed)


def fit(
    data: UserData,
    config: AMHTConfig,
    dp_config: DPConfig,
    *,
    key,
    public_seed: int = 0,
    U0=None,
    truth: LRSParams | None = None,
    callback: Callable[[int, dict], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    transcript: bool = False,
    nonprivate_diagnostics: bool = False,
):
    """Private AMHT-LRS: user-level (epsilon, delta)-DP release of U.

    Runs exactly ``config.num_iters`` shared steps (the number of releases is
    fixed in advance). Each user's ``v_i`` and ``b_i`` are computed from the
    released U and the user's own data only (joint DP; docs/privacy.md). The
    global rescue of the non-private fit is off; ``u_solver``, ``cg_*`` and
    ``rescue_fraction`` of ``config`` are not used.

    The data domain (docs/privacy.md, section 2.4): only public facts (types,
    shapes, the configuration) are checked before the fit. A user with a
    non-finite sample, fewer than ``rank + sparsity`` samples, or statistics
    that overflow the data's dtype contributes exactly nothing and gets
    ``v_i = 0, b_i = 0`` (``diagnostics.excluded``); no value refuses the fit.

    Args:
      data: the users' data ``X (t, m, d)``, ``y, mask (t, m)``.
      config: an :class:`lrs.AMHTConfig` (rank, sparsity, num_iters, ...).
        ``init='moments'`` is the private initialization; ``'random'``
        (from ``public_seed``) releases nothing.
      dp_config: a :class:`DPConfig`.
      key: the secret ``jax.random`` key of the noise and the batches
        (required): fresh for every fit and never published, e.g.
        ``jax.random.key(secrets.randbits(63))``. Anyone who knows it can
        remove the noise.
      public_seed: seed of the public random ``U_0`` of ``init='random'``
        (default 0); separate from ``key``, since ``U_0`` is released.
      U0: a public starting ``U (d, rank)`` (data-independent, e.g. from an
        earlier release); replaces ``config.init``, releases nothing.
      truth: planted parameters, to track the subspace distance of the
        released U (and, with ``nonprivate_diagnostics``, the exact error).
      callback: ``callback(iteration, info)`` after the fit, once per
        iteration with a dict of floats (the fit is one jitted program);
        exact values only with ``nonprivate_diagnostics``, keys prefixed
        ``'nonprivate_'``.
      mesh: a ``jax.sharding.Mesh`` with an axis ``'users'``: the users are
        split over its devices (any ``t``) as in :func:`lrs.fit`; every
        released sum (and every count of the private quantiles) is summed
        over the devices before its noise is added, with the same noise on
        every device, so the result equals the single-device fit with the
        same ``key`` up to rounding (docs/scale.md). ``None``: one device.
      transcript: also return every released value (``diagnostics.transcript``).
      nonprivate_diagnostics: also return exact training loss, error against
        ``truth`` and clipped fraction, computed from the raw data and NOT
        differentially private (``diagnostics.nonprivate``).

    Returns:
      ``(params, diagnostics)``: :class:`lrs.LRSParams` and a
      :class:`PrivateDiagnostics` whose ``privacy`` is a :class:`PrivacyRecord`.

    Raises:
      ValueError: on a missing or malformed key, bad configuration or a bad
        data layout (never because of the data's values).

    Example:
        >>> import secrets, jax, lrs
        >>> data, truth = lrs.synthetic.make_problem(
        ...     jax.random.key(0), d=20, t=2000, m=20, r=2, k=1)
        >>> config = lrs.AMHTConfig(rank=2, sparsity=1, num_iters=3)
        >>> dp = lrs.private.DPConfig(epsilon=4.0, delta=1e-6)
        >>> key = jax.random.key(secrets.randbits(63))  # secret, fresh
        >>> params, diagnostics = lrs.private.fit(data, config, dp, key=key)
        >>> diagnostics.privacy.epsilon <= 4.0
        True
        >>> bool(lrs.metrics.subspace_distance(params.U, truth.U) < 0.05)
        True
    """
    key = check_key(key)
    public_seed = check_public_seed(public_seed)
    if mesh is not None:
        sharding.check_mesh(mesh)
    prepared, data = prepare(data, config, dp_config, U0)
    t, _, d = data.X.shape
    if truth is not None:
        check_truth(truth, t, d)
    params, excluded, history, released = _run(
        data, prepared, key, truth, mesh, public_seed=public_seed
    )
    return finish(
        params,
        history,
        released,
        excluded,
        prepared,
        dp_config,
        t,
        callback=callback,
        transcript=transcript,
        nonprivate_diagnostics=nonprivate_diagnostics,
    )
