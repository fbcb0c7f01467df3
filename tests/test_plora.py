"""PLoRA as published (issue 18): personalized dropout, the zero-shot path and
the layer-wise record of :class:`lrs.nn.baseline_layers.PLoRALinear`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lrs.nn.baseline_layers import PLoRALinear, plora_mode
from lrs.nn.nnx_personalize import adapter_layers, personalize
from lrs.nn.user_state import users

pytestmark = pytest.mark.usefixtures("cheap_compiles")


def _layer(dtype=jnp.float32, **kw):
    base = nnx.Linear(7, 5, param_dtype=dtype, rngs=nnx.Rngs(0))
    layer = PLoRALinear(
        base, rank=3, embed_dim=4, num_users=6, rngs=nnx.Rngs(1), scale=0.5, **kw
    )
    k1, k2 = jax.random.split(jax.random.key(2))
    layer.B[...] = jax.random.normal(k1, layer.B.shape, dtype)
    layer.E[...] = jax.random.normal(k2, layer.E.shape, dtype)
    return layer


IDS = jnp.array([2, 0, 5, 2])


def _x(dtype=jnp.float32, shape=(4, 3, 7)):
    return jax.random.normal(jax.random.key(4), shape, dtype)


def _shared_only(layer, x):
    """``x W + bias + scale x A B``: the model without any user (numpy)."""
    x = np.asarray(x, np.float64)
    a, b = np.asarray(layer.A[...], np.float64), np.asarray(layer.B[...], np.float64)
    out = x @ np.asarray(layer.base.kernel[...], np.float64)
    return out + np.asarray(layer.base.bias[...]) + layer.scale * (x @ a) @ b


def _today(layer, x, ids):
    """The forward before dropout existed, written out: ``base(x) + s (xA + e P) B``."""
    user = layer.E[...][ids] @ layer.P[...]
    h = x @ layer.A[...] + user.reshape(user.shape[:1] + (1,) * (x.ndim - 2) + (-1,))
    return layer.base(x) + layer.scale * (h @ layer.B[...])


def test_training_forward_keeps_shape_and_dtype():
    dtype = jnp.float32
    layer = _layer(dtype, dropout=0.3, user_dropout=0.5)
    x = _x(dtype)
    y = layer(x, IDS, rngs=nnx.Rngs(dropout=0))
    assert y.shape == (4, 3, 5) and y.dtype == dtype
    y2 = layer(x[:, 0], IDS, rngs=jax.random.key(1))  # a bare key works too
    assert y2.shape == (4, 5) and y2.dtype == dtype
    assert np.isfinite(np.asarray(y)).all()


def test_rate_zero_and_no_rngs_equal_the_old_forward_exactly():
    x = _x()
    default = _layer()  # dropout 0.1 by default: inactive without a key
    np.testing.assert_array_equal(default(x, IDS), _today(default, x, IDS))
    off = _layer(dropout=0.0, user_dropout=0.0)
    np.testing.assert_array_equal(
        off(x, IDS, rngs=nnx.Rngs(dropout=3)), _today(off, x, IDS)
    )
    with plora_mode(rngs=jax.random.key(3)):
        np.testing.assert_array_equal(off(x, IDS), _today(off, x, IDS))


def test_dropout_changes_the_output_only_in_training():
    layer = _layer(dropout=0.3, user_dropout=0.5)
    x = _x()
    plain = layer(x, IDS)
    trained = layer(x, IDS, rngs=nnx.Rngs(dropout=0))
    assert not np.allclose(trained, plain)
    again = layer(x, IDS, rngs=nnx.Rngs(dropout=0))
    np.testing.assert_array_equal(trained, again)  # the key fixes the masks
    layer.eval()  # nnx's evaluation mode: deterministic
    assert layer.deterministic
    np.testing.assert_array_equal(layer(x, IDS, rngs=nnx.Rngs(dropout=0)), plain)
    with plora_mode(rngs=jax.random.key(0)):
        np.testing.assert_array_equal(layer(x, IDS), plain)
    layer.train()
    assert not np.allclose(layer(x, IDS, rngs=nnx.Rngs(dropout=0)), plain)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_zero_shot_is_the_shared_lora_alone(dtype):
    layer = _layer(dtype)
    x = _x(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=1e-12)
    expect = _shared_only(layer, x)
    np.testing.assert_allclose(layer(x, zero_shot=True), expect, **tol)  # no ids
    with plora_mode(zero_shot=True):
        np.testing.assert_allclose(layer(x), expect, **tol)
    layer.E[...] = jnp.zeros_like(layer.E[...])  # a zero embedding: the same model
    np.testing.assert_allclose(layer(x, IDS), expect, **tol)


def test_user_dropout_removes_whole_rows_of_the_user_term():
    x = _x(shape=(64, 7))
    ids = jnp.arange(64) % 6
    layer = _layer(dropout=0.0, user_dropout=0.5)
    y = np.asarray(layer(x, ids, rngs=nnx.Rngs(dropout=1)))
    full, alone = np.asarray(layer(x, ids)), np.asarray(layer(x, zero_shot=True))
    is_full = np.isclose(y, full, atol=1e-6).all(1)
    is_alone = np.isclose(y, alone, atol=1e-6).all(1)
    assert (is_full | is_alone).all()  # every row keeps or drops its user whole
    assert 10 < is_alone.sum() < 54  # about half dropped
    always = _layer(dropout=0.0, user_dropout=1.0)
    np.testing.assert_allclose(
        always(x, ids, rngs=nnx.Rngs(dropout=1)), alone, rtol=1e-6, atol=1e-6
    )
    with plora_mode(rngs=jax.random.key(1), user_dropout_scale=0.0):  # PDropout off
        np.testing.assert_array_equal(layer(x, ids), full)


def test_record_gives_the_adapter_output_with_and_without_the_user():
    layer = _layer(dropout=0.0)
    x = _x()
    record = []
    with plora_mode(record=record):
        y = layer(x, IDS)
    ((with_user, without),) = record
    np.testing.assert_allclose(y, layer.base(x) + with_user, rtol=1e-6, atol=1e-6)
    shift = layer.scale * (layer.E[...][IDS] @ layer.P[...]) @ layer.B[...]
    np.testing.assert_allclose(
        with_user - without, np.broadcast_to(shift[:, None], y.shape), atol=1e-5
    )
    with plora_mode(record=record, zero_shot=True):
        layer(x)
    assert len(record) == 1  # a zero-shot call has no user term to record


def test_rates_are_checked_and_personalize_passes_them():
    base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    for bad in (dict(dropout=1.0), dict(dropout=-0.1), dict(user_dropout=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PLoRALinear(base, rank=1, embed_dim=2, num_users=2, rngs=nnx.Rngs(1), **bad)

    class Net(nnx.Module):
        def __init__(self):
            self.a = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
            self.b = nnx.Linear(4, 3, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.b(self.a(x))

    net = Net()
    personalize(
        net, "a|b", num_users=3, rngs=nnx.Rngs(2), method="user_lora", rank=2,
        dropout=0.2, user_dropout=0.4,
    )  # fmt: skip
    layers = adapter_layers(net)
    assert {(m.dropout, m.user_dropout) for m in layers.values()} == {(0.2, 0.4)}
    for m in layers.values():  # B starts at zero: move it so the adapters act
        m.B[...] = jnp.ones_like(m.B[...])
        m.E[...] = jnp.ones_like(m.E[...])
    x = jax.random.normal(jax.random.key(0), (5, 4))
    with users(jnp.array([0, 1, 2, 0, 1])):
        plain = net(x)
        with plora_mode(rngs=jax.random.key(0)):
            assert not np.allclose(net(x), plain)
        net.eval()
        with plora_mode(rngs=jax.random.key(0)):
            np.testing.assert_array_equal(net(x), plain)
    with pytest.raises(ValueError, match="user_dropout"):
        personalize(
            Net(), "a", num_users=3, rngs=nnx.Rngs(2), method="lora", rank=1,
            user_dropout=0.5,
        )  # fmt: skip
