"""Privacy audit of private AMHT-LRS: lower bounds on epsilon from canaries.

See docs/privacy.md, section "Audit".
"""

from lrs.audit.bounds import EpsilonBound, clopper_pearson, epsilon_lower_bound
from lrs.audit.canary import AuditProblem, Neighbours, neighbouring_datasets
from lrs.audit.nn_step import audit_nn_dp_step
from lrs.audit.run import AuditConfig, AuditResult, audit, audit_attackers

__all__ = [
    "AuditConfig",
    "AuditProblem",
    "AuditResult",
    "EpsilonBound",
    "Neighbours",
    "audit",
    "audit_attackers",
    "audit_nn_dp_step",
    "clopper_pearson",
    "epsilon_lower_bound",
    "neighbouring_datasets",
]
