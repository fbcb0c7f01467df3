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

3. Compilation dominates short runs (``lrs demo``: 7 of 8 s).
   :func:`use_compilation_cache` turns on JAX's persistent compilation cache
   (bounded and locked), so a program compiled once is loaded from disk by
   later processes.
   JAX never caches a program with a host callback (``jax.debug.callback``),
   so a fit with ``callback=`` runs its compiled loop one iteration per call
   and calls back from Python instead.

The CLI, the benchmark scripts and the test suite call
:func:`avoid_cpu_deadlock` first, and the CLI and the scripts
:func:`use_compilation_cache`; library users who see a hang or erratic
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


def default_cache_dir() -> str:
    """``$LRS_COMPILATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/lrs/jax-cache``,
    else ``~/.cache/lrs/jax-cache``."""
    explicit = os.environ.get("LRS_COMPILATION_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return os.path.join(base, "lrs", "jax-cache")


#: Size limit of the cache (least recently used entries go first).
CACHE_MAX_BYTES = 2 * 2**30


def use_compilation_cache(path: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache (compiled programs on disk).

    A program compiled once (same shapes, dtypes, static configuration, jax
    version and XLA flags) is then loaded from disk by later processes instead
    of compiled again: ``lrs demo`` run twice compiles once. The CLI and the
    benchmark scripts call this (the test suite does not); library users may
    call it themselves, before their first computation.

    The cache is bounded (2 GiB, least recently used entries go first), which
    makes JAX lock the directory around every read and write (``filelock``):
    without the lock, a process can read an entry another is still writing
    and crash (seen here: a segmentation fault in two concurrent test runs).
    The cache is trusted code: keep it in a directory only you can write
    (JAX's own warning). Opt out with ``LRS_NO_COMPILATION_CACHE=1``; set the
    directory with ``path`` or ``LRS_COMPILATION_CACHE_DIR``, which must not
    be shared with processes that write to it without the size limit (their
    entries lack the access times the eviction reads).

    Returns:
      The cache directory, or None when opted out, when ``filelock`` is
      missing, or when the user already configured JAX's cache themselves
      (left untouched).
    """
    if os.environ.get("LRS_NO_COMPILATION_CACHE") == "1":
        return None
    try:
        import filelock  # noqa: F401  (JAX's lock of a bounded cache)
    except ImportError:
        return None
    import jax

    if jax.config.jax_compilation_cache_dir:  # the user's own setting wins
        return None
    path = path or default_cache_dir()
    os.makedirs(path, mode=0o700, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program that took a noticeable time to compile (JAX's default
    # of 1 s would miss most of lrs's programs, which compile in 0.2-3 s).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    return path


#: JAX's monitoring events that make up the compile time of a program.
COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}


class CompileTimes:
    """Seconds spent tracing, lowering and compiling, per program, from the
    moment :meth:`start` is called (JAX's monitoring events; a program loaded
    from the persistent cache counts its short retrieval as ``compile``).

    ``record()`` -> ``{'total_s', 'by_part': {trace, lower, compile},
    'programs': {name: seconds}}`` (the 15 costliest programs).
    """

    _instance = None

    def __init__(self):
        self.by_part = dict.fromkeys(COMPILE_EVENTS.values(), 0.0)
        self.programs: dict[str, float] = {}
        self.cache_hits = 0

    @classmethod
    def start(cls) -> "CompileTimes":
        """The process's recorder (registered with JAX once)."""
        if cls._instance is None:
            import jax

            cls._instance = cls()
            jax.monitoring.register_event_duration_secs_listener(cls._instance._listen)
            jax.monitoring.register_event_listener(cls._instance._count)
        return cls._instance

    def _listen(self, event: str, seconds: float, **kwargs) -> None:
        part = COMPILE_EVENTS.get(event)
        if part is None:
            return
        self.by_part[part] += seconds
        name = str(kwargs.get("fun_name", "?"))
        self.programs[name] = self.programs.get(name, 0.0) + seconds

    def _count(self, event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1

    def record(self) -> dict:
        top = sorted(self.programs.items(), key=lambda kv: -kv[1])[:15]
        return dict(
            total_s=sum(self.by_part.values()),
            by_part=dict(self.by_part),
            persistent_cache_hits=self.cache_hits,
            programs={name: round(s, 3) for name, s in top},
        )
