"""CPU runtime settings that must be made before JAX's first computation.

1. XLA's multi-threaded Eigen pool on CPU can deadlock on vmap-heavy programs
   (jax-ml/jax#24219): a jitted fit hangs forever at 0% CPU. Setting
   ``--xla_cpu_multi_thread_eigen=false`` avoids it.
2. The LAPACK kernels behind ``jnp.linalg`` on CPU run on OpenBLAS threads that
   busy-wait; on a small, shared machine a 100 x 100 eigendecomposition then
   takes 20-300 ms instead of 1.3 ms. ``OPENBLAS_NUM_THREADS=1`` avoids it.

Not covered by these settings: a second deadlock, in jaxlib's batched LAPACK
kernels (jaxlib 0.10.2, checked with gdb). A large batched QR or Cholesky
(for ``n x n`` Cholesky: ``batch * n^3 / 3 >= 200,000``) splits its batch
into tasks on XLA's intra-op pool (one thread per core) and blocks until they
are done; when one program holds two such factorizations with no dependency
between them, XLA runs them at once and, once every pool thread waits so, the
queued tasks never run (0% CPU). ``--xla_cpu_multi_thread_eigen=false`` does
not change this. ``lrs.fit`` and ``lrs.fit_streamed`` avoid it by keeping
the batched factorizations of the per-user step in one chain: the rescue's l1
candidate takes a data dependency on the cold candidate's result
(``lrs.peruser._after``; ``lax.optimization_barrier`` is removed by XLA:CPU
and does not order them), and the streamed fit runs the two candidates as
separate programs (docs/scale.md).

The CLI, the benchmark scripts and the test suite call
:func:`avoid_cpu_deadlock` first; library users who see a hang or erratic
timings can do the same (or set the variables themselves).
"""

import os
import sys

DEADLOCK_FLAG = "--xla_cpu_multi_thread_eigen=false"


def avoid_cpu_deadlock() -> bool:
    """Sets ``XLA_FLAGS`` and ``OPENBLAS_NUM_THREADS`` unless the user opted out.

    Only adds what is not already set. XLA reads ``XLA_FLAGS`` when its CPU
    backend starts (the first computation), so call this before that.

    Returns:
      True when the deadlock flag will be in effect for this process.
      Set ``LRS_KEEP_XLA_FLAGS=1`` to leave the environment untouched.
    """
    if os.environ.get("LRS_KEEP_XLA_FLAGS") != "1":
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " " + DEADLOCK_FLAG).strip()
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    in_flags = DEADLOCK_FLAG in os.environ.get("XLA_FLAGS", "")
    return in_flags and not _backend_started()


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # private API moved: cannot tell, assume not started
        return False
