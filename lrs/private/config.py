"""DPConfig: the privacy parameters of :func:`lrs.private.fit`."""

from __future__ import annotations

import dataclasses

from lrs.validation import check_real

ACCOUNTANTS = ("auto", "pld", "rdp")


def _real(name: str, value, expected: str) -> float:
    return check_real(name, value, expected)


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """User-level (epsilon, delta) privacy of the released shared factor U.

    Attributes:
      epsilon: target epsilon (> 0) over the whole fit (initialization and
        every shared step). ``None`` only with ``non_private=True``.
      delta: target delta in (0, 1). ``None`` only with ``non_private=True``.
      noise_multiplier: z, the Gaussian noise in units of the replace-one
        sensitivity of each statistic release. ``None`` (default): calibrated
        so the fit spends exactly ``epsilon`` at ``delta``. A given value is
        checked: one that would spend more than ``epsilon`` is refused.
      histogram_noise_ratio: the noisy counts of the private clip-level
        quantiles get noise multiplier ``histogram_noise_ratio * z`` (default
        8: each of the 9 counts of a quantile costs 1/64 of a statistic
        release).
      clip_quantile: clip levels chosen privately are the noisy
        ``clip_quantile``-quantile of the users' statistic norms (default 0.5).
      clip_moment, clip_gradient, clip_gram: clip levels fixed in advance, in
        the units of the statistics (Frobenius norms of a_i a_i^T, of
        G_i = X_i^T res_i v_i^T and of H_i = m_i v_i v_i^T). ``None``
        (default): chosen privately from a noisy histogram, and accounted.
      sampling_rate: fraction of users in each shared step's batch, drawn
        without replacement (default 1: every user, every step).
      accountant: ``'pld'`` (privacy loss distributions, tighter), ``'rdp'``
        (Renyi DP, needed for ``sampling_rate < 1``) or ``'auto'`` (default:
        pld without subsampling, rdp with).
      non_private: the explicit non-private debugging mode: no clipping, no
        noise, no histograms; the record says ``non_private=True`` and epsilon
        is infinite. Use it to check that the private algorithm's skeleton
        reproduces :func:`lrs.fit`, never to release anything.
    """

    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    histogram_noise_ratio: float = 8.0
    clip_quantile: float = 0.5
    clip_moment: float | None = None
    clip_gradient: float | None = None
    clip_gram: float | None = None
    sampling_rate: float = 1.0
    accountant: str = "auto"
    non_private: bool = False

    def __post_init__(self):
        if not isinstance(self.non_private, bool):
            raise ValueError(f"non_private must be a bool; got {self.non_private!r}")
        if self.non_private:
            for name in ("epsilon", "delta", "noise_multiplier"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} must be None with non_private=True (the debugging "
                        f"mode adds no noise); got {getattr(self, name)!r}"
                    )
        else:
            if self.epsilon is None or self.delta is None:
                raise ValueError(
                    "epsilon and delta are required (or pass non_private=True for "
                    "the non-private debugging mode)"
                )
            eps = _real("epsilon", self.epsilon, "a finite number > 0")
            if eps <= 0:
                raise ValueError(f"epsilon must be a finite number > 0; got {eps!r}")
            delta = _real("delta", self.delta, "a number in (0, 1)")
            if not 0 < delta < 1:
                raise ValueError(f"delta must lie in (0, 1); got {delta!r}")
            if self.noise_multiplier is not None:
                z = _real("noise_multiplier", self.noise_multiplier, "a number > 0")
                if z <= 0:
                    raise ValueError(f"noise_multiplier must be > 0; got {z!r}")
        ratio = _real("histogram_noise_ratio", self.histogram_noise_ratio, "> 0")
        if ratio <= 0:
            raise ValueError(f"histogram_noise_ratio must be > 0; got {ratio!r}")
        q = _real("clip_quantile", self.clip_quantile, "a number in (0, 1]")
        if not 0 < q <= 1:
            raise ValueError(f"clip_quantile must lie in (0, 1]; got {q!r}")
        for name in ("clip_moment", "clip_gradient", "clip_gram"):
            value = getattr(self, name)
            if value is not None:
                clip = _real(name, value, "a finite number > 0 or None")
                if clip <= 0:
                    raise ValueError(f"{name} must be > 0 or None; got {clip!r}")
        rate = _real("sampling_rate", self.sampling_rate, "a number in (0, 1]")
        if not 0 < rate <= 1:
            raise ValueError(f"sampling_rate must lie in (0, 1]; got {rate!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(
                f"accountant must be one of {ACCOUNTANTS}; got {self.accountant!r}"
            )
        if self.accountant == "pld" and rate < 1:
            raise ValueError(
                "accountant='pld' does not account sampling without replacement "
                "under the replace-one relation; use accountant='rdp' (or 'auto') "
                f"with sampling_rate={rate}"
            )

    @property
    def resolved_accountant(self) -> str:
        """The accountant used: ``'auto'`` resolved."""
        if self.accountant != "auto":
            return self.accountant
        return "pld" if self.sampling_rate == 1 else "rdp"
