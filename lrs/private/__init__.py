"""Private AMHT-LRS: user-level (epsilon, delta) differential privacy of U.

See docs/privacy.md for the model, the mechanism and its proof.
"""

from lrs.private.accounting import Plan, calibrate, epsilon_spent
from lrs.private.algorithm import (
    PrivacyRecord,
    PrivateDiagnostics,
    fit,
    noise_multiplier,
    plan_for,
)
from lrs.private.config import DPConfig
from lrs.private.streaming import fit_streamed

__all__ = [
    "DPConfig",
    "Plan",
    "PrivacyRecord",
    "PrivateDiagnostics",
    "calibrate",
    "epsilon_spent",
    "fit",
    "fit_streamed",
    "noise_multiplier",
    "plan_for",
]
