"""lrs: low-rank plus sparse model personalization in JAX."""

from lrs import baselines, datasets, metrics, synthetic, theory
from lrs.amht import AMHTInfo, AMHTState, fit, init, personalize, step
from lrs.config import AMHTConfig
from lrs.data import UserData
from lrs.errors import FitError
from lrs.params import LRSParams, SparseRows, predict, weights
from lrs.streaming import fit as fit_streamed

__version__ = "0.1.0"

__all__ = [
    "AMHTConfig",
    "AMHTInfo",
    "AMHTState",
    "FitError",
    "LRSParams",
    "SparseRows",
    "UserData",
    "baselines",
    "datasets",
    "fit",
    "fit_streamed",
    "init",
    "metrics",
    "personalize",
    "predict",
    "step",
    "synthetic",
    "theory",
    "weights",
]
