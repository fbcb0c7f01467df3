"""Private AMHT-LRS: user-level (epsilon, delta) differential privacy of U.

See docs/privacy.md for the model, the mechanism, its proof and the key tree.
"""

from lrs.private.accounting import Plan, calibrate, epsilon_spent
from lrs.private.algorithm import (
    Mechanism,
    PrivateState,
    StepRelease,
    fit,
    init,
    noise_multiplier,
    plan_for,
    step,
)
from lrs.private.config import DPConfig
from lrs.private.result import (
    NonPrivateDiagnostics,
    PrivacyRecord,
    PrivateDiagnostics,
    Transcript,
)
from lrs.private.streaming import fit_streamed

__all__ = [
    "DPConfig",
    "Mechanism",
    "NonPrivateDiagnostics",
    "Plan",
    "PrivacyRecord",
    "PrivateDiagnostics",
    "PrivateState",
    "StepRelease",
    "Transcript",
    "calibrate",
    "epsilon_spent",
    "fit",
    "fit_streamed",
    "init",
    "noise_multiplier",
    "plan_for",
    "step",
]
