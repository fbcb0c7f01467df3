"""The methods and their sizes, wrapping a classifier for one, and its storage."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from lrs.nn.baseline_layers import UserHeadLinear
from lrs.nn.bias_layers import UserBiasLinear
from lrs.nn.nnx_personalize import adapter_layers, set_child
from lrs.nn.nnx_personalize import personalize as wrap
from lrs.nn.user_state import SharedParam, UserSupport
from lrs.studies.fair.model import make_rngs

#: Rank and sparsity (per personalized layer) of the ``lrs`` teacher.
TEACHER_RANK, TEACHER_SPARSITY = 2, 4
#: The student's default LRS size (``lrs.nn`` docs): not the teacher's.
STUDENT_DEFAULT = (4, 8)


def linear_targets(num_layers: int) -> str:
    """The layers the weight-space methods personalize (and the ``lrs`` teacher
    moves): the last block's MLP output map and the head."""
    return rf"blocks/{num_layers - 1}/mlp/down|head"


@dataclasses.dataclass(frozen=True)
class Method:
    """One method at one size.

    Attributes:
      name: ``lrs``, ``lora``, ``user_lora`` (PLoRA's layer, trained as every
        other method), ``plora`` (PLoRA as published: the same layer with its
        dropouts, PDropout and the MI term, :mod:`lrs.studies.fair.plora`),
        ``prompt``,
        ``user_token``, ``head`` (per-user head), ``class_bias``, ``full``
        (dense per-user deltas on the personalized layers) or ``global``
        (the pretrained base, nothing per user).
      size: the size label (``r2k4``, ``r4``, ``e8``, ``p2``, ...).
      options: keyword arguments of :func:`lrs.nn.personalize` (or of the
        class-bias / dense wrappers).
      middle: the size kept when a sweep is cut to one size per method.
      zero_shot: whether a new user's initial rows give the no-user model
        (a zero-shot row is reported then).
      mi: the weight of PLoRA's mutual-information term (``plora`` only).
    """

    name: str
    size: str
    options: tuple = ()
    middle: bool = False
    zero_shot: bool = True
    mi: float = 0.0

    @property
    def stochastic(self) -> bool:
        """Whether training draws dropout masks (a key per seed and step)."""
        return self.name == "plora"

    @property
    def label(self) -> str:
        """``name:size``."""
        return f"{self.name}:{self.size}" if self.size else self.name


#: PLoRA as published (the ``plora`` rows): the LoRA dropout of the authors'
#: configurations, a PDropout rate and the MI weight (fixed, not tuned: the
#: authors' code leaves both off by default and sets them per run).
PLORA_DROPOUT, PLORA_USER_DROPOUT, PLORA_MI = 0.1, 0.5, 1.0

SWEEPS = ("all", "default", "small")
#: The sizes the default sweep leaves out (each lies between two kept sizes of
#: its method; LoRA rank 8 costs about what the dense deltas ``full`` cost).
CUT = ("lora:r8", "user_lora:e16", "prompt:p4")


def methods(sweep: str = "all") -> list[Method]:
    """The methods and sizes of a sweep (one of :data:`SWEEPS`)."""
    r0, k0 = STUDENT_DEFAULT
    lrs_sizes = [(1, 1), (TEACHER_RANK, TEACHER_SPARSITY), (r0, k0), (8, 16)]
    out = [
        Method(
            "lrs",
            f"r{r}k{k}",
            (("rank", r), ("sparsity", k)),
            middle=(r, k) == (r0, k0),
        )
        for r, k in lrs_sizes
    ]
    out += [
        Method("lora", f"r{r}", (("rank", r),), middle=r == 2) for r in (1, 2, 4, 8)
    ]
    out += [
        Method("user_lora", f"e{e}", (("rank", 4), ("embed_dim", e)), middle=e == 8)
        for e in (4, 8, 16, 32)
    ]
    plora = (("dropout", PLORA_DROPOUT), ("user_dropout", PLORA_USER_DROPOUT))
    out += [
        Method(
            "plora",
            "e8",
            (("rank", 4), ("embed_dim", 8)) + plora,
            middle=True,
            mi=PLORA_MI,
        )
    ]
    out += [
        Method("prompt", f"p{p}", (("length", p),), middle=p == 2, zero_shot=False)
        for p in (1, 2, 4, 8)
    ]
    out += [
        Method("user_token", f"e{e}", (("embed_dim", e),), middle=e == 8)
        for e in (8, 32)
    ]
    out += [
        Method("head", "", middle=True),
        Method("class_bias", "", middle=True),
        Method("full", "", middle=True),
    ]
    if sweep == "default":
        out = [m for m in out if m.label not in CUT]
    if sweep == "small":
        keep = {
            "lrs:r2k4",
            "lora:r1",
            "user_lora:e8",
            "plora:e8",
            "user_token:e8",
            "class_bias",
        }
        out = [m for m in out if m.label in keep]
    return out


def personalize(model, method: Method, num_users: int, key) -> list[str]:
    """Wraps ``model``'s layers for ``method`` (in place); returns the paths.

    ``lrs``, ``lora``, ``user_lora``, ``plora`` and ``full`` personalize
    :func:`linear_targets` (the last block's MLP output map and the head),
    ``head`` and ``class_bias`` the head, ``prompt`` and ``user_token`` the
    token embedding; ``global`` nothing.
    """
    opts = dict(method.options)
    rngs = make_rngs(key)
    if method.name == "global":
        return []
    if method.name == "class_bias":
        set_child(model, ("head",), UserBiasLinear(model.head, num_users=num_users))
        return ["head"]
    if method.name == "full":
        last = len(model.blocks) - 1
        paths = [("blocks", last, "mlp", "down"), ("head",)]
        for path in paths:
            base = model
            for k in path:
                base = base[k] if isinstance(k, int) else getattr(base, k)
            set_child(model, path, UserHeadLinear(base, num_users=num_users))
        return ["/".join(map(str, p)) for p in paths]
    if method.name == "head":
        return wrap(model, "head", num_users=num_users, rngs=rngs, method="head")
    if method.name in ("prompt", "user_token"):
        targets = "embed"
    else:
        targets = linear_targets(len(model.blocks))
    name = "user_lora" if method.name == "plora" else method.name
    return wrap(model, targets, num_users=num_users, rngs=rngs, method=name, **opts)


def storage(model) -> dict:
    """Bytes per user, shared adapter bytes and base bytes of a personalized model.

    Per user: every per-user table's row (floats and int32 indices alike),
    summed over the adapters, as stored for serving (LRS: ``V``, the ``k``
    sparse values and their ``k`` indices). Shared: the adapters' shared
    factors (:class:`lrs.nn.user_state.SharedParam`). Base: every other
    parameter.
    """
    per_user = floats = ints = 0
    for layer in adapter_layers(model).values():
        for table in layer.user_tables().values():
            row = int(np.prod(table.shape[1:]))
            per_user += row * table.dtype.itemsize
            if isinstance(table, UserSupport):
                ints += row
            else:
                floats += row

    def nbytes(state):
        leaves = jax.tree.leaves(state)
        return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in leaves))

    return dict(
        bytes_per_user=per_user,
        floats_per_user=floats,
        ints_per_user=ints,
        shared_bytes=nbytes(nnx.state(model, SharedParam)),
        base_bytes=nbytes(nnx.state(model, nnx.All(nnx.Param, nnx.Not(SharedParam)))),
    )
