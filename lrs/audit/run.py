"""Canary audits of private AMHT-LRS at two levels.

* ``level='step'``: one noisy aggregation of a shared step alone
  (:func:`lrs.private.algorithm.noisy_step_statistics`) at a public U = U*,
  with clip levels fixed in advance and its noise calibrated so that this one
  release spends ``epsilon``. The score is the likelihood-ratio projection of
  the released (G, H) onto the difference the canary makes. It tests the noise
  calibration and the clipping: the bound should come close to ``epsilon``.
* ``level='fit'``: the whole private fit (:func:`lrs.private.fit`'s program,
  private initialization and clip levels included) calibrated to ``epsilon``
  over all its releases. The score reads the released U only: how far it tilts
  the canary's anchor U* e_1 toward the canary direction w. The bound must stay
  below ``epsilon``; how far below says how loose the accounting is for this
  attacker.

``fault`` injects a deliberate bug for self-tests of the audit: ``'half_noise'``
adds half the claimed noise, ``'no_clipping'`` skips the clipping. The claim
stays the correct mechanism's, so the audit should report a bound above it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrs import peruser
from lrs.audit.bounds import EpsilonBound, epsilon_lower_bound
from lrs.audit.canary import AuditProblem, Neighbours, neighbouring_datasets
from lrs.config import AMHTConfig
from lrs.errors import FitError
from lrs.private import accounting
from lrs.private import algorithm as private_algorithm
from lrs.private.config import DPConfig

LEVELS = ("step", "fit")
FAULTS = (None, "half_noise", "no_clipping")


def _positive_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """One audit.

    Attributes:
      level: ``'step'`` (one noisy aggregation) or ``'fit'`` (the whole fit).
      epsilon, delta: the claim audited (the mechanism is calibrated to it).
      trials: runs per data set (D and D'); half choose the test's threshold,
        half bound epsilon.
      confidence: probability that the reported lower bound holds.
      num_iters: shared steps of the audited fit (``level='fit'``).
      batch_trials: runs vectorized at once (memory / speed trade-off).
      fault: ``None`` (the real mechanism), ``'half_noise'`` or
        ``'no_clipping'`` (deliberately broken, for self-tests).
    """

    level: str = "step"
    epsilon: float = 1.0
    delta: float = 1e-5
    trials: int = 100_000
    confidence: float = 0.95
    num_iters: int = 2
    batch_trials: int = 10_000
    fault: str | None = None

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}; got {self.level!r}")
        for name in ("epsilon", "delta", "confidence"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number; got {value!r}")
        if not 0 < self.epsilon < math.inf:
            raise ValueError(
                f"epsilon must be a finite number > 0; got {self.epsilon!r}"
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must lie in (0, 1); got {self.delta!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1); got {self.confidence!r}")
        trials = _positive_int("trials", self.trials)
        if trials < 2:
            raise ValueError(
                "trials must be >= 2 (one to choose the test, one to bound); "
                f"got {trials}"
            )
        _positive_int("num_iters", self.num_iters)
        _positive_int("batch_trials", self.batch_trials)
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}; got {self.fault!r}")


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """The audited lower bound next to the claim.

    ``epsilon_claimed`` is what the accountant reports for the (correct)
    mechanism; ``bound`` holds with probability ``bound.confidence``;
    ``flagged`` is True when the bound exceeds the claim (a privacy bug, or
    the ``1 - confidence`` chance). ``sensitivity_used`` is the norm of the
    canary's effect on the release in units of the clip levels, at most 2 for
    the correct mechanism (``level='step'`` only; NaN for 'fit').
    """

    level: str
    canary: str
    fault: str | None
    epsilon_claimed: float
    delta: float
    noise_multiplier: float
    bound: EpsilonBound
    trials: int
    seconds: float
    sensitivity_used: float
    flagged: bool

    @property
    def tightness(self) -> float:
        """``bound.epsilon / epsilon_claimed``."""
        return self.bound.epsilon / self.epsilon_claimed

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["tightness"] = self.tightness
        return out


class _Scorer(NamedTuple):
    """``scores(keys, *args_out)`` on D and ``scores(keys, *args_in)`` on D'."""

    claim: float
    z: float
    sensitivity: float
    scores: object  # jitted (keys (n,), *args) -> (n,) scores
    args_out: tuple
    args_in: tuple


def _amht_config(problem: AuditProblem, num_iters: int) -> AMHTConfig:
    return AMHTConfig(rank=problem.r, sparsity=problem.k, num_iters=num_iters, tol=0.0)


def _faulty(noise, fault):
    if fault == "half_noise":
        return noise._replace(z=noise.z / 2, z_histogram=noise.z_histogram / 2)
    return noise


@functools.partial(jax.jit, static_argnames=("users", "skip_clip"))
def _step_release(data, U, fit, key, noise, *, users, skip_clip):
    """The audited release: noisy clipped ``(G, H)`` of one shared step."""
    G, H, _, _ = private_algorithm.noisy_step_statistics(
        data, U, fit, key, noise, 0.5, users, None, skip_clip
    )
    return G, H


@functools.partial(jax.jit, static_argnames=("users", "skip_clip"))
def _step_scores(keys, data, U, fit, noise, reference, *, users, skip_clip):
    """Likelihood-ratio scores ``<(G, H) - (G0, H0), (dG, dH)>`` in clip units."""
    G0, H0, dG, dH, clips = reference

    def score(key):
        G, H = _step_release(data, U, fit, key, noise, users=users, skip_clip=skip_clip)
        return jnp.sum((G - G0) / clips[0] * dG) + jnp.sum((H - H0) / clips[1] * dH)

    return jax.vmap(score)(keys)


def _step_scorer(problem, neighbours: Neighbours, config: AuditConfig) -> _Scorer:
    """One release of (G, H) at U = U*, fixed clips, calibrated to epsilon."""
    amht = dataclasses.replace(_amht_config(problem, 1), rescue_fraction=0.0)
    U = neighbours.truth_U
    plan = accounting.Plan(
        steps=1, private_init=False, moment_histogram=False, step_histogram=False
    )
    z = accounting.calibrate(plan, config.epsilon, config.delta, "pld")
    claim = accounting.epsilon_spent(plan, z, config.delta, "pld")
    local_step = jax.jit(peruser.per_user_step, static_argnums=(3,))
    fit_out = local_step(neighbours.data_out, U, None, amht)
    fit_in = local_step(neighbours.data_in, U, None, amht)
    # Clip levels fixed in advance: the median norms of the base users'.
    norms = private_algorithm.step_norms(neighbours.data_out, U, fit_out, None)
    clips = jnp.median(norms[: problem.t], axis=0)
    dtype = U.dtype
    noise = private_algorithm.NoiseLevels(
        jnp.asarray(z, dtype),
        jnp.asarray(0.0, jnp.float32),
        jnp.asarray(jnp.nan, dtype),
        clips,
    )
    static = dict(users=problem.t + 1, skip_clip=config.fault == "no_clipping")
    silent = noise._replace(z=jnp.zeros_like(noise.z))
    key0 = jax.random.key(0)
    G0, H0 = _step_release(neighbours.data_out, U, fit_out, key0, silent, **static)
    G1, H1 = _step_release(neighbours.data_in, U, fit_in, key0, silent, **static)
    dG, dH = (G1 - G0) / clips[0], (H1 - H0) / clips[1]
    sensitivity = float(jnp.sqrt(jnp.sum(dG**2) + jnp.sum(dH**2)))
    reference = (G0, H0, dG, dH, clips)
    loud = _faulty(noise, config.fault)
    scores = functools.partial(_step_scores, **static)
    return _Scorer(
        claim,
        z,
        sensitivity,
        scores,
        (neighbours.data_out, U, fit_out, loud, reference),
        (neighbours.data_in, U, fit_in, loud, reference),
    )


@functools.partial(jax.jit, static_argnames=("prepared",))
def _fit_scores(keys, data, noise, geometry, *, prepared):
    """Scores of whole private fits, read from the released U only.

    ``'crafted'``: ``anchor^T U U^T w``, the tilt of U* e_1 toward w.
    ``'ordinary'``: ``|U^T a_in|^2 - |U^T a_out|^2``, how much more of the
    D'-user's moment vector than of the D-user's the released U captures.
    """
    crafted, anchor, direction, a_out, a_in = geometry
    prepared = prepared._replace(noise=noise)

    def score(key):
        U = private_algorithm.run_prepared(data, prepared, key)[0].U
        tilt = anchor @ U @ (U.T @ direction)
        captured = jnp.sum((U.T @ a_in) ** 2) - jnp.sum((U.T @ a_out) ** 2)
        return jnp.where(crafted, tilt, captured)

    return jax.vmap(score)(keys)


def _fit_scorer(problem, neighbours: Neighbours, config: AuditConfig) -> _Scorer:
    """The whole private fit, calibrated to epsilon; the score reads U only."""
    amht = _amht_config(problem, config.num_iters)
    dp = DPConfig(epsilon=config.epsilon, delta=config.delta)
    prepared, data_out = private_algorithm.prepare(neighbours.data_out, amht, dp)
    _, data_in = private_algorithm.prepare(neighbours.data_in, amht, dp)
    noise = _faulty(prepared.noise, config.fault)
    if config.fault == "no_clipping":
        prepared = prepared._replace(non_private=True)
    claim = accounting.epsilon_spent(prepared.plan, prepared.z, config.delta, "pld")
    geometry = (
        jnp.asarray(problem.canary == "crafted"),
        neighbours.anchor,
        neighbours.direction,
        neighbours.moment_out,
        neighbours.moment_in,
    )
    # Only the hashable, epsilon-independent fields are static: one compilation.
    static = prepared._replace(noise=None, init_U=None, z=0.0, plan=None)
    scores = functools.partial(_fit_scores, prepared=static)
    return _Scorer(
        claim,
        prepared.z,
        math.nan,
        scores,
        (data_out, noise, geometry),
        (data_in, noise, geometry),
    )


def _run_trials(scores, args, key, trials: int, batch: int, progress) -> np.ndarray:
    """``(trials,)`` scores of independent runs, ``batch`` runs per call."""
    out = []
    keys = jax.random.split(key, math.ceil(trials / batch) * batch)
    for start in range(0, trials, batch):
        out.append(np.asarray(scores(keys[start : start + batch], *args)))
        if progress is not None:
            progress.update(min(batch, trials - start))
    return np.concatenate(out)[:trials]


def audit(
    config: AuditConfig,
    problem: AuditProblem | None = None,
    *,
    key=None,
    progress: bool = False,
) -> AuditResult:
    """Runs the canary audit ``config`` on ``problem`` (default AuditProblem()).

    Args:
      config: an :class:`AuditConfig`.
      problem: an :class:`AuditProblem` (the data around the canary).
      key: ``jax.random`` key of the data and of every run (default key(0)).
      progress: show a progress bar over the 2 x ``trials`` runs.

    Returns:
      An :class:`AuditResult`.
    """
    if not isinstance(config, AuditConfig):
        raise ValueError(f"config must be an AuditConfig; got {type(config).__name__}")
    problem = AuditProblem() if problem is None else problem
    if not isinstance(problem, AuditProblem):
        raise ValueError(
            f"problem must be an AuditProblem; got {type(problem).__name__}"
        )
    key = jax.random.key(0) if key is None else key
    k_data, k_out, k_in = jax.random.split(key, 3)
    start = time.perf_counter()
    neighbours = neighbouring_datasets(problem, k_data)
    make = _step_scorer if config.level == "step" else _fit_scorer
    scorer = make(problem, neighbours, config)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * config.trials, desc=f"audit {config.level}", unit="run")
    try:
        batch = min(config.batch_trials, config.trials)
        run = functools.partial(
            _run_trials, scorer.scores, trials=config.trials, batch=batch, progress=bar
        )
        scores_out = run(scorer.args_out, k_out)
        scores_in = run(scorer.args_in, k_in)
    finally:
        if bar is not None:
            bar.close()
    bad = int(np.sum(~np.isfinite(scores_out)) + np.sum(~np.isfinite(scores_in)))
    if bad:
        raise FitError(
            f"audit: {bad} of {2 * config.trials} runs gave a non-finite score"
        )
    bound = epsilon_lower_bound(
        scores_in, scores_out, config.delta, confidence=config.confidence
    )
    return AuditResult(
        level=config.level,
        canary=problem.canary,
        fault=config.fault,
        epsilon_claimed=scorer.claim,
        delta=config.delta,
        noise_multiplier=scorer.z,
        bound=bound,
        trials=config.trials,
        seconds=time.perf_counter() - start,
        sensitivity_used=scorer.sensitivity,
        flagged=bound.epsilon > scorer.claim,
    )
