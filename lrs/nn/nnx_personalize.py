"""``personalize``: wrap a model's ``nnx.Linear`` s or ``nnx.Embed`` s by path.

:func:`personalize` replaces every module of a model whose path matches a
regular expression by a per-user adapter around it, in place, and returns
the replaced paths. Linear methods wrap ``nnx.Linear`` s
(:mod:`lrs.nn.lrs_linear`, :mod:`lrs.nn.baseline_layers`); embedding
methods wrap ``nnx.Embed`` s (:mod:`lrs.nn.prompt_layers`).
:func:`adapter_layers` lists a model's adapters by path (what the training
step and the store work on).
"""

from __future__ import annotations

import re

from flax import nnx

from lrs.nn.baseline_layers import PLoRALinear, UserHeadLinear, UserLoRALinear
from lrs.nn.lrs_linear import LRSLinear
from lrs.nn.prompt_layers import UserPromptEmbed, UserTokenEmbed
from lrs.nn.user_state import UserAdapter

__all__ = [
    "EMBED_METHODS",
    "LINEAR_METHODS",
    "METHODS",
    "adapter_layers",
    "embed_paths",
    "linear_paths",
    "personalize",
    "set_child",
]

LINEAR_METHODS = ("lrs", "lora", "head", "user_lora")
EMBED_METHODS = ("prompt", "user_token")
METHODS = LINEAR_METHODS + EMBED_METHODS


def _path_str(path) -> str:
    return "/".join(str(p) for p in path)


def adapter_layers(model) -> dict:
    """``{path: adapter}`` for every personalized layer of ``model`` (sorted)."""
    found = {
        _path_str(p): m for p, m in nnx.iter_graph(model) if isinstance(m, UserAdapter)
    }
    return dict(sorted(found.items()))


def set_child(model, path, module):
    """Replaces the node at ``path`` (a tuple of keys) of ``model`` by ``module``."""
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = module
    else:
        setattr(parent, path[-1], module)


def _paths(model, kind) -> list[str]:
    return sorted(_path_str(p) for p, m in nnx.iter_graph(model) if isinstance(m, kind))


def linear_paths(model) -> list[str]:
    """The ``/``-joined paths of every ``nnx.Linear`` in ``model`` (sorted)."""
    return _paths(model, nnx.Linear)


def embed_paths(model) -> list[str]:
    """The ``/``-joined paths of every ``nnx.Embed`` in ``model`` (sorted)."""
    return _paths(model, nnx.Embed)


def _check_options(method, rank, sparsity, embed_dim, length, plora) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if method != "lrs" and sparsity:
        raise ValueError(f"sparsity must be 0 for method={method!r}; got {sparsity!r}")
    takes_rank = method in ("lrs", "lora", "user_lora")
    if not takes_rank and rank is not None:
        raise ValueError(f"rank does not apply to method={method!r}; got {rank!r}")
    if takes_rank and rank is None:
        raise ValueError(f"rank is required for method={method!r}")
    if method not in ("user_lora", "user_token") and embed_dim is not None:
        raise ValueError(
            f"embed_dim applies to method='user_lora' or 'user_token' only; "
            f"got {embed_dim!r}"
        )
    if method != "prompt" and length is not None:
        raise ValueError(f"length applies to method='prompt' only; got {length!r}")
    for name, value in plora.items():
        if method != "user_lora" and value is not None:
            raise ValueError(
                f"{name} applies to method='user_lora' only; got {value!r}"
            )


def _wrap(method, base, *, rank, sparsity, embed_dim, length, plora, num_users, rngs):
    kw = dict(num_users=num_users, rngs=rngs)
    embed_dim = 8 if embed_dim is None else embed_dim
    if method == "lrs":
        return LRSLinear(base, rank=rank, sparsity=sparsity, **kw)
    if method == "lora":
        return UserLoRALinear(base, rank=rank, **kw)
    if method == "head":
        return UserHeadLinear(base, **kw)
    if method == "user_lora":
        given = {k: v for k, v in plora.items() if v is not None}
        return PLoRALinear(base, rank=rank, embed_dim=embed_dim, **given, **kw)
    if method == "prompt":
        return UserPromptEmbed(base, length=1 if length is None else length, **kw)
    return UserTokenEmbed(base, embed_dim=embed_dim, **kw)


def personalize(
    model,
    targets: str,
    *,
    num_users,
    rngs,
    method="lrs",
    rank=None,
    sparsity=0,
    embed_dim=None,
    length=None,
    dropout=None,
    user_dropout=None,
) -> list[str]:
    """Wraps every module of ``method`` 's kind whose path matches ``targets``.

    Linear methods (``"lrs"``, ``"lora"``, ``"head"``, ``"user_lora"``) wrap
    ``nnx.Linear`` s; embedding methods (``"prompt"``, ``"user_token"``) wrap
    ``nnx.Embed`` s (the model's token embedding), in place.

    A path is the attribute names and list indices from ``model`` joined by
    ``/`` (``"blocks/0/attn/q"``); it matches when ``re.fullmatch(targets,
    path)`` does (as PEFT's ``target_modules`` regex), so ``".*attn/(q|v)"``
    picks every block's query and value maps, and ``"embed"`` the token
    embedding of :class:`~lrs.nn.nnx_model.GPT` (not ``"pos"``, its position
    embedding). Modules already inside an adapter are never wrapped again. A
    module shared by several paths (tied weights) is visited once, at its
    first path, and replaced there only.

    Methods (per-user cost for a layer ``(in, out)`` or an embedding of width
    ``d``, floats unless noted):

    * ``"lrs"``: :class:`~lrs.nn.lrs_linear.LRSLinear`, ``r + k`` and ``k``
      int32; shared ``U`` (``r`` copies of the kernel);
    * ``"lora"``: :class:`~lrs.nn.baseline_layers.UserLoRALinear`,
      ``r (in + out)``;
    * ``"head"``: :class:`~lrs.nn.baseline_layers.UserHeadLinear`, ``in * out``;
    * ``"user_lora"``: :class:`~lrs.nn.baseline_layers.PLoRALinear` (PLoRA),
      ``e``; shared ``A``, ``B``, ``P``;
    * ``"prompt"``: :class:`~lrs.nn.prompt_layers.UserPromptEmbed`, a soft
      prompt of ``length`` positions, ``length * d``;
    * ``"user_token"``: :class:`~lrs.nn.prompt_layers.UserTokenEmbed`, one
      position ``e_u @ proj``, ``e``; shared ``proj (e, d)``.

    The embedding methods lengthen the embedded sequence by the user's
    positions; the model must accept that (:class:`~lrs.nn.nnx_model.GPT`
    does, see :mod:`lrs.nn.prompt_layers`).

    Args:
      model: any ``nnx.Module``.
      targets: the regular expression.
      num_users: rows of every per-user table.
      rngs: ``nnx.Rngs`` for the new factors.
      method: one of :data:`METHODS`.
      rank: r >= 1 (LRS: shared directions; LoRA: per-user rank; PLoRA:
        shared rank); must be None for the other methods.
      sparsity: k >= 0 sparse entries per user (``method="lrs"`` only).
      embed_dim: e >= 1, the user embedding of ``"user_lora"`` and
        ``"user_token"`` (default 8).
      length: p >= 1, the positions of a ``"prompt"`` (default 1).
      dropout: ``"user_lora"`` only: PLoRA's input and embedding dropout
        rate (default 0.1, :class:`~lrs.nn.baseline_layers.PLoRALinear`).
      user_dropout: ``"user_lora"`` only: PLoRA's personalized dropout
        (PDropout) rate (default 0).

    Returns:
      The sorted list of replaced paths.

    Raises:
      ValueError: an unknown ``method``, an option the method does not take,
        bad sizes, or no module of the method's kind matches ``targets``.
    """
    plora = dict(dropout=dropout, user_dropout=user_dropout)
    _check_options(method, rank, sparsity, embed_dim, length, plora)
    kind = nnx.Linear if method in LINEAR_METHODS else nnx.Embed
    pattern = re.compile(targets)
    inside = {p for p, m in nnx.iter_graph(model) if isinstance(m, UserAdapter)}
    found = [
        (path, m)
        for path, m in nnx.iter_graph(model)
        if isinstance(m, kind)
        and path
        and not any(path[: len(q)] == q for q in inside)
        and pattern.fullmatch(_path_str(path))
    ]
    if not found:
        raise ValueError(
            f"targets {targets!r} matches no nnx.{kind.__name__} path of the "
            f"model; {kind.__name__} paths: {_paths(model, kind)}"
        )
    opts = dict(
        rank=rank, sparsity=sparsity, embed_dim=embed_dim, length=length, plora=plora
    )
    for path, base in sorted(found, key=lambda pm: _path_str(pm[0])):
        new = _wrap(method, base, num_users=num_users, rngs=rngs, **opts)
        set_child(model, path, new)
    return sorted(_path_str(p) for p, _ in found)
