"""Privacy accounting of private AMHT-LRS with Google's ``dp_accounting``.

Each release is a Gaussian mechanism whose noise is ``z`` times its
replace-one L2 sensitivity (docs/privacy.md, Lemma 1). ``GaussianDpEvent(z)``
then has exactly the privacy loss of N(0, z^2) against N(1, z^2), which is what
both accountants compute for it under the add-or-remove relation; subsampled
steps are ``SampledWithoutReplacementDpEvent``s, which only the RDP accountant
handles, under the replace-one relation.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import dp_accounting
from dp_accounting import pld, rdp
from dp_accounting.mechanism_calibration import (
    ExplicitBracketInterval,
    calibrate_dp_mechanism,
)

#: Noise multipliers searched by :func:`calibrate`.
Z_MIN, Z_MAX = 1e-2, 1e6
#: Discretization of the PLD accountant at noise multipliers >= 1: epsilon is
#: exact to about 1e-3. Below 1 the privacy losses grow like 1/z^2 and the
#: interval with them, so tiny z (huge epsilon) stays fast.
PLD_INTERVAL = 1e-3


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sequence of releases of one private fit (everything but ``z``).

    Attributes:
      steps: shared steps T (each releases (G, H) and a new U).
      private_init: the initialization releases a noisy moment matrix (False
        for a public, data-independent U_0).
      moment_histogram: the initialization's clip level is chosen privately
        (a private quantile: ``quantile_queries`` noisy counts).
      step_histogram: each step's clip levels are chosen privately.
      histogram_noise_ratio: noise multiplier of the quantile's counts / z.
      quantile_queries: noisy counts per private quantile.
      num_users: t.
      batch_size: users per shared step (``t``: no subsampling).
    """

    steps: int
    private_init: bool = True
    moment_histogram: bool = True
    step_histogram: bool = True
    histogram_noise_ratio: float = 8.0
    quantile_queries: int = 9
    num_users: int = 1
    batch_size: int = 1

    @property
    def subsampled(self) -> bool:
        return self.batch_size < self.num_users

    @property
    def compositions(self) -> int:
        """Number of Gaussian releases composed."""
        q = self.quantile_queries
        init = int(self.private_init) * (1 + q * int(self.moment_histogram))
        return init + self.steps * (1 + q * int(self.step_histogram))

    def event(self, z: float) -> dp_accounting.DpEvent:
        """The ``dp_accounting`` event of the whole fit at noise multiplier z."""
        gaussian = dp_accounting.GaussianDpEvent
        histogram = dp_accounting.SelfComposedDpEvent(
            gaussian(self.histogram_noise_ratio * z), self.quantile_queries
        )
        statistic = gaussian(z)
        if self.subsampled:
            statistic = dp_accounting.SampledWithoutReplacementDpEvent(
                self.num_users, self.batch_size, statistic
            )
        init = []
        if self.private_init:
            init = [histogram, gaussian(z)] if self.moment_histogram else [gaussian(z)]
        step = [histogram] if self.step_histogram else []
        step.append(statistic)
        events = init
        if self.steps:
            events = init + [
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.ComposedDpEvent(step), self.steps
                )
            ]
        return dp_accounting.ComposedDpEvent(events)


def make_accountant(
    name: str, subsampled: bool, z: float = 1.0
) -> dp_accounting.PrivacyAccountant:
    """A fresh accountant: ``'pld'`` or ``'rdp'`` (``z`` sets PLD's resolution)."""
    if name == "pld":
        if subsampled:
            raise ValueError(
                "accountant='pld' cannot account sampling without replacement; "
                "use 'rdp'"
            )
        return pld.PLDAccountant(
            dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
            value_discretization_interval=PLD_INTERVAL * max(1.0, z**-2),
        )
    if name == "rdp":
        relation = dp_accounting.NeighboringRelation
        return rdp.RdpAccountant(
            neighboring_relation=relation.REPLACE_ONE
            if subsampled
            else relation.ADD_OR_REMOVE_ONE
        )
    raise ValueError(f"accountant must be 'pld' or 'rdp'; got {name!r}")


def epsilon_spent(plan: Plan, z: float, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of the whole fit with noise multiplier ``z``."""
    if not z > 0:
        return math.inf
    acc = make_accountant(accountant, plan.subsampled, z)
    acc.compose(plan.event(z))
    return float(acc.get_epsilon(delta))


def calibrate(plan: Plan, epsilon: float, delta: float, accountant: str) -> float:
    """The smallest noise multiplier z whose fit spends at most ``epsilon``.

    RDP first (fast at any z; an upper bound on the PLD epsilon, so its z is an
    upper bound on PLD's), then PLD bracketed below it. Cached per process:
    the same plan and target are calibrated once (a subsampled RDP
    calibration takes about 10 s on CPU; ``private.fit`` then
    ``private.init``, or a sweep over seeds, pay it once). Refusals are not
    cached and raise every time.
    """
    return _calibrate(plan, float(epsilon), float(delta), str(accountant))


@functools.lru_cache(maxsize=256)
def _calibrate(plan: Plan, epsilon: float, delta: float, accountant: str) -> float:
    def search(name: str, low: float, high: float) -> float:
        return calibrate_dp_mechanism(
            lambda: make_accountant(name, plan.subsampled, low),
            plan.event,
            epsilon,
            delta,
            ExplicitBracketInterval(low, high),
            tol=1e-4,
        )

    if epsilon_spent(plan, Z_MAX, delta, "rdp") > epsilon:
        raise ValueError(
            f"epsilon={epsilon} is out of reach at delta={delta}: even noise "
            f"multiplier {Z_MAX:g} spends more over {plan.compositions} releases"
        )
    if epsilon_spent(plan, Z_MIN, delta, "rdp") <= epsilon:
        raise ValueError(
            f"epsilon={epsilon} at delta={delta} needs a noise multiplier below "
            f"{Z_MIN:g} over {plan.compositions} releases: too large to calibrate "
            "(choose a smaller epsilon, or the non-private mode for no noise)"
        )
    try:
        z = search("rdp", Z_MIN, Z_MAX)
        if accountant == "pld":
            low = z / 2
            while epsilon_spent(plan, low, delta, "pld") <= epsilon and low > Z_MIN:
                low /= 2
            z = search("pld", max(low, Z_MIN), z * (1 + 1e-3))
    except (ValueError, OverflowError) as error:  # scipy's brentq, dp_accounting
        raise ValueError(
            f"cannot calibrate the noise to epsilon={epsilon}, delta={delta}: {error}"
        ) from error
    # Brent's answer may sit a hair below the target; step up until it is met.
    while epsilon_spent(plan, z, delta, accountant) > epsilon:
        z *= 1 + 1e-4
    return float(z)
