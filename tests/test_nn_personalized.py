"""lrs.nn: the personalized layer, user ids, projection and per-user files."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrs.nn import adapters, io, personalized
from lrs.nn.model import TransformerConfig, apply, init, weight_shape

pytestmark = pytest.mark.usefixtures("cheap_compiles")

MODEL = TransformerConfig(
    vocab=7, seq_len=4, num_classes=3, d_model=8, num_heads=2, num_layers=1, d_ff=6
)
LAYERS = ("block0/mlp_out", "head")
CONFIG = personalized.LRSLayerConfig(layers=LAYERS, rank=2, sparsity=3)


@pytest.fixture(scope="module")
def setup():
    keys = jax.random.split(jax.random.key(3), 6)
    base = init(keys[0], MODEL)
    P = CONFIG.check(MODEL)
    n = 5
    U = jax.random.normal(keys[1], (P, CONFIG.rank))
    idx = jnp.argsort(jax.random.uniform(keys[2], (n, P)), axis=1)[:, :3]
    users = personalized.LRSUsers(
        v=jax.random.normal(keys[3], (n, CONFIG.rank)),
        b_indices=idx.astype(jnp.int32),
        b_values=jax.random.normal(keys[4], (n, 3)),
    )
    tokens = jax.random.randint(keys[5], (6, MODEL.seq_len), 0, MODEL.vocab)
    return base, U, users, tokens


def _dense_user_params(base, U, users, i):
    """The user's transformer built with numpy: W + reshape(U v_i + b_i)."""
    U, v = np.asarray(U), np.asarray(users.v[i])
    b = np.zeros(U.shape[0])
    b[np.asarray(users.b_indices[i])] = np.asarray(users.b_values[i])
    flat = U @ v + b
    params = jax.tree.map(np.array, base)
    start = 0
    for name in LAYERS:
        p, q = weight_shape(MODEL, name)
        delta = flat[start : start + p * q].reshape(p, q)
        if name == "head":
            params["head"] = params["head"] + delta
        else:
            params["blocks"][0]["mlp_out"] = params["blocks"][0]["mlp_out"] + delta
        start += p * q
    return params


def test_forward_equals_dense_formula_with_repeated_ids(setup):
    base, U, users, tokens = setup
    ids = np.array([2, 0, 2, 4, 1, 2])  # user 2 three times
    got = personalized.personalized_apply(base, U, users, ids, tokens, MODEL, CONFIG)
    for row, i in enumerate(ids):
        params = _dense_user_params(base, U, users, i)
        want = apply(params, tokens[row : row + 1], MODEL)[0]
        np.testing.assert_allclose(got[row], want, rtol=1e-9, atol=1e-9)
    assert not np.allclose(got[0], got[1])  # different users differ


def test_unseen_user_ids(setup):
    base, U, users, tokens = setup
    ids = np.array([0, 5, 1, -1, 2, 3])  # 5 and -1 have no parameters
    with pytest.raises(ValueError, match=r"user_ids must be in \[0, 5\)"):
        personalized.personalized_apply(base, U, users, ids, tokens, MODEL, CONFIG)
    got = personalized.personalized_apply(
        base, U, users, ids, tokens, MODEL, CONFIG, unseen="global"
    )
    shared = apply(base, tokens, MODEL)
    rows = np.array([1, 3])
    np.testing.assert_allclose(got[rows], shared[rows], rtol=1e-9, atol=1e-9)
    assert not np.allclose(got[0], shared[0])
    with pytest.raises(ValueError, match="unseen"):
        personalized.personalized_apply(
            base, U, users, ids, tokens, MODEL, CONFIG, unseen="zero"
        )
    with pytest.raises(ValueError, match="tokens"):
        personalized.personalized_apply(
            base, U, users, np.array([0, 1, 2]), tokens, MODEL, CONFIG
        )
    with pytest.raises(ValueError, match=r"tokens must be ids in \[0, 7\)"):
        personalized.personalized_apply(
            base, U, users, ids, tokens + MODEL.vocab, MODEL, CONFIG, unseen="global"
        )


def test_projection_keeps_exactly_k_nonzeros():
    b = jax.random.normal(jax.random.key(0), (7, 40))
    for k in (1, 3, 10):
        idx, val = personalized.project_sparse(b, k)
        dense = np.zeros((7, 40))
        np.put_along_axis(dense, np.asarray(idx), np.asarray(val), axis=1)
        assert ((dense != 0).sum(1) == k).all()
        kth = np.sort(np.abs(np.asarray(b)), axis=1)[:, -k]
        kept = np.abs(dense).max(1) >= kth
        assert kept.all()
        np.testing.assert_array_equal(np.abs(val).min(1), kth)  # the k largest


def test_gradients_are_finite_and_nonzero(setup):
    base, _, _, tokens = setup
    from lrs.nn.train import loss_and_accuracy

    adapter = adapters.LRS(MODEL, LAYERS, rank=2, sparsity=3)
    shared, users = adapter.init(jax.random.key(1), 4)
    users["v"] = users["v"] + 0.3  # away from the v = 0 start
    users_g = adapter.expand(users)
    labels = jnp.zeros((4, 3), jnp.int32)
    toks = jnp.stack([tokens[:3]] * 4)

    def loss(base, shared, users_g):
        return loss_and_accuracy(adapter, MODEL, base, shared, users_g, toks, labels)[0]

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(base, shared, users_g)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert float(jnp.abs(grads[1]["U"]).max()) > 0
    assert float(jnp.abs(grads[2]["b"]).max()) > 0


def test_users_save_and_load_roundtrip_and_checks(tmp_path):
    adapter = adapters.LRS(MODEL, LAYERS, rank=2, sparsity=3)
    _, users = adapter.init(jax.random.key(0), 4)
    users["v"] = users["v"] + jnp.arange(8.0).reshape(4, 2)
    path = io.save_users(tmp_path / "users.npz", adapter, users)
    loaded = io.load_users(path, adapter, 4)
    for name in users:
        np.testing.assert_array_equal(loaded[name], users[name])
    with pytest.raises(ValueError, match=r"has shape \(4, \d\).*expected \(5, \d\)"):
        io.load_users(path, adapter, 5)
    with pytest.raises(ValueError, match="saved for adapter"):
        io.load_users(path, dataclasses.replace(adapter, rank=3), 4)
    lora = adapters.PerUserLoRA(MODEL, LAYERS)
    nested = lora.init_users(jax.random.key(2), 3)
    back = io.load_users(io.save_users(tmp_path / "lora", lora, nested), lora, 3)
    assert jax.tree.all(jax.tree.map(np.array_equal, back, nested))

    files = dict(np.load(path))
    files["__version__"] = np.array(io.VERSION + 1)
    np.savez(tmp_path / "future.npz", **files)
    with pytest.raises(ValueError, match="version"):
        io.load_users(tmp_path / "future.npz", adapter, 4)
    np.savez(tmp_path / "other.npz", v=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="not an lrs.nn users file"):
        io.load_users(tmp_path / "other.npz", adapter, 4)


def test_bad_configs_name_the_argument():
    with pytest.raises(ValueError, match="num_heads"):
        TransformerConfig(d_model=8, num_heads=3)
    with pytest.raises(ValueError, match="sparsity"):
        personalized.LRSLayerConfig(layers=LAYERS, sparsity=-1)
    with pytest.raises(ValueError, match="weight name"):
        personalized.LRSLayerConfig(layers=("block7/qkv",)).check(MODEL)
    with pytest.raises(ValueError, match="weight name"):
        adapters.LRS(MODEL, ("nope",))
