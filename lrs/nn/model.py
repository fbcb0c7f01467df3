"""A small pre-LN transformer for sequence classification; parameters are a pytree.

``apply`` runs one user's weights on ``(s, T)`` token sequences. Personalization
enters through two optional arguments, so every adapter in :mod:`lrs.nn` shares
this one forward pass:

* ``deltas``: ``{name: (p, q)}`` added to the named weight matrices
  (``"block{l}/qkv"``, ``"block{l}/attn_out"``, ``"block{l}/mlp_in"``,
  ``"block{l}/mlp_out"``, ``"head"``);
* ``prefix``: ``(P, d_model)`` embeddings prepended to the token embeddings
  (soft prompts, user tokens).

``vmap`` over users (with per-user ``deltas``/``prefix``) gives a batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from lrs.validation import check_integer

__all__ = ["TransformerConfig", "apply", "init", "weight_names", "weight_shape"]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes of the transformer (hashable: a static argument under jit).

    Attributes:
      vocab: number of token ids V.
      seq_len: maximum sequence length T.
      num_classes: classes C of the head.
      d_model: width d.
      num_heads: attention heads (divides ``d_model``).
      num_layers: transformer blocks L.
      d_ff: hidden width of the MLP.
      init_scale: multiplies the standard deviation of the initial weights.
    """

    vocab: int = 16
    seq_len: int = 8
    num_classes: int = 4
    d_model: int = 32
    num_heads: int = 4
    num_layers: int = 2
    d_ff: int = 64
    init_scale: float = 1.0

    def __post_init__(self):
        for name in ("vocab", "seq_len", "num_classes", "d_model", "num_heads"):
            check_integer(name, getattr(self, name), 1)
        for name in ("num_layers", "d_ff"):
            check_integer(name, getattr(self, name), 0)
        if self.d_model % self.num_heads:
            raise ValueError(
                f"num_heads must divide d_model = {self.d_model}; "
                f"got num_heads = {self.num_heads}"
            )
        if not self.init_scale > 0:
            raise ValueError(f"init_scale must be > 0; got {self.init_scale!r}")


def weight_names(config: TransformerConfig) -> tuple[str, ...]:
    """Names of the weight matrices that ``deltas`` may address."""
    names = []
    for layer in range(config.num_layers):
        names += [f"block{layer}/{w}" for w in ("qkv", "attn_out", "mlp_in", "mlp_out")]
    return tuple(names) + ("head",)


def weight_shape(config: TransformerConfig, name: str) -> tuple[int, int]:
    """``(p, q)`` of the weight matrix ``name`` (ValueError for an unknown name)."""
    d, f = config.d_model, config.d_ff
    shapes = {"qkv": (d, 3 * d), "attn_out": (d, d), "mlp_in": (d, f)}
    shapes.update(mlp_out=(f, d))
    if name == "head":
        return (d, config.num_classes)
    if name in weight_names(config):
        return shapes[name.split("/")[1]]
    raise ValueError(f"weight name must be one of {weight_names(config)}; got {name!r}")


def _dense(key, p, q, scale, dtype):
    return scale * jax.random.normal(key, (p, q), dtype) / jnp.sqrt(p).astype(dtype)


def init(key: jax.Array, config: TransformerConfig, dtype=None) -> dict:
    """Random parameters: a dict pytree (weights ``(p, q)``, biases ``(q,)``).

    ``dtype`` defaults to JAX's default float (float64 under ``jax_enable_x64``).
    """
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64 if dtype is None else dtype)
    d, s = config.d_model, config.init_scale
    keys = jax.random.split(key, 3 + config.num_layers)
    ones, zeros = jnp.ones(d, dtype), jnp.zeros(d, dtype)
    blocks = []
    for layer in range(config.num_layers):
        k = jax.random.split(keys[3 + layer], 4)
        blocks.append(
            dict(
                ln1_g=ones,
                ln1_b=zeros,
                qkv=_dense(k[0], d, 3 * d, s, dtype),
                attn_out=_dense(k[1], d, d, s, dtype),
                ln2_g=ones,
                ln2_b=zeros,
                mlp_in=_dense(k[2], d, config.d_ff, s, dtype),
                mlp_in_b=jnp.zeros(config.d_ff, dtype),
                mlp_out=_dense(k[3], config.d_ff, d, s, dtype),
                mlp_out_b=zeros,
            )
        )
    return dict(
        embed=s * jax.random.normal(keys[0], (config.vocab, d), dtype),
        pos=0.5 * s * jax.random.normal(keys[1], (config.seq_len, d), dtype),
        blocks=blocks,
        lnf_g=ones,
        lnf_b=zeros,
        head=_dense(keys[2], d, config.num_classes, s, dtype),
        head_b=jnp.zeros(config.num_classes, dtype),
    )


def _layer_norm(x, g, b):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * g + b


def _attention(x, qkv, out, num_heads):
    """Multi-head self-attention (no mask) of ``x (s, T, d)``."""
    s, t, d = x.shape
    q, k, v = jnp.split(x @ qkv, 3, axis=-1)
    heads = lambda a: a.reshape(s, t, num_heads, d // num_heads)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    scores = jnp.einsum("sthe,suhe->shtu", q, k) / jnp.sqrt(d // num_heads)
    mixed = jnp.einsum("shtu,suhe->sthe", jax.nn.softmax(scores, axis=-1), v)
    return mixed.reshape(s, t, d) @ out


def apply(
    params: dict,
    tokens: jax.Array,
    config: TransformerConfig,
    *,
    deltas: Mapping[str, jax.Array] | None = None,
    prefix: jax.Array | None = None,
) -> jax.Array:
    """Class logits ``(s, C)`` of token sequences ``tokens (s, T)`` (int).

    Args:
      params: from :func:`init`.
      tokens: ``(s, T')`` token ids, ``T' <= seq_len``.
      config: the model's sizes.
      deltas: ``{name: (p, q)}`` added to the named weights (one user's).
      prefix: ``(P, d_model)`` embeddings put before the tokens (one user's).

    The head reads the mean of the final hidden states over all positions.
    """
    deltas = {} if deltas is None else deltas

    def w(block, name, full):
        return block[name] + deltas[full] if full in deltas else block[name]

    x = params["embed"][tokens] + params["pos"][: tokens.shape[-1]]
    if prefix is not None:
        x = jnp.concatenate(
            [jnp.broadcast_to(prefix, (x.shape[0],) + prefix.shape), x], 1
        )
    for layer, block in enumerate(params["blocks"]):
        name = f"block{layer}/"
        h = _layer_norm(x, block["ln1_g"], block["ln1_b"])
        x = x + _attention(
            h,
            w(block, "qkv", name + "qkv"),
            w(block, "attn_out", name + "attn_out"),
            config.num_heads,
        )
        h = _layer_norm(x, block["ln2_g"], block["ln2_b"])
        h = jax.nn.gelu(h @ w(block, "mlp_in", name + "mlp_in") + block["mlp_in_b"])
        x = x + h @ w(block, "mlp_out", name + "mlp_out") + block["mlp_out_b"]
    pooled = _layer_norm(x, params["lnf_g"], params["lnf_b"]).mean(1)
    return pooled @ w(params, "head", "head") + params["head_b"]
