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

from lrs import loop, metrics, peruser, sharding
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
    "Mechanism",
    "NonPrivateDiagnostics",
    "PrivacyRecord",
    "PrivateDiagnostics",
    "PrivateState",
    "StepRelease",
    "Transcript",
    "fit",
    "init",
    "noise_multiplier",
    "plan_for",
    "step",
]


# ------------------------------------------------- the state and the step


class Mechanism(NamedTuple):
    """What a private fit releases and how: hashable, static under ``jit``.

    Attributes:
      config: the fit's :class:`lrs.AMHTConfig` (global rescue off).
      batch: users drawn for each shared step (``batch_size``).
      non_private: the debugging mode: no noise, no clipping.
      private_init: the fit releases a private moment initialization (False:
        it starts from a public ``U0`` or a public random U).
    """

    config: AMHTConfig
    batch: int
    non_private: bool
    private_init: bool


class PrivateState(NamedTuple):
    """A private fit between two releases (a pytree: jit, vmap and shard it).

    Everything in it but ``U`` is secret: the per-user fits stay with their
    users, the key and the drawn noise with the curator.
    """

    step: jax.Array  # () int32: shared steps done (releases of U after U_0)
    U: jax.Array  # (d, r): the last released U
    fits: peruser.UserFit  # (t, ...) each user's local v_i, support, b_i
    eligible: jax.Array  # (t,) bool: users whose data take part
    noise: NoiseLevels  # noise multiplier and (fixed or chosen) clip levels
    draws: mech.NoiseDraws  # every noise sample of the fit, drawn in advance
    key: jax.Array  # the secret key (the batches of users)


class StepRelease(NamedTuple):
    """What one shared step released (and one exact, unreleased figure)."""

    U: jax.Array  # (d, r): orth(U + G H^-1)
    G: jax.Array  # (d, r): noisy clipped sum of X_i^T res_i v_i^T
    H: jax.Array  # (r, r): noisy clipped sum of m_i v_i v_i^T
    clips: jax.Array  # (2,): the clip levels of G and H
    clipped_fraction: jax.Array  # (): users scaled down by clipping (NOT DP)


def _init(data, mechanism: Mechanism, key, U0, noise, draws, axis=None):
    """The initial :class:`PrivateState` and the initialization's release
    ``(clip_moment, moment)`` (NaN and None when it releases nothing)."""
    config = mechanism.config
    chunk = peruser.chunk_size(data, config)
    data, eligible = usable_users(data, config.rank + config.sparsity)
    clip_moment, moment = jnp.full((), jnp.nan, data.X.dtype), None
    U = U0
    if mechanism.private_init:
        U, clip_moment, moment = release_init(
            data, eligible, config, noise, draws, chunk, mechanism.non_private, axis
        )
    fits = peruser.per_user_step(data, U, None, config, axis=axis)
    zero = jnp.zeros((), jnp.int32)
    state = PrivateState(zero, U, fits, eligible, noise, draws, key)
    return state, clip_moment, moment


def _step(state: PrivateState, data, mechanism: Mechanism, axis=None):
    """Shared step ``state.step``: release ``(G, H)``, then ``U``, then each
    user refits locally. Returns ``(state, StepRelease)``.

    Past the budget (``state.step >= num_iters``) there is no fresh noise:
    the release is NaN rather than a reuse of the last step's noise.
    """
    config, i = mechanism.config, state.step
    data = data._replace(mask=data.mask & state.eligible[:, None])
    G, H, clips, clipped = release_step_statistics(
        data,
        state.eligible,
        state.U,
        state.fits,
        mech.step_draws(state.draws, jnp.minimum(i, config.num_iters - 1)),
        mech.batch_key(state.key, i),
        state.noise,
        mechanism.batch,
        peruser.chunk_size(data, config),
        mechanism.non_private,
        axis,
    )
    within = i < config.num_iters
    G, H = (jnp.where(within, a, jnp.nan) for a in (G, H))
    U = step_update(state.U, G, H, clips, state.noise.z)
    fits = peruser.per_user_step(data, U, state.fits.support, config, axis=axis)
    state = state._replace(step=i + 1, U=U, fits=fits)
    return state, StepRelease(U, G, H, clips, clipped)


# ----------------------------------------------------------------- the fit


def _fit_program(data, mechanism: Mechanism, key, U0, truth, noise, draws, axis=None):
    """The whole private fit: :func:`_init`, then ``num_iters`` of
    :func:`_step`; with ``axis``, inside ``shard_map`` on one device.

    ``key`` is the secret key (only the batches use it here: the noise comes
    in ``draws``). Returns ``(params, excluded, history, released)``.
    """
    config = mechanism.config
    t_local, _, d = data.X.shape
    state, clip_moment, moment = _init(data, mechanism, key, U0, noise, draws, axis)
    data = data._replace(mask=data.mask & state.eligible[:, None])
    nan = jnp.full((), jnp.nan, data.X.dtype)
    num = jnp.maximum(psum(jnp.sum(data.mask), axis), 1)
    valid = valid_users(t_local, axis)

    def error(U, V, B):
        W_star = dense_weights(truth)
        diff = dense_weights(LRSParams(U, V, B)) - W_star
        if valid is not None:
            diff = jnp.where(valid[:, None], diff, 0)
        num, den = psum((jnp.sum(diff * diff), jnp.sum(W_star * W_star)), axis)
        return jnp.sqrt(num) / jnp.sqrt(den)

    def record(U_old, state, release: StepRelease):
        U, fits = state.U, state.fits
        V, B, excluded = local_outputs(fits, state.eligible, d)
        have = truth is not None
        sq = jnp.where(excluded, 0, fits.sq_residual)
        return dict(
            u_change=nan if U_old is None else metrics.subspace_distance(U_old, U),
            subspace_distance=metrics.subspace_distance(U, truth.U) if have else nan,
            clip_gradient=release.clips[0],
            clip_gram=release.clips[1],
            loss=psum(jnp.sum(sq), axis) / num,
            relative_error=error(U, V, B) if have else nan,
            clipped_fraction=release.clipped_fraction,
            U=U,
            G=release.G,
            H=release.H,
        )

    U = state.U
    none = StepRelease(
        U, jnp.full_like(U, jnp.nan), jnp.full((U.shape[1],) * 2, nan),
        jnp.full((2,), nan), nan,
    )  # fmt: skip
    first = record(None, state, none)
    history = jax.tree.map(
        lambda a: jnp.zeros((config.num_iters + 1, *a.shape), a.dtype).at[0].set(a),
        first,
    )

    def body(i, carry):
        state, history = carry
        U_old = state.U
        state, release = _step(state, data, mechanism, axis)
        entry = record(U_old, state, release)
        history = jax.tree.map(lambda h, a: h.at[i + 1].set(a), history, entry)
        return state, history

    state, history = loop.fori_loop(0, config.num_iters, body, (state, history))
    V, B, excluded = local_outputs(state.fits, state.eligible, d)
    released = dict(
        U=history.pop("U"),
        G=history.pop("G")[1:],
        H=history.pop("H")[1:],
        moment=moment,
        clip_moment=clip_moment,
    )
    return LRSParams(state.U, V, B), excluded, history, released


_fit = jax.jit(_fit_program, static_argnames=("mechanism", "axis"))


@functools.partial(jax.jit, static_argnames=("mechanism", "mesh", "t"))
def _fit_sharded(data, mechanism, key, U0, truth, noise, draws, mesh, t: int):
    """:func:`_fit_program` under ``shard_map``, users split over ``mesh``."""
    axis = UserAxis(sharding.AXIS, t)
    users, every = P(sharding.AXIS), P()
    params_spec = LRSParams(every, users, users)
    truth_spec = None if truth is None else params_spec

    def local(data, key, U0, truth, noise, draws):
        return _fit_program(data, mechanism, key, U0, truth, noise, draws, axis)

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

    @property
    def mechanism(self) -> Mechanism:
        """The static part: what the fit's program releases and how."""
        return Mechanism(self.config, self.batch, self.non_private, self.private_init)


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
    U0 = initial_U(prepared, public_seed, d, dtype)
    draws = draw_noise(prepared, key, t, d, dtype)
    mechanism = prepared.mechanism
    if mesh is None:
        return _fit(data, mechanism, key, U0, truth, prepared.noise, draws)
    data = sharding.shard_data(data, mesh)
    if truth is not None:
        truth = sharding.shard_truth(truth, mesh)
    out = _fit_sharded(data, mechanism, key, U0, truth, prepared.noise, draws, mesh, t)
    params, excluded, history, released = jax.tree.map(sharding.gathered, out)
    B = params.B
    B = SparseRows(B.indices[:t], B.values[:t], B.dim)
    return LRSParams(params.U, params.V[:t], B), excluded[:t], history, released


_init_jit = jax.jit(_init, static_argnames=("mechanism",))
_step_jit = jax.jit(_step, static_argnames=("mechanism",))


def init(
    data: UserData,
    config: AMHTConfig,
    dp_config: DPConfig,
    *,
    key,
    public_seed: int = 0,
    U0=None,
) -> tuple[PrivateState, Mechanism]:
    """The private fit up to its first release: ``(state, mechanism)``.

    The same checks, calibration (for ``config.num_iters`` shared steps) and
    noise as :func:`fit`, then the initialization's release (the private
    moment initialization, or the public ``U0`` / random U) and every user's
    local fit. Drive the fit with :func:`step`, ``num_iters`` times at most;
    ``init`` + ``num_iters`` steps is :func:`fit`'s computation (same key,
    same releases). The privacy record of the whole budget is
    :func:`fit`'s; here :func:`plan_for` and ``state.noise.z`` give it.

    Args: as in :func:`fit`.

    Returns:
      ``(PrivateState, Mechanism)``: ``state.U (d, r)`` is the released
      ``U_0``; the mechanism is static (pass it to :func:`step`).

    Raises:
      ValueError: as :func:`fit`.
    """
    key = check_key(key)
    public_seed = check_public_seed(public_seed)
    prepared, data = prepare(data, config, dp_config, U0)
    t, _, d = data.X.shape
    dtype = data.X.dtype
    U_start = initial_U(prepared, public_seed, d, dtype)
    draws = draw_noise(prepared, key, t, d, dtype)
    mechanism = prepared.mechanism
    state, _, _ = _init_jit(data, mechanism, key, U_start, prepared.noise, draws)
    return state, mechanism


def step(
    state: PrivateState, data: UserData, mechanism: Mechanism
) -> tuple[PrivateState, StepRelease]:
    """One shared step of the private fit: ``(state, StepRelease)``.

    Releases the noisy clipped ``(G, H)`` of the users in this step's batch
    and ``U <- orth(U + G H^-1)``; each user then refits ``v_i, b_i``
    locally. Mirrors :func:`lrs.step`; jit-compatible (``mechanism`` static).
    ``data`` must be the data :func:`init` saw.

    Raises:
      ValueError: when the budget is spent (``state.step >= num_iters``: no
        fresh noise is left; under ``jit`` the release is NaN instead).
    """
    if not isinstance(mechanism, Mechanism):
        raise ValueError(
            "mechanism must be the lrs.private.Mechanism returned by "
            f"lrs.private.init; got {type(mechanism).__name__}"
        )
    done, budget = state.step, mechanism.config.num_iters
    if not isinstance(done, jax.core.Tracer) and int(done) >= budget:
        raise ValueError(
            f"the privacy budget is spent: {int(done)} of num_iters = {budget} "
            "shared steps done (init again, with a fresh key and a budget for "
            "more steps)"
        )
    return _step_jit(state, data, mechanism)


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
