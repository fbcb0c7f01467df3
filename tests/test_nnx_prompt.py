"""NNX soft prompts and user tokens (issue 17): forward, personalize, step, store."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
pytest.importorskip("orbax.checkpoint")

from lrs.nn import nnx_model, nnx_train, store  # noqa: E402
from lrs.nn.layers import (  # noqa: E402
    LRSLinear,
    UserPromptEmbed,
    UserTokenEmbed,
    adapter_layers,
    personalize,
    users,
)

pytestmark = pytest.mark.usefixtures("cheap_compiles")

TINY = nnx_model.GPTConfig(
    vocab=12, seq_len=6, d_model=16, num_heads=2, num_layers=2, d_ff=32
)
METHODS = {"prompt": dict(length=3), "user_token": dict(embed_dim=4)}
_BUILT = {}


def _base():
    """A fresh tiny GPT with random parameters drawn by numpy (NNX's eager
    init compiles op by op: seconds)."""
    if "base" not in _BUILT:
        model = nnx.eval_shape(lambda: nnx_model.GPT(TINY, rngs=nnx.Rngs(0)))
        rng = np.random.default_rng(0)
        state = jax.tree.map(
            lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
            nnx.state(model),
        )
        nnx.update(model, state)
        _BUILT["base"] = model
    return nnx.clone(_BUILT["base"])


def _gpt(method, n=5, head=False):
    """A tiny GPT with ``method`` on its token embedding (and LRS on its head)."""
    key = (method, n, head)
    if key not in _BUILT:
        model = _base()
        personalize(model, "embed", num_users=n, rngs=nnx.Rngs(1), method=method,
                    **METHODS[method])  # fmt: skip
        if head:
            personalize(model, "head", rank=2, sparsity=3, num_users=n,
                        rngs=nnx.Rngs(2))  # fmt: skip
        _BUILT[key] = model
    model = nnx.clone(_BUILT[key])
    nnx.update(model, jax.tree.map(jnp.copy, nnx.state(model)))  # steps donate
    return model


def _randomize(model, seed):
    """Random user rows (the user token's ``E`` starts at zero)."""
    for layer in adapter_layers(model).values():
        for name, table in layer.user_tables().items():
            if jnp.issubdtype(table.dtype, jnp.floating):
                key = jax.random.key(seed)
                table[...] = jax.random.normal(key, table.shape, table.dtype)


def _tokens(b=4, seed=3):
    return jax.random.randint(jax.random.key(seed), (b, TINY.seq_len), 0, TINY.vocab)


@jax.jit(static_argnums=0)
def _run(graphdef, state, tokens, ids):
    with users(ids):
        return nnx.merge(graphdef, state)(tokens)


def _forward(model, tokens, ids):
    """The jitted forward (one compile per model structure)."""
    return np.asarray(_run(*nnx.split(model), tokens, jnp.asarray(ids)))


@jax.jit(static_argnums=0)
def _pieces(graphdef, state, x, p):
    """The base model's blocks on ``x``, then norm and head after ``p``."""
    model = nnx.merge(graphdef, state)
    for block in model.blocks:
        x = block(x)
    return model.head(model.ln_f(x[:, p.shape[0] :]))


def _reference(model, tokens, ids):
    """By hand: the users' positions, then the base embeddings plus positions;
    the base blocks on all of them; norm and head on the token positions."""
    layer = model.embed
    emb = np.asarray(layer.base.embedding[...])[np.asarray(tokens)]
    if isinstance(layer, UserPromptEmbed):
        pre = np.asarray(layer.prompt[...])[ids]
    else:
        pre = (np.asarray(layer.E[...])[ids] @ np.asarray(layer.proj[...]))[:, None]
    t, p = tokens.shape[1], pre.shape[1]
    pos = np.asarray(model.pos.embedding[...])[:t]
    x = np.concatenate([pre, emb + pos], 1)
    return np.asarray(_pieces(*nnx.split(model), x, np.zeros(p)))


# --- forward ----------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_forward_equals_the_hand_built_reference(method):
    model = _gpt(method)
    _randomize(model, 4)
    tokens, ids = _tokens(), np.array([2, 0, 2, 4])
    got = _forward(model, tokens, ids)
    assert got.shape == (4, TINY.seq_len, TINY.vocab)
    np.testing.assert_allclose(got, _reference(model, tokens, ids), atol=2e-5)
    p = model.embed.length
    assert p == (3 if method == "prompt" else 1)
    x = model.embed(tokens, jnp.asarray(ids))  # the ids as an argument
    assert x.shape == (4, p + TINY.seq_len, TINY.d_model)
    np.testing.assert_allclose(x[1, :p], model.embed.user_prefix(0), atol=1e-6)
    np.testing.assert_array_equal(x[:, p:], model.embed.base(tokens))
    # the users' positions change the logits of every token
    other = _forward(model, tokens, np.array([1, 0, 3, 4]))
    assert np.all(np.abs(other[0] - got[0]).max(-1) > 0)
    np.testing.assert_array_equal(other[1], got[1])


def test_bad_tokens_and_ids_name_the_argument():
    layer = _gpt("prompt").embed
    with pytest.raises(ValueError, match="user_ids is missing"):
        layer(_tokens())
    with pytest.raises(ValueError, match="tokens"):
        layer(_tokens()[0], jnp.array([0]))
    with pytest.raises(ValueError, match=r"user_ids must lie in \[0, 5\)"):
        layer(_tokens(), jnp.array([0, 1, 5, 2]))


# --- personalize ------------------------------------------------------------


def test_personalize_replaces_exactly_the_matching_embed_paths():
    model = _base()
    embed, pos = model.embed, model.pos
    linears = {p: m for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)}
    paths = personalize(model, "embed", length=2, num_users=3, rngs=nnx.Rngs(1),
                        method="prompt")  # fmt: skip
    assert paths == ["embed"]
    assert type(model.embed) is UserPromptEmbed and model.embed.base is embed
    assert model.pos is pos and type(pos) is nnx.Embed
    after = {p: m for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)}
    assert after == linears  # every Linear untouched, at its path
    # fresh prompts are embeddings of vocabulary tokens
    vocab = np.asarray(embed.embedding[...])
    rows = np.asarray(model.embed.prompt[...]).reshape(-1, TINY.d_model)
    assert all(np.any(np.all(vocab == row, 1)) for row in rows)
    # the wrapped Embed (now embed/base) is never wrapped again
    with pytest.raises(ValueError, match=r"matches no nnx.Embed path.*'pos'"):
        personalize(model, "embed.*", num_users=3, rngs=nnx.Rngs(1),
                    method="user_token")  # fmt: skip
    # a Linear method on the same model still finds the Linears only
    assert personalize(model, "head|embed", rank=1, num_users=3,
                       rngs=nnx.Rngs(2)) == ["head"]  # fmt: skip
    assert list(adapter_layers(model)) == ["embed", "head"]
    fresh = _base()
    assert personalize(fresh, "embed|pos", num_users=3, rngs=nnx.Rngs(1),
                       method="user_token") == ["embed", "pos"]  # fmt: skip
    assert type(fresh.pos) is UserTokenEmbed and fresh.pos.E.shape == (3, 8)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(method="prompt", rank=2), "rank"),
        (dict(method="prompt", length=0), "length"),
        (dict(method="prompt", embed_dim=4), "embed_dim"),
        (dict(method="user_token", length=2), "length"),
        (dict(method="user_token", embed_dim=0), "embed_dim"),
        (dict(method="user_token", sparsity=2), "sparsity"),
        (dict(method="lrs", rank=2, length=2), "length"),
        (dict(method="prompt", num_users=0), "num_users"),
        (dict(method="prompt", targets="head"), "matches no nnx.Embed"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    args = dict(targets="embed", num_users=4, rngs=nnx.Rngs(0)) | kwargs
    with pytest.raises(ValueError, match=name):
        personalize(_base(), **args)


# --- training ---------------------------------------------------------------


def _changed_rows(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return set(np.nonzero(np.any((a != b).reshape(a.shape[0], -1), 1))[0])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_step_changes_only_the_batch_rows(method):
    model = _gpt(method, n=20, head=method == "prompt")  # prompts mixed with LRS
    config = nnx_train.StepConfig(train="adapters", user_lr=0.5, shared_lr=1e-2)
    graphdef, state, opt = nnx_train.init(model, config)
    step = nnx_train.make_step(graphdef, config, opt)
    ids = jnp.array([3, 7, 3, 11])
    tables = jax.tree.map(np.asarray, state.tables)
    frozen = jax.tree.map(np.asarray, state.frozen)
    losses = []
    for _ in range(3):
        state, loss = step(state, _tokens(), _tokens(), ids)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    flat = dict(nnx.to_flat_state(state.tables))
    for path, before in nnx.to_flat_state(tables):
        assert _changed_rows(before, flat[path][...]) <= {3, 7, 11}
    table = "prompt" if method == "prompt" else "E"
    before = dict(nnx.to_flat_state(tables))[("embed", table)]
    assert _changed_rows(before, flat[("embed", table)][...]) == {3, 7, 11}
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(state.frozen)):
        np.testing.assert_array_equal(a, b)  # the base stays frozen
    if method == "user_token":  # the shared map is trained
        assert ("embed", "proj") in dict(nnx.to_flat_state(state.shared))


# --- the store --------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_grow_export_import_and_round_trip(tmp_path, method):
    head = method == "prompt"  # prompts mixed with LRS
    model = _gpt(method, n=3, head=head)
    _randomize(model, 5)
    assert store.add_users(model, 2) == range(3, 5)
    layer = model.embed
    assert layer.num_users == 5 and isinstance(model.head, LRSLinear) == head
    if method == "prompt":  # new prompts: vocabulary embeddings
        vocab = np.asarray(layer.base.embedding[...])
        new = np.asarray(layer.prompt[3:]).reshape(-1, TINY.d_model)
        assert all(np.any(np.all(vocab == row, 1)) for row in new)
    else:
        np.testing.assert_array_equal(layer.E[3:], 0)
    rows = store.export_user(model, 1)
    key = "embed/prompt" if method == "prompt" else "embed/E"
    assert rows[key].shape == ((3, TINY.d_model) if method == "prompt" else (4,))
    store.import_user(model, 4, rows)
    for name, row in store.export_user(model, 4).items():
        np.testing.assert_array_equal(row, rows[name])
    np.testing.assert_array_equal(layer.user_prefix(4), layer.user_prefix(1))
    with pytest.raises(ValueError, match=key):
        store.import_user(model, 0, rows | {key: np.zeros(2)})
    store.save(model, tmp_path / "ck")
    other = _gpt(method, n=3, head=head)
    store.add_users(other, 2)
    store.load(other, tmp_path / "ck")
    for a, b in zip(
        jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(other))
    ):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    tokens, ids = _tokens(5), jnp.arange(5)
    np.testing.assert_array_equal(
        _forward(model, tokens, ids), _forward(other, tokens, ids)
    )
    if method == "user_token":  # a prompt does not load as a user token
        prompt = _base()
        personalize(prompt, "embed", length=1, num_users=5, rngs=nnx.Rngs(1),
                    method="prompt")  # fmt: skip
        with pytest.raises(ValueError, match="layers differ"):
            store.load(prompt, tmp_path / "ck")
