"""Canary audits of private AMHT-LRS at two levels.

* ``level='step'``: one noisy aggregation of a shared step alone
  (:func:`lrs.private.step`) at a public U = U*,
  with clip levels fixed in advance and its noise calibrated so that this one
  release spends ``epsilon``. The score is the likelihood-ratio projection of
  the released (G, H) onto the difference the canary makes. It tests the noise
  calibration and the clipping: the bound should come close to ``epsilon``.
* ``level='fit'``: the whole private fit (:func:`lrs.private.fit`'s program,
  private initialization and clip levels included) calibrated to ``epsilon``
  over all its releases. The bound must stay below ``epsilon``; how far below
  says how loose the accounting is for the attacker, chosen by ``observe``:
  ``'final'`` reads the released U only (how far it tilts the canary's anchor
  U* e_1 toward the canary direction w); ``'transcript'`` reads every release
  (each intermediate U, the clip levels, the noisy moment and (G, H) sums) and
  sums their likelihood ratios (:mod:`lrs.audit.transcript`).

Every run draws its noise from its own key, in float64, as the fit does; the
program runs in the data's dtype (``AuditProblem.dtype``).

``fault`` injects a deliberate bug for self-tests of the audit: ``'half_noise'``
adds half the claimed noise, ``'no_clipping'`` skips the clipping,
``'key_reuse'`` runs every trial, on D and on D', with one and the same key
(what a default key such as ``key(0)`` does: identical noise in every run).
The claim stays the correct mechanism's, so the audit should report a bound
above it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from lrs.audit.bounds import EpsilonBound, epsilon_lower_bound
from lrs.audit.canary import AuditProblem, neighbouring_datasets
from lrs.audit.scorers import fit_scorer, step_scorer
from lrs.errors import FitError
from lrs.validation import check_key

LEVELS = ("step", "fit")
FAULTS = (None, "half_noise", "no_clipping", "key_reuse")
OBSERVE = ("final", "transcript")


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
      fault: ``None`` (the real mechanism), ``'half_noise'``,
        ``'no_clipping'`` or ``'key_reuse'`` (deliberately broken, for
        self-tests).
      observe: what the attacker of ``level='fit'`` sees: ``'final'`` (the
        released U) or ``'transcript'`` (every release). ``level='step'``
        makes one release: ``'final'`` only.
    """

    level: str = "step"
    epsilon: float = 1.0
    delta: float = 1e-5
    trials: int = 100_000
    confidence: float = 0.95
    num_iters: int = 2
    batch_trials: int = 10_000
    fault: str | None = None
    observe: str = "final"

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
        if self.observe not in OBSERVE:
            raise ValueError(f"observe must be one of {OBSERVE}; got {self.observe!r}")
        if self.level == "step" and self.observe != "final":
            raise ValueError(
                "observe must be 'final' at level='step' (one release, nothing "
                f"in between); got {self.observe!r}"
            )


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
    dtype: str
    observe: str
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


def _run_trials(
    scores, args, key, trials: int, batch: int, progress, reuse: bool = False
) -> np.ndarray:
    """``(trials, attackers)`` scores of independent runs, ``batch`` runs per
    call (``reuse``: every run with ``key`` itself, the key-reuse fault)."""
    out = []
    keys = jax.random.split(key, math.ceil(trials / batch) * batch)
    if reuse:
        keys = jax.random.split(key, 1)[jnp.zeros(keys.shape, jnp.int32)]
    for start in range(0, trials, batch):
        out.append(np.asarray(scores(keys[start : start + batch], *args)))
        if progress is not None:
            progress.update(min(batch, trials - start))
    return np.concatenate(out)[:trials]


def _both_sides(scorer, config: AuditConfig, key, progress: bool):
    """``(scores_in, scores_out)``, ``(trials, attackers)`` each: the runs on
    D' and on D."""
    k_out, k_in = jax.random.split(key)
    reuse = config.fault == "key_reuse"
    if reuse:  # one key for every run, on both sides
        k_in = k_out
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * config.trials, desc=f"audit {config.level}", unit="run")
    try:
        run = functools.partial(
            _run_trials,
            scorer.scores,
            trials=config.trials,
            batch=min(config.batch_trials, config.trials),
            progress=bar,
            reuse=reuse,
        )
        scores_out = run(scorer.args_out, k_out)
        scores_in = run(scorer.args_in, k_in)
    finally:
        if bar is not None:
            bar.close()
    bad = int(np.sum(~np.all(np.isfinite(scores_out), 1)))
    bad += int(np.sum(~np.all(np.isfinite(scores_in), 1)))
    if bad:
        raise FitError(
            f"audit: {bad} of {2 * config.trials} runs gave a non-finite score"
        )
    return scores_in, scores_out


def _check_arguments(config, problem) -> AuditProblem:
    if not isinstance(config, AuditConfig):
        raise ValueError(f"config must be an AuditConfig; got {type(config).__name__}")
    problem = AuditProblem() if problem is None else problem
    if not isinstance(problem, AuditProblem):
        raise ValueError(
            f"problem must be an AuditProblem; got {type(problem).__name__}"
        )
    return problem


def _audit(config, problem, key, progress, observers) -> dict[str, AuditResult]:
    """The audit of ``config`` on ``problem``, one result per attacker."""
    key = check_key(key, default=jax.random.key(0))
    k_data, k_runs = jax.random.split(key)
    start = time.perf_counter()
    with jax.enable_x64(True):
        neighbours = neighbouring_datasets(problem, k_data)
        make = step_scorer if config.level == "step" else fit_scorer
        scorer = make(problem, neighbours, config, observers)
        if config.level == "step" and not scorer.sensitivity > 1e-6:
            raise ValueError(
                "the canary makes no difference between D and D' (sensitivity "
                f"used {scorer.sensitivity:g}): the audit would test nothing; "
                f"check canary_scale={problem.canary_scale!r} against "
                f"dtype={problem.dtype!r}"
            )
        scores_in, scores_out = _both_sides(scorer, config, k_runs, progress)
    seconds = time.perf_counter() - start
    results = {}
    for column, observe in enumerate(scorer.observers):
        bound = epsilon_lower_bound(
            scores_in[:, column],
            scores_out[:, column],
            config.delta,
            confidence=config.confidence,
        )
        results[observe] = AuditResult(
            level=config.level,
            canary=problem.canary,
            dtype=problem.dtype,
            observe=observe,
            fault=config.fault,
            epsilon_claimed=scorer.claim,
            delta=config.delta,
            noise_multiplier=scorer.z,
            bound=bound,
            trials=config.trials,
            seconds=seconds,
            sensitivity_used=scorer.sensitivity,
            flagged=bound.epsilon > scorer.claim,
        )
    return results


def audit(
    config: AuditConfig,
    problem: AuditProblem | None = None,
    *,
    key=None,
    progress: bool = False,
) -> AuditResult:
    """Runs the canary audit ``config`` on ``problem`` (default AuditProblem()).

    Runs under ``jax.enable_x64(True)`` (the noise is drawn in float64 inside
    the vectorized runs); the audited program runs in ``problem.dtype``.

    Args:
      config: an :class:`AuditConfig`.
      problem: an :class:`AuditProblem` (the data around the canary).
      key: ``jax.random`` key of the data and of every run (default key(0)).
      progress: show a progress bar over the 2 x ``trials`` runs.

    Returns:
      An :class:`AuditResult` for the attacker ``config.observe``.

    Raises:
      ValueError: on a bad ``config`` or ``problem``.
      FitError: if a run gives a non-finite score (a fit broken by its data).
    """
    problem = _check_arguments(config, problem)
    return _audit(config, problem, key, progress, (config.observe,))[config.observe]


def audit_attackers(
    config: AuditConfig,
    problem: AuditProblem | None = None,
    *,
    key=None,
    progress: bool = False,
) -> dict[str, AuditResult]:
    """:func:`audit` for every attacker of ``config.level``, on the same runs.

    ``level='step'``: ``{'final': ...}``; ``level='fit'``: ``{'final': ...,
    'transcript': ...}`` (``config.observe`` is not used). Each bound holds
    with probability ``config.confidence`` on its own; ``seconds`` is the
    time of the shared runs.
    """
    problem = _check_arguments(config, problem)
    observers = OBSERVE if config.level == "fit" else ("final",)
    return _audit(config, problem, key, progress, observers)
