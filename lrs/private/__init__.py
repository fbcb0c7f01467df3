"""Private AMHT-LRS: user-level (epsilon, delta) differential privacy of U.

See docs/privacy.md for the model, the mechanism, its proof and the key tree.
"""

from lrs.private.accounting import Plan, calibrate, epsilon_spent
from lrs.private.algorithm import fit, noise_multiplier, plan_for
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
    "NonPrivateDiagnostics",
    "Plan",
    "PrivacyRecord",
    "PrivateDiagnostics",
    "Transcript",
    "calibrate",
    "epsilon_spent",
    "fit",
    "fit_streamed",
    "noise_multiplier",
    "plan_for",
]
