"""User-level DP training of a personalized NNX model's shared parameters
(lrs.nn.dp): the accounting, the clipping bound on one user's effect, local
user rows, and that training still learns."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import nnx  # noqa: E402

from lrs.nn import dp, layers, nnx_model  # noqa: E402
from lrs.private import accounting  # noqa: E402

pytestmark = pytest.mark.usefixtures("cheap_compiles")

N, M, D_IN, D_OUT = 40, 8, 6, 3


def _model(seed=0, dtype=jnp.float32):
    model = nnx_model.MLP((D_IN, D_OUT), rngs=nnx.Rngs(seed), dtype=dtype)
    layers.personalize(
        model, "layers/0", rank=2, sparsity=1, num_users=N, rngs=nnx.Rngs(seed + 1)
    )
    # V starts at 0, where U has no gradient; start the users somewhere.
    layer = model.layers[0]
    layer.V[...] = jax.random.normal(jax.random.key(seed + 2), layer.V.shape, dtype)
    return model


def _data(seed=0, dtype=jnp.float32):
    """A planted task: y = x @ (W + U v_u) with a shared U, per-user v_u."""
    k = jax.random.split(jax.random.key(seed), 4)
    W = jax.random.normal(k[0], (D_IN, D_OUT))
    U = jax.random.normal(k[1], (2, D_IN, D_OUT))
    V = jax.random.normal(k[2], (N, 2))
    x = jax.random.normal(k[3], (N, M, D_IN))
    y = jnp.einsum("umi,uio->umo", x, W + jnp.einsum("ur,rio->uio", V, U))
    return x.astype(dtype), y.astype(dtype)


def test_config_errors_name_the_argument():
    for kwargs, name in [
        (dict(epsilon=0.0), "epsilon"),
        (dict(delta=1.5), "delta"),
        (dict(steps=0), "steps"),
        (dict(users_per_step=1.5), "users_per_step"),
        (dict(clip_norm=0.0), "clip_norm"),
        (dict(train="base"), "train"),
    ]:
        with pytest.raises(ValueError, match=name):
            dp.DPTrainConfig(**kwargs)


def test_numbers_may_be_numpy_but_not_bools():
    config = dp.DPTrainConfig(
        epsilon=np.float32(2.0), delta=np.float64(1e-5), steps=np.int64(3),
        users_per_step=np.int32(4), clip_norm=np.float32(1.0),
    )  # fmt: skip
    assert config.steps == 3
    for kwargs in (dict(epsilon=True), dict(clip_norm=True), dict(steps=True)):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            dp.DPTrainConfig(**kwargs)
    with pytest.raises(ValueError, match="user_lr"):
        dp.DPTrainConfig(user_lr=-1.0)


def test_bad_layouts_and_unrepresentable_clips_are_refused_by_name():
    model, (x, y) = _model(), _data()
    config = dp.DPTrainConfig(steps=1, users_per_step=4)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="same m examples"):
        dp.train_shared_private(model, x, y[:, :3], config, key=key)
    with pytest.raises(ValueError, match="m >= 1"):
        dp.train_shared_private(model, x[:, :0], y[:, :0], config, key=key)
    with pytest.raises(ValueError, match="targets"):
        dp.train_shared_private(model, x, y[:, :, 0], config, key=key)
    huge = dp.DPTrainConfig(steps=1, users_per_step=4, clip_norm=1e39)
    with pytest.raises(ValueError, match="clip_norm"):
        dp.train_shared_private(model, x, y, huge, key=key)  # float32 parameters


def test_a_user_with_non_finite_data_keeps_a_finite_row():
    model, (x, y) = _model(), _data()
    x = x.at[3, 0, 0].set(jnp.nan).at[5].multiply(1e30)
    config = dp.DPTrainConfig(steps=3, users_per_step=N, user_lr=0.5)
    dp.train_shared_private(model, x, y, config, key=jax.random.key(6))
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        assert np.all(np.isfinite(np.asarray(leaf)))
    for leaf in jax.tree.leaves(nnx.state(model, layers.UserTable)):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_a_key_is_required_and_inputs_must_cover_every_user():
    model, (x, y) = _model(), _data()
    config = dp.DPTrainConfig(steps=1, users_per_step=4)
    with pytest.raises(ValueError, match="key"):
        dp.train_shared_private(model, x, y, config, key=None)
    with pytest.raises(ValueError, match="inputs"):
        dp.train_shared_private(model, x[:5], y[:5], config, key=jax.random.key(0))


def test_the_training_spends_its_epsilon():
    model, (x, y) = _model(), _data()
    config = dp.DPTrainConfig(epsilon=2.0, steps=3, users_per_step=10)
    result = dp.train_shared_private(model, x, y, config, key=jax.random.key(1))
    assert result.accountant == "rdp" and result.sampling_rate == 10 / N
    assert 1.9 <= result.epsilon <= 2.0
    assert result.noise_multiplier > 0
    assert result.nonprivate_losses is None  # nothing exact by default


def _release(model, x, y, *, z, clip=1.0, noise_key=5):
    """The released mean gradient of one step with every user in the batch."""
    graphdef, itabs, ftabs, shared, frozen = nnx.split(
        model, layers.UserSupport, dp._FLOAT_TABLE, layers.SharedParam, ...
    )
    config = dp.DPTrainConfig(steps=1, users_per_step=N, clip_norm=clip)
    import optax

    opt = optax.sgd(0.0)
    step = dp._make_step(graphdef, opt, dp._mse, config, z, N)
    normals = dp._normals(jax.random.key(noise_key), shared)
    state = (itabs, ftabs, shared, opt.init(shared))
    _, (_, released) = step(state, frozen, x, y, jax.random.key(3), normals)
    return released


@pytest.mark.parametrize("scale", [1e3, 1e30])
def test_one_replaced_user_moves_the_sum_by_at_most_twice_the_clip(scale):
    model, (x, y) = _model(), _data()
    # user 0 replaced by another user's data, labels flipped, scaled (1e30:
    # its gradient overflows float32 and must weigh exactly 0)
    x2, y2 = x.at[0].set(scale * x[1]), y.at[0].set(-scale * y[1])
    a = _release(model, x, y, z=0.0)
    b = _release(model, x2, y2, z=0.0)
    diff = math.sqrt(
        sum(float(jnp.sum((p - q) ** 2)) for p, q in
            zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    )  # fmt: skip
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(b))
    assert diff * N <= 2.0 * 1.0 * (1 + 1e-5)
    assert diff > 0


def test_the_noise_has_the_calibrated_scale():
    model, (x, y) = _model(), _data()
    quiet = _release(model, x, y, z=0.0)
    noise = []
    for seed in range(6):  # each release compiles its step: few of them
        loud = _release(model, x, y, z=3.0, noise_key=seed)
        noise += [
            np.ravel(p - q) * N  # the sum's noise
            for p, q in zip(jax.tree.leaves(loud), jax.tree.leaves(quiet), strict=True)
        ]
    noise = np.concatenate(noise)
    assert noise.size == 6 * 2 * D_IN * D_OUT
    assert abs(noise.std() / (2 * 3.0 * 1.0) - 1) < 0.15  # 3 standard errors


def test_users_rows_stay_local_and_training_learns_without_noise():
    model, (x, y) = _model(), _data()
    before = jax.tree.map(np.asarray, nnx.state(model, layers.UserTable))
    config = dp.DPTrainConfig(
        epsilon=math.inf, steps=60, users_per_step=N, learning_rate=3e-2,
        user_lr=0.05, clip_norm=1e6,
    )  # fmt: skip
    result = dp.train_shared_private(
        model, x, y, config, key=jax.random.key(2), nonprivate_losses=True
    )
    assert result.epsilon == math.inf
    losses = result.nonprivate_losses
    assert float(losses[-1]) < 0.5 * float(losses[0])
    after = nnx.state(model, layers.UserTable)
    support = [
        (a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
        if a.dtype == np.int32
    ]  # fmt: skip
    for a, b in support:  # the sparse supports are not re-selected
        np.testing.assert_array_equal(a, b)


def test_private_training_at_epsilon_8_still_learns():
    model, (x, y) = _model(), _data()
    config = dp.DPTrainConfig(
        epsilon=8.0, steps=60, users_per_step=N, learning_rate=3e-2, clip_norm=5.0
    )
    result = dp.train_shared_private(
        model, x, y, config, key=jax.random.key(4), nonprivate_losses=True
    )
    assert result.epsilon <= 8.0
    losses = result.nonprivate_losses
    assert float(losses[-5:].mean()) < float(losses[:5].mean())


def test_the_audit_of_one_step_stays_below_its_claim():
    from lrs.audit import audit_nn_dp_step

    honest = audit_nn_dp_step(4.0, trials=20_000, key=jax.random.key(0))
    assert not honest.flagged
    assert 1.0 < honest.bound.epsilon <= honest.epsilon_claimed  # the audit has power
    assert abs(honest.sensitivity_used - 2.0) < 0.05  # the canary flips its gradient


@pytest.mark.slow
def test_the_audit_of_one_step_catches_half_the_noise():
    from lrs.audit import audit_nn_dp_step

    broken = audit_nn_dp_step(
        4.0, trials=50_000, fault="half_noise", key=jax.random.key(0)
    )
    assert broken.flagged


def test_infinite_epsilon_is_plain_non_private_training():
    """epsilon=inf: no clipping, no noise: one step is Adam on the mean over
    users of each user's mean-loss gradient (computed here by hand)."""
    import optax

    model, (x, y) = _model(), _data()
    graphdef, tables, shared, rest = nnx.split(
        model, layers.UserTable, layers.SharedParam, ...
    )

    def loss(s):
        def one(u):
            m = nnx.merge(graphdef, tables, s, rest)
            with layers.users(jnp.full((M,), u, jnp.int32)):
                return dp._mse(m(x[u]), y[u])

        return jnp.mean(jax.vmap(one)(jnp.arange(N)))

    opt = optax.adam(1e-2)
    g = jax.grad(loss)(shared)
    expected = optax.apply_updates(shared, opt.update(g, opt.init(shared), shared)[0])
    config = dp.DPTrainConfig(
        epsilon=math.inf, steps=1, users_per_step=N, learning_rate=1e-2,
        user_lr=0.0, clip_norm=1e-3,  # no clipping at inf, however small
    )  # fmt: skip
    dp.train_shared_private(model, x, y, config, key=jax.random.key(0))
    got = nnx.state(model, layers.SharedParam)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_sweep_over_epsilon_compiles_one_step_and_calibrates_once():
    model, (x, y) = _model(), _data()
    accounting._calibrate.cache_clear()
    before = dp._cached_step.cache_info()
    for eps in (2.0, 4.0, 2.0):
        config = dp.DPTrainConfig(epsilon=eps, steps=2, users_per_step=N)
        result = dp.train_shared_private(model, x, y, config, key=jax.random.key(1))
        assert result.epsilon <= eps
    after = dp._cached_step.cache_info()
    assert after.misses - before.misses <= 1 and after.hits - before.hits >= 2
    assert accounting._calibrate.cache_info().misses == 2  # eps 2 calibrated once
