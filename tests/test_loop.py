"""Specification of lrs.loop: the one loop every fit runs, on the device or
driven from the host, with one stop rule."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrs import loop


class Info(NamedTuple):
    loss: jax.Array
    u_change: jax.Array
    stop_code: jax.Array = 0


def _toy(changes, losses):
    """A step whose i-th iteration reports ``changes[i]`` and ``losses[i]``."""
    changes = jnp.asarray(changes, jnp.float32)
    losses = jnp.asarray(losses, jnp.float32)

    def step(i, state):
        return state + 1, Info(losses[i], changes[i], jnp.int32(0))

    return step


def _run(step, rule, host):
    shape = Info(jnp.float32(0), jnp.float32(0), jnp.int32(0))
    if host:
        return loop.iterate(step, jnp.int32(0), shape, rule, host=True)
    run = jax.jit(lambda s: loop.iterate(step, s, shape, rule))
    return run(jnp.int32(0))


CASES = [
    # (changes, losses, rule, last iteration, reason)
    ([9, 0.5, 0.1, 1e-6, 1e-7], [1.0] * 5, loop.StopRule(4, 1e-5, 0), 3, "converged"),
    (
        [9, 0.5, 0.4, 0.3, 0.2],
        [1.0] * 5,
        loop.StopRule(4, 1e-5, 0),
        4,
        "max_iterations",
    ),
    ([9, 0.1, 0.2, 0.3, 0.4, 0.5], [1.0] * 6, loop.StopRule(5, 1e-5, 2), 3, "stalled"),
    ([9, 0.5, 0.4], [1.0, np.inf, 1.0], loop.StopRule(2, 1e-5, 0), 1, "nonfinite"),
    # the change of iteration 0 (no shared step yet) never counts
    ([0.0, 0.5, 1e-9], [1.0] * 3, loop.StopRule(2, 1e-5, 0), 2, "converged"),
]


@pytest.mark.parametrize("host", [False, True], ids=["device", "host"])
@pytest.mark.parametrize("changes, losses, rule, last, reason", CASES)
def test_iterate_stops_for_the_documented_reason(
    changes, losses, rule, last, reason, host
):
    state, history, done = _run(_toy(changes, losses), rule, host)
    assert int(done) == last and int(state) == last + 1
    codes = np.asarray(history.stop_code)
    assert loop.STOP_REASONS[codes[last]] == reason
    assert (codes[:last] == 0).all()
    np.testing.assert_array_equal(
        np.asarray(history.loss)[: last + 1], losses[: last + 1]
    )


def test_host_and_device_loops_report_the_same_iterations():
    seen = {True: [], False: []}
    step = _toy([9, 0.5, 0.1, 1e-6], [3.0, 2.0, 1.0, 0.5])
    rule = loop.StopRule(3, 1e-5, 0)
    shape = Info(jnp.float32(0), jnp.float32(0), jnp.int32(0))
    loop.iterate(
        step, jnp.int32(0), shape, rule, host=True,
        report=lambda i, info: seen[True].append((int(i), float(info.loss))),
    )  # fmt: skip

    def on_device(s):
        def report(i, info):
            jax.debug.callback(
                lambda i, l: seen[False].append((int(i), float(l))), i, info.loss,
                ordered=True,
            )  # fmt: skip

        return loop.iterate(step, s, shape, rule, report=report)

    jax.block_until_ready(jax.jit(on_device)(jnp.int32(0)))
    jax.effects_barrier()
    assert seen[True] == seen[False] == [(0, 3.0), (1, 2.0), (2, 1.0), (3, 0.5)]


def test_while_and_fori_loops_match_lax():
    body = lambda c: c * 2  # noqa: E731
    assert loop.while_loop(lambda c: c < 100, body, 3, host=True) == 192
    assert int(loop.while_loop(lambda c: c < 100, body, jnp.int32(3))) == 192
    add = lambda i, c: c + i  # noqa: E731
    assert loop.fori_loop(0, 5, add, 0, host=True) == 10
    assert int(loop.fori_loop(0, 5, add, jnp.int32(0))) == 10
