"""lrs.nn.train: the shared phase learns, IHT keeps k entries, cold start is local."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrs.nn import adapters
from lrs.nn.model import TransformerConfig, init
from lrs.nn.train import TrainConfig, evaluate, train

pytestmark = pytest.mark.usefixtures("cheap_compiles")

MODEL = TransformerConfig(
    vocab=7, seq_len=4, num_classes=3, d_model=8, num_heads=2, num_layers=1, d_ff=6
)
LAYERS = ("block0/mlp_out", "head")
ADAPTER = adapters.LRS(MODEL, LAYERS, rank=2, sparsity=3)


def _data(key, n, m):
    """Labels from a per-user rule the model can fit: token sum shifted by user."""
    tokens = jax.random.randint(key, (n, m, MODEL.seq_len), 0, MODEL.vocab)
    shift = jnp.arange(n)[:, None] % MODEL.num_classes
    return tokens, ((tokens[..., 0] + shift) % MODEL.num_classes).astype(jnp.int32)


@pytest.fixture(scope="module")
def trained():
    k_base, k_ad, k_data, k_train = jax.random.split(jax.random.key(0), 4)
    shared, users = ADAPTER.init(k_ad, 12)
    params = {"base": init(k_base, MODEL), "shared": shared, "users": users}
    tokens, labels = _data(k_data, 12, 8)
    config = TrainConfig(steps=40, users_per_batch=4, samples_per_user=4, lr=1e-2)
    result = train(
        k_train, ADAPTER, MODEL, params, tokens, labels, config, progress=False
    )
    return params, result, tokens, labels, config


def test_a_few_optax_steps_reduce_the_loss(trained):
    params, result, tokens, labels, _ = trained
    before, _ = evaluate(ADAPTER, MODEL, params, tokens, labels)
    after, _ = evaluate(ADAPTER, MODEL, result.params, tokens, labels)
    assert after < before
    assert result.loss.shape == (40,) and np.isfinite(result.loss).all()
    assert result.loss[-10:].mean() < result.loss[:10].mean()


def test_sparse_parts_keep_exactly_k_distinct_nonzeros(trained):
    users = trained[1].params["users"]
    idx, val = np.asarray(users["b_idx"]), np.asarray(users["b_val"])
    assert idx.shape == val.shape == (12, ADAPTER.sparsity)
    assert all(len(set(row)) == ADAPTER.sparsity for row in idx)
    assert (val != 0).all()  # every user was in some batch and took IHT steps


def test_inputs_are_not_modified(trained):
    params = trained[0]
    np.testing.assert_array_equal(params["users"]["v"], 0.0)
    np.testing.assert_array_equal(params["users"]["b_val"], 0.0)


def test_cold_start_moves_only_the_new_users(trained):
    _, result, tokens, labels, config = trained
    shared_phase = result.params
    new_users = ADAPTER.init_users(jax.random.key(5), 3)
    params = {**shared_phase, "users": new_users}
    cold = train(
        jax.random.key(6),
        ADAPTER,
        MODEL,
        params,
        tokens[:3],
        labels[:3],
        config,
        phase="new_users",
        progress=False,
    )
    for part in ("base", "shared"):
        same = jax.tree.map(np.array_equal, cold.params[part], shared_phase[part])
        assert all(jax.tree.leaves(same))
    assert not np.array_equal(cold.params["users"]["v"], new_users["v"])
    assert cold.loss[-10:].mean() < cold.loss[:10].mean()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr_user"):
        TrainConfig(lr_user=-1.0)
    params = {"base": None, "shared": {}, "users": {}}
    tokens = jnp.zeros((2, 3, MODEL.seq_len), jnp.int32)
    with pytest.raises(ValueError, match="phase"):
        train(
            jax.random.key(0),
            ADAPTER,
            MODEL,
            params,
            tokens,
            tokens[..., 0],
            TrainConfig(),
            phase="both",
        )
    with pytest.raises(ValueError, match="labels must be integer classes"):
        train(
            jax.random.key(0),
            ADAPTER,
            MODEL,
            params,
            tokens,
            tokens[..., 0] + MODEL.num_classes,
            TrainConfig(),
        )
    with pytest.raises(ValueError, match="labels"):
        train(jax.random.key(0), ADAPTER, MODEL, params, tokens, tokens, TrainConfig())
