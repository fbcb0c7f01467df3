"""What a private fit returns: the released values, the privacy record and,
only on request, the exact (non-private) diagnostics."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from lrs.diagnostics import Diagnostics, fixed_length
from lrs.errors import FitError
from lrs.private import accounting
from lrs.private.config import DPConfig


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


class Transcript(NamedTuple):
    """Every value the fit released, in order (``fit(..., transcript=True)``).

    All of it is covered by the privacy record: an attacker may see it whole
    (``lrs audit`` scores it).
    """

    U: np.ndarray  # (T + 1, d, r): U_0 and the U of each shared step
    moment: np.ndarray | None  # (d, d) noisy clipped moment sum (private init)
    G: np.ndarray  # (T, d, r) noisy clipped sum of G_i per step
    H: np.ndarray  # (T, r, r) noisy clipped sum of H_i per step
    clip_moment: float | None
    clip_gradient: np.ndarray  # (T,)
    clip_gram: np.ndarray  # (T,)


class NonPrivateDiagnostics(NamedTuple):
    """Exact sums over all users' raw data: NOT differentially private.

    Returned only with ``fit(..., nonprivate_diagnostics=True)``, for
    experiments on data nobody needs to protect. Entry 0: initialization.
    """

    loss: np.ndarray  # (T + 1,) mean squared training residual
    relative_error: np.ndarray  # (T + 1,) against ``truth`` (NaN without)
    clipped_fraction: np.ndarray  # (T + 1,) users scaled down by clipping


# A private fit returns the fits' one diagnostics type: ``u_change`` and
# ``subspace_distance`` are computed from the released U's only
# (post-processing); ``excluded`` is per user and belongs to that user alone,
# like its ``v_i`` and ``b_i``; ``loss`` and ``relative_error`` are NaN
# (raw-data values are not released: with ``nonprivate_diagnostics=True``,
# ``nonprivate`` holds them). The name is kept for existing code.
PrivateDiagnostics = Diagnostics


#: History keys that are released or post-processing of released values.
RELEASED = ("u_change", "subspace_distance", "clip_gradient", "clip_gram")
#: History keys computed from raw data (callback key: ``'nonprivate_' + name``).
EXACT = NonPrivateDiagnostics._fields


def finish(
    params,
    history: dict,
    released: dict,
    excluded,
    prepared,
    dp_config: DPConfig,
    t: int,
    *,
    callback: Callable[[int, dict], None] | None,
    transcript: bool,
    nonprivate_diagnostics: bool,
):
    """``(params, Diagnostics)`` of a finished fit; runs ``callback``.

    ``history``: per-iteration arrays (``RELEASED`` and ``EXACT`` keys);
    ``released``: ``U (T+1, d, r)``, ``G``, ``H``, ``moment``, ``clip_moment``.

    Raises:
      FitError: if the released U is not finite (a bug: clipping and the
        float64 noise keep every release finite for any input).
    """
    config, plan, z = prepared.config, prepared.plan, prepared.z
    history = {k: np.asarray(v) for k, v in history.items()}
    if not np.all(np.isfinite(np.asarray(params.U))):
        raise FitError("private fit: the released U became non-finite")
    no_clip = dp_config.non_private
    if no_clip:
        spent, name = math.inf, "none (non-private debugging mode)"
    else:
        name = dp_config.resolved_accountant
        spent = accounting.epsilon_spent(plan, z, dp_config.delta, name)
    clip_moment = released["clip_moment"]
    clip_moment = None if no_clip or not prepared.private_init else float(clip_moment)
    steps = config.num_iters
    record = PrivacyRecord(
        non_private=no_clip,
        epsilon=spent,
        epsilon_target=dp_config.epsilon,
        delta=dp_config.delta,
        noise_multiplier=z,
        histogram_noise_multiplier=z * dp_config.histogram_noise_ratio,
        compositions=0 if no_clip else plan.compositions,
        steps=steps,
        accountant=name,
        neighbouring_relation="replace one user's entire data set",
        sampling_rate=dp_config.sampling_rate,
        batch_size=prepared.batch,
        clip_quantile=None if no_clip else dp_config.clip_quantile,
        clip_moment=clip_moment,
        clip_gradient=()
        if no_clip
        else tuple(map(float, history["clip_gradient"][1:])),
        clip_gram=() if no_clip else tuple(map(float, history["clip_gram"][1:])),
    )
    record_transcript = None
    if transcript:
        moment = released.get("moment")
        record_transcript = Transcript(
            U=np.asarray(released["U"]),
            moment=None if moment is None else np.asarray(moment),
            G=np.asarray(released["G"]),
            H=np.asarray(released["H"]),
            clip_moment=clip_moment,
            clip_gradient=history["clip_gradient"][1:],
            clip_gram=history["clip_gram"][1:],
        )
    exact = None
    if nonprivate_diagnostics:
        exact = NonPrivateDiagnostics(*(history[k] for k in EXACT))
    diagnostics = fixed_length(
        steps + 1,
        u_change=history["u_change"],
        subspace_distance=history["subspace_distance"],
        excluded=np.asarray(excluded, bool),
        privacy=record,
        transcript=record_transcript,
        nonprivate=exact,
    )
    if callback is not None:
        for i in range(steps + 1):
            info = {k: float(history[k][i]) for k in RELEASED}
            if nonprivate_diagnostics:
                info.update({f"nonprivate_{k}": float(history[k][i]) for k in EXACT})
            callback(i, info)
    return params, diagnostics
