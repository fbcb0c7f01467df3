"""lrs: low-rank plus sparse model personalization in JAX."""

from lrs import baselines, datasets, metrics, selection, synthetic, theory
from lrs.amht import AMHTInfo, AMHTState, fit, init, personalize, step
from lrs.config import AMHTConfig
from lrs.data import RaggedData, UserData
from lrs.diagnostics import Diagnostics
from lrs.errors import FitError
from lrs.params import LRSParams, SparseRows, predict, weights
from lrs.streaming import fit as fit_streamed

__version__ = "0.1.0"

__all__ = [
    "AMHTConfig",
    "AMHTInfo",
    "AMHTState",
    "Diagnostics",
    "FitError",
    "LRSParams",
    "RaggedData",
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
    "selection",
    "step",
    "synthetic",
    "theory",
    "weights",
]


def __getattr__(name):  # lrs.nn (optax, the transformer) is imported on first use
    if name == "nn":
        import importlib

        return importlib.import_module("lrs.nn")
    raise AttributeError(f"module 'lrs' has no attribute {name!r}")
