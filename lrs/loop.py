"""The one iteration loop every fit runs, on the device or driven from the host.

A fit is ``step(i, state) -> (state, info)`` repeated until a stop rule fires.
:func:`iterate` runs it: as one ``lax.while_loop`` when the whole fit is a
single jitted program (:func:`lrs.fit`, sharded or not), or as a Python loop
over the same body when a step streams data from the host
(:func:`lrs.fit_streamed`). The stop rule (:func:`stop_code`), the
bookkeeping of the best U change and the history of ``info`` are written
once, here, so every fit stops for the same reasons.

:func:`while_loop` and :func:`fori_loop` choose between ``lax`` and Python
the same way for inner loops (CG, subspace iteration, the private fit's
fixed number of releases).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# Why a fit stopped: ``info.stop_code`` indexes this tuple.
STOP_REASONS = ("running", "converged", "max_iterations", "stalled", "nonfinite")


class StopRule(NamedTuple):
    """When :func:`iterate` stops (hashable: a static argument of ``jit``).

    Attributes:
      num_iters: iterations after the first (iteration 0 is the
        initialization's per-user step); the loop runs at most
        ``num_iters + 1`` steps.
      tol: stop, ``'converged'``, once the U change falls below it.
      stall_iters: stop, ``'stalled'``, when the U change has not reached a
        new minimum for this many iterations (0: never).
    """

    num_iters: int
    tol: float
    stall_iters: int


def while_loop(cond: Callable, body: Callable, carry, *, host: bool = False):
    """``lax.while_loop``, or the same loop in Python when ``host``.

    The host form runs ``body`` eagerly (each call may dispatch jitted
    programs, e.g. over chunks of host data) and is also what the device form
    computes, so a body written once serves both.
    """
    if not host:
        return jax.lax.while_loop(cond, body, carry)
    while bool(cond(carry)):
        carry = body(carry)
    return carry


def fori_loop(lower: int, upper: int, body: Callable, carry, *, host: bool = False):
    """``lax.fori_loop``, or the same loop in Python when ``host``."""
    if not host:
        return jax.lax.fori_loop(lower, upper, body, carry)
    for i in range(lower, upper):
        carry = body(i, carry)
    return carry


def stop_code(i, num_iters: int, change, best, since_best, loss, tol, stall: int):
    """Why the loop stops after iteration ``i`` (index into
    :data:`STOP_REASONS`; 0: it goes on).

    ``change``: the U change of iteration ``i``; ``best``: the smallest so
    far; ``since_best``: iterations since it was reached; ``loss`` the
    training loss (non-finite stops with ``'nonfinite'``). Works on jax and
    numpy scalars alike.
    """
    code = jnp.where(i >= num_iters, 2, 0)
    if stall > 0:
        code = jnp.where((i > 0) & (since_best >= stall), 3, code)
    code = jnp.where((i > 0) & (change < tol), 1, code)
    code = jnp.where(jnp.isfinite(loss), code, 4)
    return code.astype(jnp.int32)


class Carry(NamedTuple):
    """The loop's state between iterations (see :func:`start` / :func:`advance`).

    ``i``: the next iteration; ``history``: ``info`` stacked over
    ``num_iters + 1`` entries; ``best`` / ``since_best``: the smallest U
    change so far and iterations since; ``code``: :func:`stop_code` of the
    last iteration (0: go on).
    """

    i: Any
    state: Any
    history: Any
    best: Any
    since_best: Any
    code: Any


def start(state, info, rule: StopRule) -> Carry:
    """The :class:`Carry` before iteration 0; ``info`` gives the history's
    structure and dtypes (its values are not used)."""
    history = jax.tree.map(
        lambda a: jnp.zeros((rule.num_iters + 1,), jnp.asarray(a).dtype), info
    )
    zero = jnp.zeros((), jnp.int32)
    inf = jnp.asarray(jnp.inf, jnp.asarray(info.loss).dtype)
    return Carry(zero, state, history, inf, zero, zero)


def advance(
    step: Callable[[Any, Any], tuple[Any, Any]],
    carry: Carry,
    rule: StopRule,
    *,
    until=None,
    host: bool = False,
    report: Callable[[Any, Any], None] | None = None,
) -> Carry:
    """Runs ``step`` from ``carry.i`` until :func:`stop_code` says stop, or
    before iteration ``until`` (may be traced; ``None``: no such limit).

    Running to ``until = i + 1`` again and again computes exactly what one
    call computes: the host can look at every iteration (a progress
    callback) with the same compiled body and no callback inside it.
    """

    def cond(carry):
        go = carry.code == 0
        return go if until is None else go & (carry.i < until)

    def body(carry):
        i, state, history, best, since, _ = carry
        state, info = step(i, state)
        change = jnp.where(i == 0, jnp.inf, info.u_change)
        since = jnp.where(change < best, 0, since + 1)
        best = jnp.minimum(best, change)
        code = stop_code(
            i,
            rule.num_iters,
            change,
            best,
            since,
            info.loss,
            rule.tol,
            rule.stall_iters,
        )
        info = info._replace(stop_code=code)
        if report is not None:
            report(i, info)
        history = jax.tree.map(lambda h, a: h.at[i].set(a), history, info)
        return Carry(i + 1, state, history, best, since, code)

    return while_loop(cond, body, carry, host=host)


def finish(carry: Carry):
    """``(state, history, last)`` of a finished :class:`Carry`: the index of
    the last iteration run is ``last``."""
    return carry.state, carry.history, carry.i - 1


def iterate(
    step: Callable[[Any, Any], tuple[Any, Any]],
    state,
    info,
    rule: StopRule,
    *,
    host: bool = False,
    report: Callable[[Any, Any], None] | None = None,
):
    """Runs ``step`` from iteration 0 until :func:`stop_code` says stop.

    Args:
      step: ``step(i, state) -> (state, info)``; ``i`` is an int32 scalar
        (traced on the device). ``info`` is a NamedTuple of scalars with
        fields ``u_change`` (ignored at ``i = 0``), ``loss`` and
        ``stop_code`` (filled in here).
      state: the starting state.
      info: an ``info`` of the right structure and dtypes (its values are
        not used): the shape of the history.
      rule: the :class:`StopRule`.
      host: run as a Python loop (each step may stream host data).
      report: called as ``report(i, info)`` after every iteration, inside
        the loop (on the device that needs ``jax.debug.callback``;
        :func:`lrs.fit` instead advances the loop one iteration per call and
        reports from the host).

    Returns:
      ``(state, history, last)``: the final state, ``info`` stacked over
      ``num_iters + 1`` entries (entry ``i`` after iteration ``i``; entries
      after ``last`` are zeros) and the index of the last iteration run.
    """
    carry = start(state, info, rule)
    return finish(advance(step, carry, rule, host=host, report=report))
