"""Soft prompts and user tokens: per-user positions put before a model's tokens.

Both wrap the model's token embedding, an ``nnx.Embed`` (``self.base``), and
return ``(batch, p + t, d)`` for tokens ``(batch, t)``: each row's ``p``
per-user vectors followed by the base's token embeddings (positions ``0 ..
p-1`` are the user's, ``p .. p+t-1`` the tokens'):

* :class:`UserPromptEmbed` (``personalize(..., method="prompt")``): a soft
  prompt (prompt tuning, Lester et al. 2021) per user, ``length`` learned
  vectors of width ``d``: ``length * d`` floats per user, nothing shared;
* :class:`UserTokenEmbed` (``method="user_token"``): one user token, the
  user's embedding ``e_u (e,)`` through a shared map ``proj (e, d)``: ``e``
  floats per user (as :class:`lrs.nn.adapters.UserToken` of the pure-JAX
  transformer).

The model must accept the longer sequence. :class:`lrs.nn.nnx_model.GPT`
does: it reads ``p`` as the number of embedded positions beyond its ``t``
tokens, adds its position embeddings to the ``t`` token positions only (the
user's positions carry none, as in :func:`lrs.nn.model.apply`'s ``prefix``,
so the tokens keep positions ``0 .. t-1`` and ``t <= seq_len`` still
bounds the input), runs its causal blocks on all ``p + t`` positions (every
token attends to the whole prefix and to the tokens before it), and drops
the ``p`` prefix positions before its final norm and head: the logits keep
their shape ``(batch, t, vocab)``, and a loss over them is unchanged.

The user ids come from ``user_ids=`` or the :func:`~lrs.nn.user_state.users`
context, as for every adapter; the per-user rows are
:class:`~lrs.nn.user_state.UserTable` s, so the training step updates only
the batch's rows and the store grows, exports and checkpoints them like any
other table. Unlike the Linear adapters, a fresh prompt or user token
changes the model's output (the extra positions are attended to): it does
not start at the base model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrs.nn.user_state import (
    SharedParam,
    UserAdapter,
    UserTable,
    gather_rows,
    resolve_ids,
)
from lrs.validation import check_integer

__all__ = ["EmbedAdapter", "UserPromptEmbed", "UserTokenEmbed"]


class EmbedAdapter(UserAdapter):
    """Base of the adapters around an ``nnx.Embed`` that prepend user positions.

    A subclass defines ``length`` (the ``p`` positions it puts before the
    tokens) and ``prefix(ids)`` (``(batch, p, d)`` for the batch's ids);
    ``__call__(tokens, user_ids=None)`` returns ``concatenate([prefix(ids),
    base(tokens)], axis=1)``, ``(batch, p + t, d)``.
    """

    def _set_base(self, base, num_users) -> None:
        if not isinstance(base, nnx.Embed):
            raise ValueError(f"base must be an nnx.Embed; got {type(base).__name__}")
        check_integer("num_users", num_users, 1)
        self.base = base
        self.num_embeddings, self.features = base.num_embeddings, base.features

    @property
    def length(self) -> int:
        """The number ``p`` of positions put before the tokens."""
        raise NotImplementedError

    def prefix(self, ids) -> jax.Array:
        """The ``(batch, p, d)`` positions of the users ``ids (batch,)``."""
        raise NotImplementedError

    def user_prefix(self, user_id) -> jax.Array:
        """The ``(p, d)`` positions one user puts before the tokens."""
        return self.prefix(jnp.array([self.check_user(user_id)]))[0]

    def attend(self, query) -> jax.Array:
        """The base's ``attend`` (tied output embeddings stay the base's)."""
        return self.base.attend(query)

    def __call__(self, tokens, user_ids=None):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(
                f"tokens must be a (batch, t) integer array; got shape {tokens.shape}"
            )
        ids = resolve_ids(user_ids, tokens, self.num_users)
        x = self.base(tokens)
        return jnp.concatenate([self.prefix(ids).astype(x.dtype), x], axis=1)


class UserPromptEmbed(EmbedAdapter):
    """A soft prompt per user: ``length`` learned vectors before the tokens.

    ``prompt (num_users, length, d)`` (a :class:`~lrs.nn.user_state.UserTable`)
    starts, for every user and position, at the embedding of a token drawn
    uniformly from the vocabulary (prompt tuning's sampled-vocabulary
    initialization: the prompts start at the scale and in the span of the
    token embeddings); new users (``new_rows``) draw theirs the same way.

    Args:
      base: the wrapped ``nnx.Embed`` (``num_embeddings`` tokens of width
        ``d``), kept as ``self.base``.
      length: p >= 1 prompt positions per user.
      num_users: rows of ``prompt``.
      rngs: draws the initial tokens.
    """

    method = "prompt"
    tables = ("prompt",)

    def __init__(self, base, *, length, num_users, rngs):
        self._set_base(base, num_users)
        check_integer("length", length, 1)
        self.prompt_length = length
        self.prompt = UserTable(self._sampled(num_users, rngs))

    def _sampled(self, count, rngs):
        ids = jax.random.randint(
            rngs.params(), (count, self.prompt_length), 0, self.num_embeddings
        )
        return jnp.take(self.base.embedding[...], ids, axis=0)

    @property
    def length(self) -> int:
        """The number ``p`` of prompt positions."""
        return self.prompt_length

    def settings(self) -> dict:
        """``{"length": p}``."""
        return dict(length=self.prompt_length)

    def new_rows(self, count: int, rngs) -> dict:
        """Prompts of ``count`` new users: embeddings of tokens drawn from ``rngs``."""
        return dict(prompt=self._sampled(count, rngs))

    def prefix(self, ids) -> jax.Array:
        """The batch's prompts ``prompt[ids]``, ``(batch, p, d)``."""
        return gather_rows(self.prompt[...], ids)


class UserTokenEmbed(EmbedAdapter):
    """One user token before the tokens: ``e_u @ proj``, ``e`` floats per user.

    ``E (num_users, e)`` (a :class:`~lrs.nn.user_state.UserTable`) starts at
    zero, the shared ``proj (e, d)`` (a :class:`~lrs.nn.user_state.SharedParam`)
    i.i.d. normal with standard deviation ``1 / sqrt(e)``, as
    :class:`lrs.nn.adapters.UserToken`. A zero ``e_u`` still puts a (zero)
    position before the tokens.

    Args:
      base: the wrapped ``nnx.Embed``, kept as ``self.base``.
      embed_dim: e >= 1, floats per user.
      num_users: rows of ``E``.
      rngs: draws ``proj``.
    """

    method = "user_token"
    tables = ("E",)

    def __init__(self, base, *, embed_dim, num_users, rngs):
        self._set_base(base, num_users)
        check_integer("embed_dim", embed_dim, 1)
        dtype = base.embedding.dtype
        self.embed_dim = embed_dim
        shape = (embed_dim, self.features)
        scale = float(1 / np.sqrt(embed_dim))
        self.proj = SharedParam(scale * jax.random.normal(rngs.params(), shape, dtype))
        self.E = UserTable(jnp.zeros((num_users, embed_dim), dtype))

    @property
    def length(self) -> int:
        """One position."""
        return 1

    def settings(self) -> dict:
        """``{"embed_dim": e}``."""
        return dict(embed_dim=self.embed_dim)

    def new_rows(self, count: int, rngs=None) -> dict:
        """Zero embeddings for ``count`` new users."""
        return dict(E=jnp.zeros((count, self.embed_dim), self.E.dtype))

    def prefix(self, ids) -> jax.Array:
        """The batch's user tokens ``(E[ids] @ proj)[:, None]``, ``(batch, 1, d)``."""
        return (gather_rows(self.E[...], ids) @ self.proj[...])[:, None, :]
