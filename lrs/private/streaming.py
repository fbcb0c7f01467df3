"""Private AMHT-LRS on data that stays in host memory (or a memory-mapped ``.npy``).

:func:`lrs.private.fit`'s program driven from Python, the users streamed to
the device in chunks of ``chunk_users`` for every pass (``lrs.streaming``'s
``Stream``: the next chunk is copied while the current one computes). Each
chunk computation is a jitted call of the in-memory fit's own functions
(``moment_norms``, ``moment_sum``, ``step_norms``, ``step_sums``,
``peruser.per_user_step`` with the rescue off, so each user's fit is local);
the releases (``init_weights``, ``init_release``, ``step_weights``,
``step_noise``, ``step_update``: the same functions the in-memory program
calls) run once per release on the ``(t, s)`` norms and the summed
statistics, with the same float64 noise draws (drawn before the fit) and the
same batch keys. So the released U and the privacy record are
those of :func:`lrs.private.fit` with the same key, up to the summation order.

Passes over the data: the private initialization takes two (norms, then the
clipped sum), the first per-user fit one; each shared step takes two (the
clipped sums, then the per-user fits fused with the next step's norms).
Per-user state (``v_i``, supports, ``b_i``, residuals: ``O(t (r + k))``) and
the clip weights stay on the host; the device holds one chunk of data (two in
flight) plus ``O(d r + t)`` (``O(d^2)`` for the moment matrix of the private
initialization).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lrs import metrics, peruser, sharding
from lrs.config import AMHTConfig
from lrs.data import UserData
from lrs.host_stream import Stream, drain, rows_count
from lrs.params import LRSParams, SparseRows
from lrs.private import algorithm as alg
from lrs.private import mechanism as mech
from lrs.private.config import DPConfig
from lrs.private.result import finish
from lrs.streaming import _error_chunk
from lrs.validation import check_integer, check_key, check_truth

# ----------------------------------------------------- per-chunk computations


def _chunk(X, config) -> int:
    return config.chunk_size(X.shape[1], X.shape[2], X.dtype.itemsize)


def _usable(X, y, mask, config):
    return alg.usable_users(UserData(X, y, mask), config.rank + config.sparsity)


@functools.partial(jax.jit, static_argnames=("config",))
def _moment_norms_chunk(X, y, mask, config):
    data, eligible = _usable(X, y, mask, config)
    return alg.moment_norms(data, _chunk(X, config)), eligible


@functools.partial(jax.jit, static_argnames=("config",))
def _moment_sum_chunk(X, y, mask, scale, clip, config):
    data, _ = _usable(X, y, mask, config)
    return alg.moment_sum(data, clip, scale, _chunk(X, config))


@functools.partial(jax.jit, static_argnames=("config", "norms"))
def _fits_chunk(X, y, mask, warm, U, config, norms: bool):
    """The chunk's per-user fits given ``U`` (cold when ``warm`` is None),
    and, if ``norms``, the next step's ``(c, 2)`` norms of ``(G_i, H_i)``."""
    data, eligible = _usable(X, y, mask, config)
    fits = peruser.per_user_step(data, U, warm, config)
    step = alg.step_norms(data, U, fits, _chunk(X, config)) if norms else None
    return fits, eligible, step


@functools.partial(jax.jit, static_argnames=("config",))
def _step_sums_chunk(X, y, mask, v, support, b, scale, clips, U, config):
    data, _ = _usable(X, y, mask, config)
    fits = peruser.UserFit(v, support, b, jnp.zeros_like(scale))
    return alg.step_sums(data, U, fits, clips, scale, _chunk(X, config))


# ---------------------------------------------------- releases (on the norms)


# The in-memory fit's own pieces, each compiled once (the passes between them
# stream the users).
_init_clip = jax.jit(alg.init_clip)
_init_release = jax.jit(alg.init_release, static_argnames=("rank",))
_step_clip = jax.jit(alg.step_selection, static_argnames=("batch",))


@jax.jit
def _step_release(draws, U, G, H, clips, z):
    """The noise of a step and the released ``U``."""
    G, H = alg.step_noise(draws, G, H, clips, z)
    return G, H, alg.step_update(U, G, H, clips, z)


@functools.partial(jax.jit, static_argnames=("d",))
def _local_outputs(v, support, b, sq_residual, eligible, d):
    fits = peruser.UserFit(v, support, b, sq_residual)
    V, B, excluded = alg.local_outputs(fits, eligible, d)
    return V, B.values, excluded, jnp.where(excluded, 0, sq_residual)


# ---------------------------------------------------------------- the passes


class _Fits:
    """Each user's local fit, on the host."""

    def __init__(self, t: int, r: int, k: int, dtype):
        self.v = np.zeros((t, r), dtype)
        self.support = np.zeros((t, k), np.int32)
        self.b = np.zeros((t, k), dtype)
        self.sq_residual = np.zeros((t,), dtype)
        self.eligible = np.zeros((t,), bool)
        self.norms = np.zeros((t, 2), dtype)  # the next step's (G_i, H_i) norms

    def arrays(self):
        return (self.v, self.support, self.b, self.sq_residual, self.eligible)

    def outputs(self, d: int):
        """Each user's own ``(V, values, excluded, masked sq_residual)``."""
        arrays = (self.v, self.support, self.b, self.sq_residual, self.eligible)
        out = _local_outputs(*map(jnp.asarray, arrays), d)
        return tuple(np.asarray(a) for a in out)


def _per_user_pass(stream: Stream, fits: _Fits, U, config, norms: bool, cold: bool):
    """Every user's fit given ``U`` (and the next step's norms), into ``fits``."""
    targets = fits.arrays() + ((fits.norms,) if norms else ())
    pending = None
    for rows, (X, y, mask, *warm) in stream.chunks(*(() if cold else (fits.support,))):
        drain(pending, targets)  # the previous chunk, while this one computes
        out, eligible, step = _fits_chunk(
            X, y, mask, None if cold else warm[0], U, config, norms
        )
        extra = (step,) if norms else ()
        pending = (rows, rows_count(rows), (*out, eligible, *extra))
    drain(pending, targets)


def _moment_norms(stream: Stream, config):
    norms = np.zeros((stream.t,), stream.dtype)
    eligible = np.zeros((stream.t,), bool)
    pending = None
    for rows, (X, y, mask) in stream.chunks():
        drain(pending, (norms, eligible))
        pending = (rows, rows_count(rows), _moment_norms_chunk(X, y, mask, config))
    drain(pending, (norms, eligible))
    return norms, eligible


def _record(stream, fits: _Fits, U_old, U, clips, clipped, num, truth) -> dict:
    """One row of the history, as ``_fit_program``'s ``record``."""
    nan = float("nan")
    error = distance = nan
    V, values, _, sq = fits.outputs(stream.d)
    if truth is not None:
        num_e = den_e = 0.0
        arrays = (V, fits.support, values)
        arrays += (np.asarray(truth.V), np.asarray(truth.B.indices))
        arrays += (np.asarray(truth.B.values),)
        for _, (Vc, ic, bc, Vs, is_, bs) in stream.chunks(*arrays, data=False):
            a, b = _error_chunk(U, Vc, ic, bc, truth.U, Vs, is_, bs)
            num_e, den_e = num_e + float(a), den_e + float(b)
        error = float(np.sqrt(num_e) / np.sqrt(den_e))
        distance = float(metrics.subspace_distance(U, jnp.asarray(truth.U)))
    return dict(
        u_change=nan if U_old is None else float(metrics.subspace_distance(U_old, U)),
        subspace_distance=distance,
        clip_gradient=float(clips[0]),
        clip_gram=float(clips[1]),
        loss=float(sq.sum() / max(num, 1)),
        relative_error=error,
        clipped_fraction=float(clipped),
    )


# ---------------------------------------------------------------- the fit


def fit_streamed(
    data: UserData,
    config: AMHTConfig,
    dp_config: DPConfig,
    *,
    chunk_users: int,
    key,
    public_seed: int = 0,
    U0=None,
    truth: LRSParams | None = None,
    callback: Callable[[int, dict], None] | None = None,
    transcript: bool = False,
    nonprivate_diagnostics: bool = False,
    mesh: jax.sharding.Mesh | None = None,
):
    """:func:`lrs.private.fit` with the data on the host, streamed in chunks.

    The same fit, the same releases and the same privacy record as
    :func:`lrs.private.fit` with the same ``key``, up to the summation order:
    each release's per-user norms are computed chunk by chunk, the clip levels
    chosen from all ``t`` norms at once (the same private quantile, the same
    batch of users), the clipped sums accumulated over the chunks and the
    noise added once.

    Args:
      data: a :class:`lrs.UserData` whose arrays may be numpy or memory-mapped
        (:meth:`lrs.UserData.from_host`); never modified, never copied whole.
      config: as in :func:`lrs.private.fit`.
      dp_config: as in :func:`lrs.private.fit`.
      key: as in :func:`lrs.private.fit`: required, secret and fresh.
      public_seed: as in :func:`lrs.private.fit`.
      U0: as in :func:`lrs.private.fit`.
      truth: as in :func:`lrs.private.fit`.
      transcript: as in :func:`lrs.private.fit`.
      nonprivate_diagnostics: as in :func:`lrs.private.fit`.
      chunk_users: users copied to the device at a time (an integer ``>= 1``;
        ``>= t`` means one chunk).
      callback: ``callback(iteration, info)`` after the fit, once per
        iteration, as in :func:`lrs.private.fit`.
      mesh: as in :func:`lrs.fit_streamed`: each chunk split over the
        mesh's ``'users'`` devices (one process).

    Returns:
      ``(params, diagnostics)`` as :func:`lrs.private.fit`; ``U`` is a JAX
      array, ``V`` and ``B`` are numpy arrays on the host.

    Raises:
      ValueError: on a missing key, bad configuration, data layout or
        ``chunk_users`` (never because of the data's values).
    """
    key = check_key(key)
    public_seed = alg.check_public_seed(public_seed)
    check_integer("chunk_users", chunk_users, 1)
    if mesh is not None:
        sharding.check_mesh(mesh)
    prepared, data = alg.prepare(data, config, dp_config, U0)
    stream = Stream(data, int(chunk_users), mesh)
    t, d = stream.t, stream.d
    if truth is not None:
        check_truth(truth, t, d)
    config, noise, batch = prepared.config, prepared.noise, prepared.batch
    non_private = prepared.non_private
    dtype = stream.dtype
    draws = alg.draw_noise(prepared, key, t, d, dtype)

    nan = jnp.full((), jnp.nan, dtype)
    clip_moment, moment = nan, None
    if prepared.private_init:
        norms, eligible = map(jnp.asarray, _moment_norms(stream, config))
        clip_moment = _init_clip(draws.init_levels, norms, eligible, noise)
        clip = alg.sum_clips(clip_moment, non_private)
        M = stream.total(
            lambda X, y, mask, s: _moment_sum_chunk(X, y, mask, s, clip, config),
            np.asarray(eligible, dtype),
        )
        moment, U = _init_release(
            M, draws.init_moment, clip_moment, noise.z, config.rank
        )
    else:
        U = alg.initial_U(prepared, public_seed, d, dtype)
    fits = _Fits(t, config.rank, config.sparsity, dtype)
    steps = config.num_iters
    _per_user_pass(stream, fits, U, config, norms=steps > 0, cold=True)
    num = int(np.asarray(fits.eligible[:, None] & np.asarray(data.mask)).sum())
    nans = (float("nan"),) * 2
    rows = [_record(stream, fits, None, U, nans, float("nan"), num, truth)]
    released = dict(U=[U], G=[], H=[], moment=moment, clip_moment=clip_moment)
    for i in range(steps):
        clips, selection, clipped = _step_clip(
            draws.step_levels[i],
            mech.batch_key(key, i),
            jnp.asarray(fits.norms),
            jnp.asarray(fits.eligible),
            noise,
            batch,
        )
        summed = alg.sum_clips(clips, non_private)

        def part(X, y, mask, v, support, b, s, U=U, summed=summed):
            return _step_sums_chunk(X, y, mask, v, support, b, s, summed, U, config)

        G, H = stream.total(part, fits.v, fits.support, fits.b, np.asarray(selection))
        step = mech.step_draws(draws, i)
        G, H, U_new = _step_release(step, U, G, H, clips, noise.z)
        U_old, U = U, U_new
        _per_user_pass(stream, fits, U, config, norms=i + 1 < steps, cold=False)
        clips = tuple(map(float, np.asarray(clips)))
        rows.append(_record(stream, fits, U_old, U, clips, clipped, num, truth))
        for name, value in (("U", U), ("G", G), ("H", H)):
            released[name].append(value)
    history = {k: np.asarray([row[k] for row in rows]) for k in rows[0]}
    r = config.rank
    for name, shape in (("U", (d, r)), ("G", (d, r)), ("H", (r, r))):
        values = [np.asarray(a) for a in released[name]]
        released[name] = np.stack(values) if values else np.zeros((0, *shape), dtype)
    V, values, excluded, _ = fits.outputs(d)
    params = LRSParams(U, V, SparseRows(fits.support.copy(), values, d))
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
