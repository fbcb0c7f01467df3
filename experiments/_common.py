"""Shared plumbing of the issue-4 experiment scripts (arguments, output, methods;
plots in the studies' one style: ``figure``, ``save`` and ``plotting`` from
:mod:`lrs.studies.plotting`).

Import this before jax: it applies the XLA-on-CPU deadlock work-around.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

from lrs._xla import CompileTimes, avoid_cpu_deadlock, use_compilation_cache

DEADLOCK_FLAG_SET = avoid_cpu_deadlock()
COMPILATION_CACHE = use_compilation_cache()  # LRS_NO_COMPILATION_CACHE=1: off

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import lrs  # noqa: E402
from lrs import baselines  # noqa: E402
from lrs.studies import plotting  # noqa: E402, F401
from lrs.studies.plotting import figure, save  # noqa: E402, F401

METHODS = (
    "amht",
    "low_rank_only",
    "sparse_only",
    "local_ridge",
    "global_model",
    "convex",
    "oracle",
)


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """``--quick``, ``--out``, ``--seed``, ``--x64`` for every script."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--out", default=default_out, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="first random seed")
    p.add_argument("--x64", action="store_true", help="float64 (default float32)")
    p.add_argument(
        "--cheap-compiles",
        action="store_true",
        help="skip most XLA optimizations: much faster compiles of the many small "
        "programs, slower runs; results change only in the last digits",
    )
    return p


def setup(args) -> float:
    """Applies ``--x64``, creates ``--out``; returns the start time."""
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    if getattr(args, "cheap_compiles", False):
        jax.config.update("jax_disable_most_optimizations", True)
    os.makedirs(args.out, exist_ok=True)
    CompileTimes.start()
    return time.perf_counter()


def environment(args, start: float) -> dict:
    """Arguments, versions, machine, wall time and the share of it spent
    compiling (``compile``: JAX's trace + lower + compile events), for the
    JSON record."""
    seconds = time.perf_counter() - start
    compile_record = CompileTimes.start().record()
    compile_record["share_of_wall_time"] = round(compile_record["total_s"] / seconds, 3)
    print(
        f"compilation: {compile_record['total_s']:.1f} s of {seconds:.1f} s wall "
        f"({100 * compile_record['share_of_wall_time']:.0f}%; "
        f"{compile_record['persistent_cache_hits']} programs from the disk cache)"
    )
    return dict(
        args=vars(args),
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        seconds=round(seconds, 2),
        compile=compile_record,
        jax=jax.__version__,
        lrs=lrs.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        device=str(jax.devices()[0]),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        deadlock_flag=DEADLOCK_FLAG_SET,
        x64=bool(jax.config.values["jax_enable_x64"]),
        compilation_cache=COMPILATION_CACHE,
    )


def save_json(out: str, name: str, record: dict) -> str:
    path = os.path.join(out, name)
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=_plain)
    return path


def _plain(value):
    if isinstance(value, np.generic | np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def progress(iterable, desc: str, **kwargs):
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, **kwargs)


def split_samples(data: lrs.UserData, m_train: int, m: int | None = None):
    """Train on the first ``m`` of the first ``m_train`` samples (mask only, so
    every ``m`` shares one compiled program); test on the rest."""
    m = m_train if m is None else m
    train = lrs.UserData(
        data.X[:, :m_train], data.y[:, :m_train], data.mask[:, :m_train]
    )
    train = train._replace(mask=train.mask & (jnp.arange(m_train) < m))
    test = lrs.UserData(
        data.X[:, m_train:], data.y[:, m_train:], data.mask[:, m_train:]
    )
    return train, test


def mse(params: lrs.LRSParams, data: lrs.UserData) -> float:
    """Mean squared prediction error over the real samples of ``data``."""
    return float(lrs.metrics.mean_squared_error(params, data))


def fitters(r: int, k: int, *, U=None, convex_steps: int = 200, grid=None):
    """``{name: fit(data, key) -> params}`` for AMHT-LRS and every baseline.

    ``sparse_only`` gets the same per-user budget as AMHT-LRS (``r + k``
    nonzeros); the oracle is included when the true ``U`` is given.
    """
    amht = lrs.AMHTConfig(rank=r, sparsity=k)
    extra = {} if grid is None else dict(convex_grid=tuple(grid))
    cfg = baselines.BaselineConfig(
        rank=r, sparsity=k, convex_steps=convex_steps, **extra
    )
    budget = baselines.BaselineConfig(rank=r, sparsity=r + k)
    out = {
        "amht": lambda data, key: lrs.fit(data, amht, key=key)[0],
        "low_rank_only": lambda data, key: baselines.low_rank_only(data, cfg, key=key)[
            0
        ],
        "sparse_only": lambda data, key: baselines.sparse_only(data, budget, key=key)[
            0
        ],
        "local_ridge": lambda data, key: baselines.local_ridge(data, cfg, key=key)[0],
        "global_model": lambda data, key: baselines.global_model(data, cfg, key=key)[0],
        "convex": lambda data, key: baselines.convex(data, cfg, key=key)[0],
    }
    if U is not None:
        oracle = functools.partial(baselines.oracle, U=U)
        out["oracle"] = lambda data, key: oracle(data, amht, key=key)[0]
    return out


def safe(fit, data, key):
    """``fit(data, key)``, or None when it raises lrs.FitError (reported, not fatal)."""
    try:
        return fit(data, key)
    except lrs.FitError as error:
        print(f"  FitError: {error}", file=sys.stderr)
        return None


def mse_zero(data: lrs.UserData) -> float:
    """Mean squared target over the real samples: the error of predicting 0."""
    y = jnp.where(data.mask, data.y, 0)
    return float(jnp.sum(y * y) / jnp.sum(data.mask))
