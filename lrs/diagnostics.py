"""The one diagnostics type every fit returns beside its parameters.

:func:`lrs.fit`, :func:`lrs.fit_streamed`, the private fits and every
baseline return ``(params, Diagnostics)``. The per-iteration fields are
arrays of shape ``(n,)``, entry ``i`` after iteration ``i`` (0: the
initialization); a one-shot fit (a baseline without iterations) has
``n = 1``. A fit that does not compute a value reports NaN (floats) or 0
(counts). The same type, with scalar fields, is what a fit's ``callback``
receives after each iteration.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from lrs.loop import STOP_REASONS


class Diagnostics(NamedTuple):
    """What a fit reports (see the module docstring for shapes).

    Attributes:
      loss: mean squared training residual (NaN in a private fit: it is not
        released; ``nonprivate.loss`` has it when asked for).
      u_change: subspace distance between successive U.
      cg_iters: CG iterations of the shared step (0 where there is none).
      relative_error: ``||W - W*||_F / ||W*||_F`` against ``truth`` (NaN
        without).
      subspace_distance: sine of the largest angle between U and ``truth.U``
        (NaN without truth).
      stop_code: int32, 0 while the fit goes on; in the last entry why it
        stopped, an index into :data:`lrs.loop.STOP_REASONS` (see
        :attr:`stop_reason`).
      excluded: ``(t,)`` bool, users whose data the fit could not use
        (private fits); None elsewhere.
      privacy: the :class:`lrs.private.PrivacyRecord` of a private fit; None
        elsewhere.
      transcript: a private fit's :class:`lrs.private.Transcript` of every
        release (with ``transcript=True``); None elsewhere.
      nonprivate: a private fit's exact, NOT private
        :class:`lrs.private.NonPrivateDiagnostics` (with
        ``nonprivate_diagnostics=True``); None elsewhere.
      details: method-specific values by name (e.g. :func:`lrs.baselines.local_ridge`'s
        chosen ``alpha``); None when there are none.
    """

    loss: Any
    u_change: Any
    cg_iters: Any
    relative_error: Any
    subspace_distance: Any
    stop_code: Any = 0
    excluded: Any = None
    privacy: Any = None
    transcript: Any = None
    nonprivate: Any = None
    details: dict | None = None

    @property
    def stop_reason(self) -> str:
        """Why the fit stopped (from the last entry of ``stop_code``).

        ``'converged'``: the U change fell below ``tol`` (each shared step's
        CG is then accurate to a tenth of the change, so U is at the exact U
        step's fixed point to about ``tol``); ``'max_iterations'``: the
        ``num_iters`` budget ran out first (and every fixed-length fit: the
        private fits, the one-shot baselines); ``'stalled'``: the U change
        stopped decreasing for ``stall_iters`` iterations while above
        ``tol``; ``'nonfinite'``: the iterates overflowed (the fit raises
        then); ``'running'``: not a last entry (a single :func:`lrs.step`).
        """
        code = np.asarray(self.stop_code).reshape(-1)
        return STOP_REASONS[int(code[-1])] if code.size else "running"


#: The per-iteration fields (arrays of shape ``(n,)``), in order.
PER_ITERATION = Diagnostics._fields[:6]
MAX_ITERATIONS = STOP_REASONS.index("max_iterations")


def fixed_length(
    n: int,
    *,
    loss=None,
    u_change=None,
    relative_error=None,
    subspace_distance=None,
    **fields,
) -> Diagnostics:
    """The :class:`Diagnostics` of a fit that runs ``n`` entries and stops for
    ``'max_iterations'``; fields not given are NaN (``cg_iters`` 0)."""

    def column(values):
        if values is None:
            return np.full((n,), np.nan)
        return np.asarray(values, float).reshape(n)

    stop = np.zeros((n,), np.int32)
    stop[-1] = MAX_ITERATIONS
    return Diagnostics(
        loss=column(loss),
        u_change=column(u_change),
        cg_iters=np.zeros((n,), np.int32),
        relative_error=column(relative_error),
        subspace_distance=column(subspace_distance),
        stop_code=stop,
        **fields,
    )
