"""The audited programs and their attackers' scores (see :mod:`lrs.audit.run`).

A scorer holds a jitted ``scores(keys (n,), *args) -> (n, len(observers))``
and the arguments for D (``args_out``) and D' (``args_in``): ``n``
independent runs of the mechanism, one per key, each reduced to one float64
score per attacker (``observers``), higher when the canary is in. Several
attackers of one level score the same runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lrs import peruser, private
from lrs.audit import transcript
from lrs.audit.canary import AuditProblem, Neighbours
from lrs.config import AMHTConfig
from lrs.private import accounting
from lrs.private import algorithm as private_algorithm
from lrs.private import mechanism as mech
from lrs.private.config import DPConfig
from lrs.private.statistics import usable_users

#: The attackers of each level, in the order of the score columns.
STEP_OBSERVERS = ("final",)
FIT_OBSERVERS = ("final", "transcript")


class Scorer(NamedTuple):
    """``scores(keys, *args_out)`` on D and ``scores(keys, *args_in)`` on D'."""

    claim: float
    z: float
    sensitivity: float
    scores: object  # jitted (keys (n,), *args) -> (n, len(observers)) scores
    args_out: tuple
    args_in: tuple
    observers: tuple[str, ...]


def _amht_config(problem: AuditProblem, num_iters: int) -> AMHTConfig:
    return AMHTConfig(rank=problem.r, sparsity=problem.k, num_iters=num_iters, tol=0.0)


def _faulty(noise, fault):
    if fault == "half_noise":
        return noise._replace(z=noise.z / 2, z_histogram=noise.z_histogram / 2)
    return noise


# ------------------------------------------------------------ one step


def _step_draws(key, d: int, r: int, dtype) -> mech.NoiseDraws:
    """One step's noise, drawn as the fit draws it (float64, then cast)."""
    draws = mech.draw_noise(
        key, steps=1, d=d, r=r, num_users=1, quantile=0.5, z_histogram=0.0
    )
    return jax.tree.map(lambda a: a if a.dtype == jnp.int32 else a.astype(dtype), draws)


def _mechanism(amht: AMHTConfig, users: int, skip_clip: bool) -> private.Mechanism:
    """One shared step over all ``users`` (no subsampling), clipped unless
    ``skip_clip`` (the 'no_clipping' fault), from a public U."""
    return private.Mechanism(amht, users, skip_clip, False)


@functools.partial(jax.jit, static_argnames=("amht", "users", "skip_clip"))
def _step_release(data, U, fit, key, noise, *, amht, users, skip_clip):
    """The audited release: noisy clipped ``(G, H)`` of one shared step, by
    the public :func:`lrs.private.step` from a state at ``U``."""
    d, r = U.shape
    _, eligible = usable_users(data, amht.rank + amht.sparsity)
    zero = jnp.zeros((), jnp.int32)
    draws = _step_draws(key, d, r, U.dtype)
    state = private.PrivateState(zero, U, fit, eligible, noise, draws, key)
    _, release = private.step(state, data, _mechanism(amht, users, skip_clip))
    return release.G, release.H


@functools.partial(jax.jit, static_argnames=("amht", "users", "skip_clip"))
def _step_scores(keys, data, U, fit, noise, reference, *, amht, users, skip_clip):
    """Likelihood-ratio scores ``<(G, H) - (G0, H0), (dG, dH)>`` in clip units."""
    G0, H0, dG, dH, clips = reference

    def score(key):
        static = dict(amht=amht, users=users, skip_clip=skip_clip)
        G, H = _step_release(data, U, fit, key, noise, **static)
        G, H = G.astype(jnp.float64), H.astype(jnp.float64)
        return jnp.sum((G - G0) / clips[0] * dG) + jnp.sum((H - H0) / clips[1] * dH)

    return jax.vmap(score)(keys)[:, None]


@functools.partial(jax.jit, static_argnames=("amht", "users", "skip_clip"))
def _step_setup(data_out, data_in, U, z, *, amht, users, skip_clip):
    """The local fits at U, the clip levels (the base users' median norms,
    fixed in advance), the noise levels and the noiseless releases' difference
    ``(dG, dH)`` in clip units. One program, D and D' side by side (vmap): a
    few compilations, not many."""
    static = dict(amht=amht, users=users, skip_clip=skip_clip)
    both = jax.tree.map(lambda a, b: jnp.stack([a, b]), data_out, data_in)
    fits = jax.vmap(lambda data: peruser.per_user_step(data, U, None, amht))(both)
    fit_out = jax.tree.map(lambda a: a[0], fits)
    norms = private_algorithm.step_norms(data_out, U, fit_out, None)
    clips = jnp.median(norms[: users - 1], axis=0)
    dtype = U.dtype
    noise = private_algorithm.NoiseLevels(
        z.astype(dtype),
        jnp.asarray(0.0, jnp.float32),
        jnp.asarray(jnp.nan, dtype),
        clips,
    )
    silent = noise._replace(z=jnp.zeros_like(noise.z))
    release = functools.partial(
        _step_release, U=U, key=jax.random.key(0), noise=silent, **static
    )
    G, H = jax.vmap(lambda data, fit: release(data, fit=fit))(both, fits)
    G0, H0, G1, H1, clips64 = (
        a.astype(jnp.float64) for a in (G[0], H[0], G[1], H[1], clips)
    )
    dG, dH = (G1 - G0) / clips64[0], (H1 - H0) / clips64[1]
    sensitivity = jnp.sqrt(jnp.sum(dG**2) + jnp.sum(dH**2))
    fit_in = jax.tree.map(lambda a: a[1], fits)
    return fit_out, fit_in, noise, (G0, H0, dG, dH, clips64), sensitivity


def step_scorer(
    problem: AuditProblem,
    neighbours: Neighbours,
    config,
    observers: tuple[str, ...] = STEP_OBSERVERS,
) -> Scorer:
    """One release of (G, H) at U = U*, fixed clips, calibrated to epsilon
    (one attacker, ``'final'``: the release itself)."""
    amht = dataclasses.replace(_amht_config(problem, 1), rescue_fraction=0.0)
    U = neighbours.truth_U
    plan = accounting.Plan(
        steps=1, private_init=False, moment_histogram=False, step_histogram=False
    )
    z = accounting.calibrate(plan, config.epsilon, config.delta, "pld")
    claim = accounting.epsilon_spent(plan, z, config.delta, "pld")
    skip_clip = config.fault == "no_clipping"
    static = dict(amht=amht, users=problem.t + 1, skip_clip=skip_clip)
    fit_out, fit_in, noise, reference, sensitivity = _step_setup(
        neighbours.data_out,
        neighbours.data_in,
        U,
        jnp.asarray(z, jnp.float64),
        **static,
    )
    loud = _faulty(noise, config.fault)
    scores = functools.partial(_step_scores, **static)
    return Scorer(
        claim,
        z,
        float(sensitivity),
        scores,
        (neighbours.data_out, U, fit_out, loud, reference),
        (neighbours.data_in, U, fit_in, loud, reference),
        STEP_OBSERVERS,
    )


# ------------------------------------------------------------ the whole fit


def _final_score(U, geometry):
    """``'crafted'``/``'overflow'``: ``anchor^T U U^T w``, the tilt of U* e_1
    toward w. ``'ordinary'``: ``|U^T a_in|^2 - |U^T a_out|^2``, how much more
    of the D'-user's moment vector than of the D-user's the released U
    captures."""
    crafted, anchor, direction, a_out, a_in = geometry
    U = U.astype(jnp.float64)
    tilt = anchor @ U @ (U.T @ direction)
    a_out, a_in = (jnp.where(jnp.isfinite(a), a, 0) for a in (a_out, a_in))
    captured = jnp.sum((U.T @ a_in) ** 2) - jnp.sum((U.T @ a_out) ** 2)
    return jnp.where(crafted, tilt, captured)


@functools.partial(jax.jit, static_argnames=("prepared", "observers"))
def _fit_scores(keys, data, noise, geometry, replay, *, prepared, observers):
    """Scores of whole private fits, one column per attacker in ``observers``:
    ``'final'`` reads the final U, ``'transcript'`` every release
    (:mod:`lrs.audit.transcript`; only then is the replay compiled and run)."""
    prepared = prepared._replace(noise=noise)

    def score(key):
        params, _, history, released = private_algorithm.run_prepared(
            data, prepared, key
        )
        columns = []
        for observe in observers:
            if observe == "final":
                columns.append(_final_score(params.U, geometry))
            else:
                columns.append(
                    transcript.transcript_score(
                        replay,
                        released,
                        history["clip_gradient"][1:],
                        history["clip_gram"][1:],
                        prepared.config,
                        non_private=prepared.non_private,
                    )
                )
        return jnp.stack(columns)

    return jax.vmap(score)(keys)


def fit_scorer(
    problem: AuditProblem,
    neighbours: Neighbours,
    config,
    observers: tuple[str, ...] = FIT_OBSERVERS,
) -> Scorer:
    """The whole private fit, calibrated to epsilon, scored by ``observers``."""
    amht = _amht_config(problem, config.num_iters)
    dp = DPConfig(epsilon=config.epsilon, delta=config.delta)
    prepared, data_out = private_algorithm.prepare(neighbours.data_out, amht, dp)
    _, data_in = private_algorithm.prepare(neighbours.data_in, amht, dp)
    noise = _faulty(prepared.noise, config.fault)
    if config.fault == "no_clipping":
        prepared = prepared._replace(non_private=True)
    claim = accounting.epsilon_spent(prepared.plan, prepared.z, config.delta, "pld")
    geometry = (
        jnp.asarray(problem.canary != "ordinary"),
        *(
            a.astype(jnp.float64)
            for a in (
                neighbours.anchor,
                neighbours.direction,
                neighbours.moment_out,
                neighbours.moment_in,
            )
        ),
    )
    replay = None
    if "transcript" in observers:
        replay = transcript.replay_data(data_out, data_in)
    # Only the hashable, epsilon-independent fields are static: one compilation.
    static = prepared._replace(noise=None, init_U=None, z=0.0, plan=None)
    scores = functools.partial(_fit_scores, prepared=static, observers=observers)
    return Scorer(
        claim,
        prepared.z,
        math.nan,
        scores,
        (data_out, noise, geometry, replay),
        (data_in, noise, geometry, replay),
        observers,
    )
