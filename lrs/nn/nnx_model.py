"""Small Flax NNX models to personalize: a GPT-style transformer and an MLP.

They know nothing about users; :func:`lrs.nn.personalize` wraps their
``nnx.Linear`` s (and the GPT's token ``nnx.Embed``), and the user ids reach
the wrapped layers through ``with lrs.nn.users(ids):`` around the call.
Random initialization only.

Linear paths of :class:`GPT` (for ``personalize``'s ``targets``):
``blocks/{l}/attn/{q,k,v,o}``, ``blocks/{l}/mlp/{up,down}`` and ``head``;
its ``nnx.Embed`` s: ``embed`` (tokens) and ``pos`` (positions).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lrs.validation import check_integer

__all__ = ["GPT", "GPTConfig", "MLP", "next_token_loss"]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Sizes of :class:`GPT` (vocabulary V, context T, width d, L blocks)."""

    vocab: int = 64
    seq_len: int = 16
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    d_ff: int = 256

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check_integer(field.name, getattr(self, field.name), 1)
        if self.d_model % self.num_heads:
            raise ValueError(
                f"num_heads must divide d_model = {self.d_model}; "
                f"got num_heads = {self.num_heads}"
            )


class Attention(nnx.Module):
    """Causal multi-head self-attention with ``q, k, v, o`` ``nnx.Linear`` s."""

    def __init__(self, d, num_heads, *, dtype, rngs):
        self.num_heads = num_heads
        for name in ("q", "k", "v", "o"):
            setattr(self, name, nnx.Linear(d, d, param_dtype=dtype, rngs=rngs))

    def __call__(self, x):
        b, t, d = x.shape
        h = self.num_heads

        def heads(a):
            return a.reshape(b, t, h, d // h)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = jnp.einsum("bthe,buhe->bhtu", q, k) / jnp.sqrt(d // h).astype(x.dtype)
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        mixed = jnp.einsum("bhtu,buhe->bthe", jax.nn.softmax(scores, -1), v)
        return self.o(mixed.reshape(b, t, d))


class FeedForward(nnx.Module):
    def __init__(self, d, d_ff, *, dtype, rngs):
        self.up = nnx.Linear(d, d_ff, param_dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(d_ff, d, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
    """Pre-LN transformer block."""

    def __init__(self, config: GPTConfig, *, dtype, rngs):
        d = config.d_model
        self.ln1 = nnx.LayerNorm(d, param_dtype=dtype, rngs=rngs)
        self.attn = Attention(d, config.num_heads, dtype=dtype, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, param_dtype=dtype, rngs=rngs)
        self.mlp = FeedForward(d, config.d_ff, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nnx.Module):
    """A decoder-only language model: ``tokens (b, t)`` -> logits ``(b, t, V)``.

    ``embed`` (the token ``nnx.Embed``) may return more positions than there
    are tokens: ``(b, p + t, d)``, ``p`` per-user positions followed by the
    ``t`` token embeddings (a soft prompt or a user token,
    :mod:`lrs.nn.prompt_layers`, wrapped by ``personalize(model, "embed",
    method="prompt" | "user_token", ...)``). The model then adds its
    position embeddings to the ``t`` token positions only (they keep
    positions ``0 .. t-1``, and ``t <= seq_len`` still bounds the input),
    runs the causal blocks on all ``p + t`` positions (each token attends to
    the whole prefix and the tokens up to it) and drops the ``p`` prefix
    positions before ``ln_f`` and ``head``, so the logits keep their shape
    ``(b, t, V)``. With ``p = 0`` this is the plain model.
    """

    def __init__(self, config: GPTConfig, *, rngs, dtype=jnp.float32):
        self.config = config
        d = config.d_model
        self.embed = nnx.Embed(config.vocab, d, param_dtype=dtype, rngs=rngs)
        self.pos = nnx.Embed(config.seq_len, d, param_dtype=dtype, rngs=rngs)
        self.blocks = nnx.List(
            [Block(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)]
        )
        self.ln_f = nnx.LayerNorm(d, param_dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(d, config.vocab, param_dtype=dtype, rngs=rngs)

    def __call__(self, tokens):
        t = tokens.shape[-1]
        if t > self.config.seq_len:
            raise ValueError(
                f"tokens must have at most seq_len = {self.config.seq_len} "
                f"positions; got shape {tokens.shape}"
            )
        x = self.embed(tokens)
        p = x.shape[-2] - t  # positions an embedding adapter put before the tokens
        pos = self.pos(jnp.arange(t))
        x = x + (jnp.pad(pos, ((p, 0), (0, 0))) if p else pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, p:] if p else x))


class MLP(nnx.Module):
    """``sizes[0] -> ... -> sizes[-1]`` with GELU; linears at ``layers/{i}``."""

    def __init__(self, sizes, *, rngs, dtype=jnp.float32):
        if len(sizes) < 2:
            raise ValueError(f"sizes must list at least 2 widths; got {sizes!r}")
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, param_dtype=dtype, rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:])
            ]
        )

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.gelu(layer(x))
        return self.layers[-1](x)


def next_token_loss(logits, tokens) -> jax.Array:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``."""
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)
    return -picked.mean()
