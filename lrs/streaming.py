"""AMHT-LRS on data that stays in host memory (or a memory-mapped ``.npy``).

The users are streamed to the device in chunks of ``chunk_users`` for every
pass over the data; the next chunk is copied while the current one computes.
The iteration is :func:`lrs.amht.fit`'s, driven from Python: each per-chunk
computation is a jitted call of the same per-user and shared functions
(``peruser.pursue_chunk``, the two candidates of ``peruser.rescue`` as two
programs (``peruser.rescue_candidate``), ``shared.rhs_and_product`` /
``normal_operator`` / ``moment_matrix``), the CG loop of the U step is
``shared.solve_U_cg`` with a Python while loop, and the global selections
(median score, worst users) run on the host. Per-user state (``V``, supports,
values, scores: ``O(t (r + k))``, and each user's residual and low-rank
predictions for the shared step: ``O(t m)``) lives in host memory, so the
device holds one chunk of data plus ``O(d r)`` (``O(d^2)`` for the dense
moment matrix).

The chunks come from ``lrs/host_stream.py``. Ragged data
(:class:`lrs.RaggedData`, ``N`` samples without padding) streams the same
way: users sorted by sample count, ``chunk_users`` at a time, each chunk
left-packed to its own largest count rounded up to a power of two; per-user
state stays in the users' order and the per-sample predictions take
``O(N)``. Memory and time then follow ``N``, not ``t m_max``, and the
global selections see the same per-user numbers as the padded fit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lrs import amht, loop, metrics, peruser, sharding, shared
from lrs.config import AMHTConfig
from lrs.data import RaggedData, UserData, float_dtype
from lrs.errors import raise_if_nonfinite
from lrs.host_stream import RaggedStream, Stream, drain, rows_count
from lrs.linalg import orthonormalize
from lrs.params import LRSParams, SparseRows, weights
from lrs.validation import (
    check_data,
    check_init,
    check_integer,
    check_key,
    check_ragged,
    check_truth,
)

# ----------------------------------------------------- per-chunk computations


def _scaled(X, y, mask, scale, half, config) -> UserData:
    """A chunk with labels in fit units and the samples of half-step ``half``."""
    data = UserData(X, y / scale, mask)
    return data._replace(mask=amht._batch_mask(data, config, half))


@jax.jit
def _label_sums(X, y, mask):
    """Sum of squared real labels, their count, non-finite entries of X and y."""
    y_sq = jnp.sum(jnp.where(mask, y, 0) ** 2)
    bad_X, bad_y = jnp.sum(~jnp.isfinite(X)), jnp.sum(~jnp.isfinite(y))
    return y_sq, jnp.sum(mask), bad_X, bad_y


@functools.partial(jax.jit, static_argnames=("config",))
def _moment_chunk(X, y, mask, scale, Q, config):
    data = _scaled(X, y, mask, scale, 0, config)
    if Q is None:
        return shared.moment_matrix(data, None)
    return shared.moment_operator(data, Q, None)


@functools.partial(jax.jit, static_argnames=("config",))
def _pursue_chunk(X, y, mask, support, U, scale, half, steps, config):
    """Per-user fits of a chunk (cold supports when ``support`` is None) and
    their :class:`lrs.peruser.UserCache`."""
    data = _scaled(X, y, mask, scale, half, config)
    if support is None:
        support = peruser.cold_supports(data, U, config)
    opts = peruser.sparse_options(config, X.shape[2])
    fits, cache = peruser.pursue_chunk(*data, support, U, steps, config.ridge, **opts)
    y_sq = jnp.sum(jnp.where(data.mask, data.y, 0) ** 2, axis=1)
    return fits, cache[:2], y_sq, jnp.sum(data.mask, axis=1)


@functools.partial(jax.jit, static_argnames=("config", "start"))
def _rescue_chunk(X, y, mask, U, best, scale, half, config, start):
    """One candidate of :func:`lrs.peruser.rescue` on a chunk of hard users.

    ``start`` is ``"cold"`` or ``"l1"``: that candidate's supports, polished by
    pursuit, replace the rows of ``best`` that they fit better. Called once
    per candidate, cold first, the l1 call taking the cold call's result, this
    gives ``rescue_masked``'s result, but each program holds a single chain of
    batched LAPACK calls. ``rescue`` runs both candidates in one program, where
    XLA:CPU runs the two chains at once; with large batches both LAPACK kernels
    then split their batch over XLA's intra-op pool and block waiting for it,
    which deadlocks once every pool thread waits so (docs/scale.md).
    Returns the new ``best`` and the predictions of its
    :class:`lrs.peruser.UserCache`.
    """
    data = _scaled(X, y, mask, scale, half, config)
    best = peruser.rescue_candidate(*data, U, best, config, start)
    return best, peruser.user_cache(*data, U, best)[:2]


@functools.partial(jax.jit, static_argnames=("config",))
def _rhs_chunk(X, y, mask, inlier, V, idx, val, scale, half, config):
    """The chunk's part of the U step's right-hand side and preconditioner."""
    data = _shared_data(X, y, mask, inlier, scale, half, config)
    counts = jnp.sum(data.mask, axis=1).astype(V.dtype)
    return shared._rhs(data, V, idx, val, None), (V * counts[:, None]).T @ V


@functools.partial(jax.jit, static_argnames=("config",))
def _rhs_product_chunk(X, y, mask, inlier, V, res, low, scale, half, config):
    """As :func:`_rhs_chunk` from the fit's predictions, with the normal
    operator at U (:func:`lrs.shared.rhs_and_product`)."""
    data = _shared_data(X, y, mask, inlier, scale, half, config)
    counts = jnp.sum(data.mask, axis=1).astype(V.dtype)
    rhs, AU = shared.rhs_and_product(data, V, res, low, None)
    return rhs, AU, (V * counts[:, None]).T @ V


@functools.partial(jax.jit, static_argnames=("config",))
def _normal_chunk(X, y, mask, inlier, V, D, scale, half, config):
    data = _shared_data(X, y, mask, inlier, scale, half, config)
    if D is None:
        return shared._dense_normal_matrix(data, V, None)
    return shared.normal_operator(data, V, D, None)


def _shared_data(X, y, mask, inlier, scale, half, config) -> UserData:
    data = _scaled(X, y, mask, scale, half, config)
    return data._replace(mask=data.mask & inlier[:, None])


@jax.jit
def _error_chunk(U, V, idx, val, U_star, V_star, idx_star, val_star):
    """``(||W - W*||^2, ||W*||^2)`` over a chunk of users."""
    d = U.shape[0]
    W = weights(LRSParams(U, V, SparseRows(idx, val, d)))
    W_star = weights(LRSParams(U_star, V_star, SparseRows(idx_star, val_star, d)))
    return jnp.sum((W - W_star) ** 2), jnp.sum(W_star**2)


# ------------------------------------------------------------- the streamer


# ---------------------------------------------------------------- the fit


def fit(
    data: UserData,
    config: AMHTConfig,
    *,
    chunk_users: int,
    key=None,
    U0=None,
    callback: Callable[[int, amht.AMHTInfo], None] | None = None,
    truth: LRSParams | None = None,
    mesh: jax.sharding.Mesh | None = None,
    resident: bool = False,
):
    """:func:`lrs.fit` with the data on the host, streamed in chunks of users.

    Args:
      data: a :class:`UserData` whose arrays may be numpy or memory-mapped
        (:meth:`UserData.from_host`), or a :class:`lrs.RaggedData` (``N``
        samples, no padding: chunks of users of similar counts, each padded
        only to its own largest count rounded up to a power of two); never
        modified, never copied whole.
      config: an :class:`AMHTConfig`.
      chunk_users: users copied to the device at a time (``>= 1``; ``>= t``
        means one chunk). Device memory is about ``chunk_users * m * d``
        floats times a small factor plus ``O(d r)``; see docs/scale.md.
      key: as in :func:`lrs.fit`.
      U0: as in :func:`lrs.fit`.
      callback: as in :func:`lrs.fit`; it runs on the host between iterations,
        and an exception it raises stops the fit.
      truth: as in :func:`lrs.fit`.
      mesh: a ``jax.sharding.Mesh`` with an axis ``'users'`` (one process):
        each chunk is split over its devices, so data larger than all the
        devices' memory streams to several devices at once (``chunk_users``
        is rounded up to a multiple of the devices). ``None``: the default
        device.
      resident: keep each chunk's data on the device after the first pass
        (device memory: all chunks, about the packed data's size) instead of
        reading and copying it again on every pass; for data that fits.

    Returns:
      ``(params, diagnostics)`` as :func:`lrs.fit`, equal to it up to rounding;
      ``U`` is a JAX array, ``V`` and ``B`` are numpy arrays on the host.

    Raises:
      ValueError: on bad data, configuration or ``chunk_users``.
      FitError: if the iterates become non-finite.
    """
    config, U0 = _check(data, config, chunk_users, truth, U0)
    if mesh is not None:
        sharding.check_mesh(mesh)
    kind = RaggedStream if isinstance(data, RaggedData) else Stream
    if not isinstance(resident, bool):
        raise ValueError(f"resident must be a bool; got {resident!r}")
    stream = kind(data, int(chunk_users), mesh, resident)
    key = check_key(key, default=jax.random.key(0))
    scale = _label_scale(stream)
    state = _HostState(stream, config.rank, config.sparsity)
    state.U = _initial_U(stream, config, key, U0, scale)
    tol, cg_tol = config.tolerances(stream.dtype)

    def step(i, state):
        """:func:`lrs.amht`'s iteration ``i``, each data pass streamed."""
        i = int(i)
        U_old, cg_iters = state.U, 0
        if i > 0:
            state.U, cg_iters = _shared_step(stream, state, scale, config, cg_tol)
        steps = config.inner_steps + (3 if i == 0 else 0)
        _per_user_step(stream, state, scale, config, steps, cold=i == 0)
        info = _info(stream, state, U_old, i, cg_iters, scale, truth)
        state.u_change = np.inf if i == 0 else info.u_change
        state.half += 2
        return state, info

    def report(i, info):
        callback(int(i), jax.tree.map(lambda a: np.asarray(a).item(), info))

    nan, zero = np.asarray(np.nan, stream.dtype), np.int32(0)
    shape = amht.AMHTInfo(nan, nan, zero, nan, nan, zero)
    rule = loop.StopRule(config.num_iters, tol, config.stall_iters)
    report = report if callback is not None else None
    state, history, last = loop.iterate(
        step, state, shape, rule, host=True, report=report
    )
    diagnostics = jax.tree.map(lambda h: np.asarray(h)[: int(last) + 1], history)
    params = state.params(scale, stream.d)
    raise_if_nonfinite(params, diagnostics.loss)
    return params, diagnostics


class _HostState:
    """Per-user state of the streamed fit, in host memory (``O(t (r + k + m))``)."""

    def __init__(self, stream: Stream, r: int, k: int):
        t, dtype = stream.t, stream.dtype
        self.V = np.zeros((t, r), dtype)
        self.indices = np.zeros((t, k), np.int32)
        self.values = np.zeros((t, k), dtype)
        self.sq_residual = np.zeros((t,), dtype)
        self.y_sq = np.zeros((t,), dtype)
        self.counts = np.zeros((t,), np.int64)
        self.half = 0  # half-step counter of fresh_samples batches
        self.u_change = np.inf  # of the last shared step
        self.U = None  # (d, r) on the device
        # the predictions of each user's peruser.UserCache (the support's
        # columns are gathered again: they would cost host memory O(t m k))
        self.residual = stream.sample_buffer()
        self.low_rank = stream.sample_buffer()

    def fits(self):
        return (self.V, self.indices, self.values, self.sq_residual)

    def predictions(self):
        return (self.residual, self.low_rank)

    def score(self) -> np.ndarray:
        """As :func:`lrs.peruser.relative_residual`."""
        return peruser.score_from_sums(self.sq_residual, self.y_sq)

    def loss(self):
        return self.sq_residual.sum() / self.counts.sum()

    def finite(self) -> bool:
        return bool(np.isfinite(self.loss()))

    def params(self, scale, d: int) -> LRSParams:
        s = np.asarray(scale)
        B = SparseRows(self.indices.copy(), self.values * s, d)
        return LRSParams(self.U, self.V * s, B)


def _label_scale(stream: Stream) -> jax.Array:
    """As :func:`lrs.amht._label_scale`; also checks the data are finite."""
    y_sq, count, bad_X, bad_y = stream.total(_label_sums)
    if int(bad_X):
        raise ValueError("data.X contains NaN or inf values")
    if int(bad_y):
        raise ValueError("data.y contains NaN or inf values")
    return amht.label_scale(y_sq, count, stream.dtype)


def _initial_U(stream: Stream, config: AMHTConfig, key, U0, scale) -> jax.Array:
    """As :func:`lrs.amht.initial_U`, the moment passes streamed."""
    d, r = stream.d, config.rank
    if U0 is not None:
        return orthonormalize(jnp.asarray(U0))[0]
    if config.init == "random":
        return orthonormalize(jax.random.normal(key, (d, r), stream.dtype))[0]

    def moments(Q=None):
        return stream.total(
            lambda X, y, mask: _moment_chunk(X, y, mask, scale, Q, config)
        )

    return shared.top_moment_vectors(
        moments,
        moments,
        d,
        stream.dtype,
        r,
        key,
        eigensolver=amht.eigensolver(config, d),
        iters=config.init_iters,
        fori_loop=functools.partial(loop.fori_loop, host=True),
    )


def _per_user_step(stream, state: _HostState, scale, config, steps, cold: bool):
    """As :func:`lrs.peruser.per_user_step`: pursuit pass, then the rescue."""
    U, half, steps = state.U, state.half + 1, jnp.asarray(steps, jnp.int32)
    targets = state.fits() + state.predictions() + (state.y_sq, state.counts)
    pending = None
    for rows, (X, y, mask, *warm) in stream.chunks(*(() if cold else (state.indices,))):
        drain(pending, targets, stream)  # the previous chunk, while this computes
        support = None if cold else warm[0]
        fits, preds, y_sq, counts = _pursue_chunk(
            X, y, mask, support, U, scale, half, steps, config
        )
        pending = (rows, rows_count(rows), (*fits, *preds, y_sq, counts))
    drain(pending, targets, stream)
    n = peruser.rescue_count(stream.t, config)
    if n == 0:
        return
    worst, run = peruser.rescue_selection(state.score(), n)
    if not bool(run):
        return
    worst = np.sort(np.asarray(worst))  # streamed in index order
    starts = ("cold", "l1") if config.l1_steps > 0 else ("cold",)
    rescue = stream.narrower(min(stream.c, n))  # c <= n users
    targets = state.fits() + state.predictions()
    pending = None
    for rows, (X, y, mask, *current) in rescue.chunks(*state.fits(), users=worst):
        drain(pending, targets, rescue)
        best = peruser.UserFit(*current)
        for start in starts:  # one after the other: see _rescue_chunk
            best, preds = _rescue_chunk(X, y, mask, U, best, scale, half, config, start)
        pending = (rows, len(rows), (*best, *preds))
    drain(pending, targets, rescue)


def _shared_step(stream, state: _HostState, scale, config, cg_tol):
    """As :func:`lrs.amht._shared_update`: ``(U_new, cg_iters)``."""
    U, score = state.U, jnp.asarray(state.score())
    median = jnp.median(score)
    inlier = np.asarray(amht.inlier_users(score, median))
    change = jnp.asarray(state.u_change, score.dtype)
    tol = amht.shared_tolerance(cg_tol, median, change)
    half = state.half
    user_arrays = (inlier, state.V, state.indices, state.values)

    def normal(D):
        def part(X, y, mask, inl, V, *_):
            return _normal_chunk(X, y, mask, inl, V, D, scale, half, config)

        return stream.total(part, *user_arrays)

    AU = None
    if amht.keeps_cache(config):  # as lrs.amht._shared_update

        def rhs_part(X, y, mask, inl, V, res, low):
            return _rhs_product_chunk(X, y, mask, inl, V, res, low, scale, half, config)

        rhs, AU, M = stream.total(rhs_part, inlier, state.V, *state.predictions())
    else:

        def rhs_part(X, y, mask, inl, V, idx, val):
            return _rhs_chunk(X, y, mask, inl, V, idx, val, scale, half, config)

        rhs, M = stream.total(rhs_part, *user_arrays)
    if config.u_solver == "dense":
        U_ls, stats = shared.solve_U_dense(normal(None), rhs, config.ridge)
    else:
        U_ls, stats = shared.solve_U_cg(
            normal,
            rhs,
            U,
            M,
            config.ridge,
            config.cg_iters,
            tol,
            while_loop=functools.partial(loop.while_loop, host=True),
            applied=AU,
        )
    return orthonormalize(U_ls)[0], int(stats.cg_iters)


def _info(stream, state, U_old, i, cg_iters, scale, truth) -> amht.AMHTInfo:
    """The iteration's :class:`lrs.amht.AMHTInfo`, as Python scalars."""
    U = state.U
    nan = float("nan")
    change = nan if i == 0 else float(metrics.subspace_distance(U_old, U))
    error = distance = nan
    if truth is not None:
        num = den = 0.0
        arrays = (state.V, state.indices, state.values)
        arrays += (np.asarray(truth.V), np.asarray(truth.B.indices))
        arrays += (np.asarray(truth.B.values),)
        for rows, (Vc, ic, bc, Vs, is_, bs) in stream.chunks(*arrays, data=False):
            inv = 1 / scale
            a, b = _error_chunk(U, Vc, ic, bc, truth.U, Vs * inv, is_, bs * inv)
            num, den = num + float(a), den + float(b)
        error = float(np.sqrt(num) / np.sqrt(den))
        distance = float(metrics.subspace_distance(U, jnp.asarray(truth.U)))
    loss = float(state.loss() * np.asarray(scale) ** 2)
    return amht.AMHTInfo(loss, change, cg_iters, error, distance)


def _check(data, config, chunk_users, truth, U0):
    """Host-side checks that read no data values; returns ``(config, U0)``."""
    if not isinstance(config, AMHTConfig):
        raise ValueError(
            f"config must be an lrs.AMHTConfig; got {type(config).__name__}"
        )
    check_integer("chunk_users", chunk_users, 1)
    if isinstance(data, RaggedData):
        check_ragged(data, config)
        t, d = data.num_users, data.dim
    else:
        check_data(data, config, values=False, convert=False)
        t, _, d = data.X.shape
    if U0 is not None:
        U0 = check_init(U0, d, config.rank, float_dtype(data.X.dtype))
    if truth is not None:
        check_truth(truth, t, d)
    return config, U0
