"""Host-side checks of fit inputs, run before anything is traced."""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import jax
import numpy as np

from lrs.data import RaggedData, UserData, _as_real_array, _check_finite

if TYPE_CHECKING:
    from lrs.config import AMHTConfig


def check_layout(
    data, config: AMHTConfig, *, name: str = "data", convert: bool = True
) -> UserData:
    """Checks the public facts of ``data``: type, shapes, dtypes, rank and
    sparsity against ``d``. Never reads the values (the private fits accept
    any values; :func:`check_data` adds the value checks of the other fits).

    Never modifies ``data``: integer arrays are converted into new arrays;
    with ``convert=False`` (host data streamed chunk by chunk, converted per
    chunk) ``data`` comes back as it is.
    """
    if not isinstance(data, UserData):
        raise ValueError(f"{name} must be an lrs.UserData; got {type(data).__name__}")
    if not convert:
        check_layout(_layout_only(data), config, name=name)
        return data
    X = _as_real_array(data.X, f"{name}.X")
    y = _as_real_array(data.y, f"{name}.y")
    mask = np.asarray(data.mask) if not isinstance(data.mask, jax.Array) else data.mask
    if X.ndim != 3:
        raise ValueError(f"{name}.X must have shape (t, m, d); got {X.shape}")
    t, m, d = X.shape
    if t == 0:
        raise ValueError(f"{name} has zero users")
    if y.shape != (t, m) or mask.shape != (t, m):
        raise ValueError(
            f"{name}.y and {name}.mask must have shape (t, m) = {(t, m)}; "
            f"got {y.shape} and {mask.shape}"
        )
    if mask.dtype != bool:
        raise ValueError(f"{name}.mask must be boolean; got {mask.dtype}")
    if not config.rank < d:
        raise ValueError(f"rank must be < d = {d}; got {config.rank}")
    if not config.sparsity < d:
        raise ValueError(f"sparsity must be < d = {d}; got {config.sparsity}")
    y = y.astype(X.dtype) if y.dtype != X.dtype else y
    return UserData(X, y, mask)


def _layout_only(data: UserData) -> UserData:
    """Stand-ins of ``data``'s arrays with its shapes and dtypes, no values."""

    def fake(a, what):
        dtype = getattr(a, "dtype", None)
        if dtype is None or getattr(a, "shape", None) is None:
            raise ValueError(
                f"data.{what} must be an array (numpy, memory-mapped or jax); "
                f"got {type(a).__name__}"
            )
        return np.broadcast_to(np.zeros((), dtype), a.shape)

    return UserData(fake(data.X, "X"), fake(data.y, "y"), fake(data.mask, "mask"))


def check_data(
    data,
    config: AMHTConfig,
    *,
    name: str = "data",
    values: bool = True,
    convert: bool = True,
) -> UserData:
    """Validates ``data`` against ``config``; returns it, converted if needed.

    :func:`check_layout`, then: every value finite (unless ``values`` is
    False: the streamed fit checks them in its first pass, chunk by chunk)
    and every user with at least ``rank + sparsity`` samples (times
    ``fresh_samples``). Never modifies ``data``: integer arrays are converted
    into new arrays (not with ``convert=False``).
    """
    data = check_layout(data, config, name=name, convert=convert)
    config.check_features(data.X.shape[2])
    if values:
        _check_finite_by_rows(data.X, f"{name}.X")
        _check_finite_by_rows(data.y, f"{name}.y")
    batches = max(config.fresh_samples, 1)
    need = (config.rank + config.sparsity) * batches
    counts = np.asarray(data.mask.sum(axis=1))
    short = np.flatnonzero(counts < need)
    if short.size:
        shown = ", ".join(f"user {i} ({counts[i]})" for i in short[:10])
        more = f" and {short.size - 10} more" if short.size > 10 else ""
        per = f" x fresh_samples = {need}" if batches > 1 else f" = {need}"
        raise ValueError(
            f"{name}: {short.size} user(s) have fewer samples than rank + sparsity"
            f"{per}: {shown}{more}"
        )
    return data


def check_ragged(data, config: AMHTConfig, *, name: str = "data") -> RaggedData:
    """Checks a :class:`lrs.data.RaggedData` against ``config`` without reading
    its sample values (the streamed fit checks them chunk by chunk): type,
    shapes, float dtypes, counts that add up to ``N``, rank and sparsity
    against ``d``, every user with at least ``rank + sparsity`` samples
    (times ``fresh_samples``). Returns ``data`` unchanged.

    Raises:
      ValueError: naming ``name`` and the bad field.
    """
    if not isinstance(data, RaggedData):
        raise ValueError(f"{name} must be an lrs.RaggedData; got {type(data).__name__}")
    for field, ndim in (("X", 2), ("y", 1)):
        a = getattr(data, field)
        if not isinstance(a, np.ndarray) or not np.issubdtype(a.dtype, np.floating):
            raise ValueError(
                f"{name}.{field} must be a real floating numpy array; got "
                f"{type(a).__name__} {getattr(a, 'dtype', '')}"
            )
        if a.ndim != ndim:
            raise ValueError(f"{name}.{field} must be {ndim}-d; got shape {a.shape}")
    counts = np.asarray(data.counts)
    if counts.ndim != 1 or counts.size == 0 or counts.dtype.kind not in "iu":
        raise ValueError(
            f"{name}.counts must be a non-empty 1-d integer array; got "
            f"{counts.dtype} with shape {counts.shape}"
        )
    n, d = data.X.shape
    if data.y.shape != (n,) or counts.min() < 0 or int(counts.sum()) != n:
        raise ValueError(
            f"{name}.y must have shape (N,) = ({n},) and {name}.counts be >= 0 "
            f"with sum N; got y {data.y.shape}, counts summing to {counts.sum()}"
        )
    if not config.rank < d:
        raise ValueError(f"rank must be < d = {d}; got {config.rank}")
    if not config.sparsity < d:
        raise ValueError(f"sparsity must be < d = {d}; got {config.sparsity}")
    config.check_features(d)
    need = (config.rank + config.sparsity) * max(config.fresh_samples, 1)
    short = np.flatnonzero(counts < need)
    if short.size:
        shown = ", ".join(f"user {i} ({counts[i]})" for i in short[:10])
        raise ValueError(
            f"{name}: {short.size} user(s) have fewer samples than rank + "
            f"sparsity (x fresh_samples) = {need}: {shown}"
        )
    return data


# Bytes of a host array checked at a time by _check_finite_by_rows.
CHECK_BLOCK_BYTES = 64 * 2**20


def _check_finite_by_rows(a, name: str) -> None:
    """:func:`lrs.data._check_finite`, a block of users at a time for host arrays.

    A numpy array (e.g. ``np.load(path, mmap_mode="r")``) is read in blocks of
    leading-axis rows of about ``CHECK_BLOCK_BYTES``, so a memory-mapped array
    is never loaded whole and the temporaries stay bounded; the check stops at
    the first block with a non-finite value. JAX arrays are checked at once.
    """
    if isinstance(a, jax.Array) or a.ndim == 0 or a.size == 0:
        _check_finite(a, name)
        return
    row_bytes = max(1, a.itemsize * (a.size // a.shape[0]))
    step = max(1, CHECK_BLOCK_BYTES // row_bytes)
    for start in range(0, a.shape[0], step):
        if not np.isfinite(a[start : start + step]).all():
            raise ValueError(f"{name} contains NaN or inf values")


def check_init(U0, d: int, rank: int, dtype) -> np.ndarray:
    """Validates a user-given starting ``U0`` of shape ``(d, rank)``."""
    U0 = _as_real_array(U0, "U0")
    if U0.shape != (d, rank):
        raise ValueError(f"U0 must have shape (d, rank) = {(d, rank)}; got {U0.shape}")
    _check_finite(U0, "U0")
    if np.linalg.matrix_rank(np.asarray(U0, np.float64)) < rank:
        raise ValueError("U0 must have full column rank")
    return np.asarray(U0, dtype)


def check_truth(truth, t: int, d: int) -> None:
    """Checks that planted parameters are an ``lrs.LRSParams`` matching the
    data's ``t`` users and ``d`` features."""
    from lrs.params import LRSParams

    if not isinstance(truth, LRSParams):
        raise ValueError(
            f"truth must be an lrs.LRSParams (e.g. from lrs.synthetic.make_problem); "
            f"got {type(truth).__name__}"
        )
    U, V = np.shape(truth.U), np.shape(truth.V)
    if U[0] != d or V[0] != t or U[1] != V[1] or truth.B.dim != d:
        raise ValueError(
            f"truth must describe t = {t} users in d = {d} features; got "
            f"U {U}, V {V}, B dim {truth.B.dim}"
        )


def check_key(key, *, name: str = "key", default=None):
    """A single ``jax.random`` key (typed, or raw ``uint32`` of shape ``(2,)``).

    ``None`` gives ``default``; with no default (the private fits, whose noise
    the key is) ``None`` raises.

    Raises:
      ValueError: if ``key`` is not one key, or is None without a default.
    """
    if key is None:
        if default is not None:
            return default
        raise ValueError(
            f"{name} is required: the private fit's noise comes from it, so it "
            "must be secret and fresh (e.g. jax.random.key(secrets.randbits(63)), "
            "never reused); without noise epsilon is infinite"
        )
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == np.uint32 and np.shape(key) == (2,)
    if not ((typed and np.shape(key) == ()) or raw):
        raise ValueError(
            f"{name} must be one jax.random key (jax.random.key(seed)); got "
            f"{type(key).__name__} of shape {np.shape(key)}"
        )
    return key


def check_real(
    name: str,
    value,
    expected: str = "a finite number",
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """``value`` as a float: any finite real number (Python or numpy) but a
    bool, within ``[low, high]`` where given (``open_low`` / ``open_high``:
    the bound itself excluded).

    Raises:
      ValueError: ``"{name} must be {expected}; got {value!r}"`` for a bool,
        a non-number, a non-finite value or one out of range.
    """
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    number = float(value)
    bad = not math.isfinite(number)
    if low is not None:
        bad |= number <= low if open_low else number < low
    if high is not None:
        bad |= number >= high if open_high else number > high
    if bad:
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return number


def check_fraction(name: str, value) -> float:
    """``value`` as a float strictly between 0 and 1 (a fraction, a delta)."""
    bounds = dict(low=0, high=1, open_low=True, open_high=True)
    return check_real(name, value, "a number in (0, 1)", **bounds)


def check_integer(name: str, value, low: int) -> int:
    """``value`` as an int ``>= low``: any integer (Python or numpy) but a bool."""
    if (
        isinstance(value, bool | np.bool_)
        or not isinstance(value, numbers.Integral)
        or value < low
    ):
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return int(value)


def check_representable(name: str, value: float, dtype) -> None:
    """Refuses a positive scale that ``dtype`` turns into 0 or inf (a clip
    level of 1e39 in float32 would clip nothing; 1e-46 everything)."""
    info = np.finfo(dtype)
    if not float(info.tiny) <= value <= float(info.max):
        raise ValueError(
            f"{name}={value!r} is not representable in {np.dtype(dtype).name} "
            f"(it must lie in [{float(info.tiny):g}, {float(info.max):g}])"
        )
