"""``StepConfig.reselect_every``: sparse supports re-selected every N-th step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

from lrs.nn import lrs_linear, nnx_model, nnx_train  # noqa: E402
from lrs.nn.layers import personalize  # noqa: E402

pytestmark = pytest.mark.usefixtures("cheap_compiles")

N_USERS, BATCH, TOKENS, SIZES = 20, 8, 3, (16, 16, 12)
IDS = jnp.array([3, 7, 3, 11, 7, 15, 0, 3])
# a (batch, in, out) array of one of the MLP's two layers, flat or not
BATCH_IN_OUT = re.compile(rf"\[{BATCH},(16,16|256|16,12|192)\]")


def _mse(outputs, targets):
    return jnp.mean((outputs - targets) ** 2)


def _model():
    """An MLP with both layers personalized (rank 2, k = 3)."""
    model = nnx_model.MLP(list(SIZES), rngs=nnx.Rngs(0))
    personalize(model, r"layers/\d", num_users=N_USERS, rngs=nnx.Rngs(1),
                method="lrs", rank=2, sparsity=3)  # fmt: skip
    return model


def _batch(i):
    k1, k2 = jax.random.split(jax.random.key(i))
    x = jax.random.normal(k1, (BATCH, TOKENS, SIZES[0]), jnp.float32)
    return x, jax.random.normal(k2, (BATCH, TOKENS, SIZES[-1]), jnp.float32)


def _step(**kwargs):
    config = nnx_train.StepConfig(user_lr=0.5, shared_lr=1e-2, **kwargs)
    graphdef, state, opt = nnx_train.init(_model(), config)
    return nnx_train.make_step(graphdef, config, opt, loss_fn=_mse), state


def _copy(state):
    return jax.tree.map(jnp.copy, state)  # the steps donate their state


@pytest.fixture(scope="module")
def small_chunks():
    """Per-row kernels two rows at a time: no (batch, in, out) array in the
    forward, so one in a program can only be the re-selection's dense probe."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lrs_linear, "_CHUNK_ELEMENTS", 2 * 16 * 16)
        yield


@pytest.fixture(scope="module")
def trajectory(cheap_compiles, small_chunks):
    """7 steps with ``reselect_every=3`` and, from a copy of the state before
    each, the step of ``reselect=True`` (steps 0, 3, 6) or ``reselect=False``."""
    every, (full, _), (fixed, _) = 3, _step(), _step(reselect=False)
    step, state = _step(reselect_every=every)
    step = step.lower(state, *_batch(0), IDS).compile()  # its HLO: below
    rows = []
    for i in range(7):
        x, y = _batch(i)
        static = full if i % every == 0 else fixed
        expected = static(_copy(state), x, y, IDS)
        before = jax.tree.map(np.asarray, state.tables)
        state = step(state, x, y, IDS)[0]
        rows.append((before, jax.tree.map(np.asarray, state), expected))
    return every, rows, step.as_text()


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2", None])
def test_bad_reselect_every_is_refused_by_name(value):
    with pytest.raises(ValueError, match="reselect_every"):
        nnx_train.StepConfig(reselect_every=value)


def test_reselect_every_steps_are_the_static_steps_bitwise(trajectory):
    """Under ``lax.cond`` each step is bitwise the static step it stands for
    (``reselect_every=1`` is the static ``reselect=True`` program itself)."""
    _, rows, _ = trajectory
    for i, (_, state, (expected, loss)) in enumerate(rows):
        assert int(state.count) == i + 1
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(a, np.asarray(b), err_msg=f"step {i}")


def _tables(tables, name) -> list:
    """The leaves of ``tables`` named ``name`` (one per personalized layer)."""
    flat = jax.tree_util.tree_flatten_with_path(tables)[0]
    return [np.asarray(a) for p, a in flat if name in jax.tree_util.keystr(p)]


def test_supports_change_only_on_multiples_of_reselect_every(trajectory):
    every, rows, _ = trajectory
    others = np.setdiff1d(np.arange(N_USERS), np.asarray(IDS))
    for i, (before, state, _) in enumerate(rows):
        pairs = {name: list(zip(_tables(before, name), _tables(state.tables, name)))
                 for name in ("indices", "values")}  # fmt: skip
        assert len(pairs["indices"]) == 2
        for old, new in pairs["indices"]:
            assert np.any(old != new) == (i % every == 0), i
            np.testing.assert_array_equal(old[others], new[others])
        for old, new in pairs["values"]:  # the values train on every step
            assert np.any(old != new), i


def _computations(hlo: str) -> tuple[dict, str]:
    """``{name: text}`` of an HLO module's computations and the entry's name."""
    comps, entry, lines = {}, None, None
    for line in hlo.splitlines():
        start = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if lines is None and start:
            name, lines = start.group(2), [line]
            entry = name if start.group(1) else entry
        elif lines is not None:
            lines.append(line)
            if line == "}":
                comps[name], lines = "\n".join(lines), None
    return comps, entry


def _called(comps, root) -> set:
    """``root`` and every computation it calls, directly or not."""
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [c for c in re.findall(r"%([\w.\-]+)", comps[name]) if c in comps]
    return seen


def _batch_in_out_by_branch(hlo):
    """The (batch, in, out) shapes in each branch of the step's conditional
    and outside it."""
    comps, entry = _computations(hlo)
    conds = re.findall(r"branch_computations=\{([^}]*)\}", comps[entry])
    assert len(conds) == 1, conds
    branches = re.findall(r"%([\w.\-]+)", conds[0])

    def shapes(names):
        return {m.group(0) for c in names for m in BATCH_IN_OUT.finditer(comps[c])}

    inside = [_called(comps, b) for b in branches]
    return [shapes(c) for c in inside], shapes(
        _called(comps, entry) - set().union(*inside)
    )


def test_cheap_steps_never_form_the_dense_probe(trajectory):
    """In the compiled step, branch 0 (``count % N != 0``: the values on a
    fixed support) has no (batch, in, out) array; branch 1 (re-selection) has."""
    (cheap, reselect), outside = _batch_in_out_by_branch(trajectory[2])
    assert not cheap and not outside
    assert reselect  # the check sees the dense probe where it is built


def test_reselect_every_one_has_no_conditional():
    step, state = _step(reselect_every=1)
    x, y = _batch(0)
    conditional = re.compile(r"stablehlo\.(case|if)\b")
    assert not conditional.search(step.lower(state, x, y, IDS).as_text())
    step, state = _step(reselect_every=2)
    assert conditional.search(step.lower(state, x, y, IDS).as_text())


@pytest.mark.slow
def test_cheap_steps_never_form_the_dense_probe_optimized(small_chunks):
    """The same on the program XLA runs with every optimization on (code
    motion out of a conditional's branches included)."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        step, state = _step(reselect_every=4)
        x, y = _batch(0)
        hlo = step.lower(state, x, y, IDS).compile().as_text()
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
    (cheap, reselect), outside = _batch_in_out_by_branch(hlo)
    assert not cheap and not outside and reselect
