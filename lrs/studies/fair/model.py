"""The study's classifier: the NNX GPT's blocks, mean pooling, a linear head."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp
from flax import nnx

from lrs.nn.nnx_model import Block, GPTConfig

if TYPE_CHECKING:
    from lrs.studies.fair.setup import Setup


class Classifier(nnx.Module):
    """Sequence classifier: the NNX GPT's blocks, mean pooling, a linear head.

    ``embed`` (tokens) and ``pos`` (positions) are ``nnx.Embed`` s, the blocks
    :class:`lrs.nn.nnx_model.Block` (paths ``blocks/{l}/attn/{q,k,v,o}``,
    ``blocks/{l}/mlp/{up,down}``), then the mean over the token positions, a
    layer norm (:meth:`features`) and ``head`` (``d_model -> num_classes``).
    As :class:`lrs.nn.nnx_model.GPT`, it accepts an embedding adapter that
    puts ``p`` user positions before the tokens (soft prompt, user token):
    position embeddings go to the tokens only, every token attends to the
    prefix (the blocks are causal and the prefix comes first), and the prefix
    is dropped before pooling.
    """

    def __init__(self, setup: Setup, *, rngs):
        config = GPTConfig(
            vocab=setup.vocab,
            seq_len=setup.seq_len,
            d_model=setup.d_model,
            num_heads=setup.num_heads,
            num_layers=setup.num_layers,
            d_ff=setup.d_ff,
        )
        d = config.d_model
        self.embed = nnx.Embed(config.vocab, d, rngs=rngs)
        self.pos = nnx.Embed(config.seq_len, d, rngs=rngs)
        self.blocks = nnx.List(
            [
                Block(config, dtype=jnp.float32, rngs=rngs)
                for _ in range(config.num_layers)
            ]
        )
        self.ln_f = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, setup.num_classes, rngs=rngs)

    def features(self, tokens):
        """Pooled, normalized features ``(batch, d_model)`` of ``tokens (batch, t)``."""
        t = tokens.shape[-1]
        x = self.embed(tokens)
        p = x.shape[-2] - t  # positions an embedding adapter put before the tokens
        pos = self.pos(jnp.arange(t))
        x = x + (jnp.pad(pos, ((p, 0), (0, 0))) if p else pos)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x[:, p:].mean(1))

    def __call__(self, tokens):
        return self.head(self.features(tokens))


def make_rngs(key) -> nnx.Rngs:
    """``nnx.Rngs`` whose ``params`` stream starts at ``key``."""
    return nnx.Rngs(params=key)
