"""Error types raised by lrs, and the one check that turns overflow into one."""

import numpy as np


class FitError(RuntimeError):
    """A fit produced non-finite values; the message names the iteration."""


def raise_if_nonfinite(params, loss_history) -> None:
    """Raises :class:`FitError` naming the first iteration whose loss is not
    finite, or the last one if the returned ``params`` (any pytree of arrays,
    on the device or the host) hold a non-finite value."""
    import jax

    bad = np.flatnonzero(~np.isfinite(np.asarray(loss_history)))
    if bad.size:
        raise FitError(f"the fit became non-finite at iteration {bad[0]}")
    if not all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(params)):
        raise FitError(
            f"the fit became non-finite at iteration {len(loss_history) - 1}"
        )
