"""XLA-on-CPU configuration that must happen before JAX is imported.

XLA's multi-threaded Eigen pool on CPU can deadlock on vmap-heavy programs
(jax-ml/jax#24219): a jitted fit hangs forever at 0% CPU. Setting
``--xla_cpu_multi_thread_eigen=false`` avoids it. The CLI, the benchmark
scripts and the test suite call :func:`avoid_cpu_deadlock` before importing
JAX; library users who hit a hang can do the same (or set ``XLA_FLAGS``).
"""

import os
import sys

DEADLOCK_FLAG = "--xla_cpu_multi_thread_eigen=false"


def avoid_cpu_deadlock() -> bool:
    """Adds the deadlock work-around to ``XLA_FLAGS`` unless the user opted out.

    Returns True when the flag is in effect for the JAX about to be imported.
    Set ``LRS_KEEP_XLA_FLAGS=1`` to leave ``XLA_FLAGS`` untouched.
    """
    if os.environ.get("LRS_KEEP_XLA_FLAGS") == "1":
        return DEADLOCK_FLAG in os.environ.get("XLA_FLAGS", "")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + DEADLOCK_FLAG).strip()
    # XLA reads XLA_FLAGS when its CPU backend starts (the first computation),
    # so importing jax earlier is fine; a backend already started ignores it.
    return DEADLOCK_FLAG in os.environ["XLA_FLAGS"] and not _backend_started()


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # private API moved: assume the worst is not known
        return False
