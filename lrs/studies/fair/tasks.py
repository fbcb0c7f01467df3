"""The teachers (``lrs``, ``function``, ``none``) and each seed's data."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lrs.nn.nnx_personalize import adapter_layers
from lrs.nn.nnx_personalize import personalize as wrap
from lrs.nn.user_state import users
from lrs.studies.fair.method_table import TEACHER_RANK, TEACHER_SPARSITY, linear_targets
from lrs.studies.fair.model import Classifier, make_rngs
from lrs.studies.fair.setup import TEACHERS, Setup

#: Scale of the ``lrs`` teacher's coefficients ``V`` and of its sparse spikes
#: (in units of the layer's initial weight scale ``1/sqrt(in)``), and of the
#: ``function`` teacher's perturbation: chosen so that about a third of the
#: labels are personal (``personal_label_fraction`` in the record).
LRS_STRENGTH, LRS_SPIKE, FUNCTION_STRENGTH = 0.2, 2.0, 1.0


def make_task(key, kind: str, setup: Setup) -> dict:
    """One seed's teacher and data.

    Users ``0 .. n-1`` are trained users, ``n .. 2n-1`` cold-start users (the
    first half calibration users, the second half new users). Every user
    draws ``m`` training, ``eval_samples`` validation and ``eval_samples``
    test sequences (uniform tokens), labelled by the teacher's argmax. The
    teacher is a random :class:`Classifier` (head bias centring its logits,
    so the classes are balanced) plus, per user:

    * ``"lrs"``: low-rank plus sparse deltas on :func:`linear_targets`, rank
      :data:`TEACHER_RANK` and :data:`TEACHER_SPARSITY` entries per layer (an
      :class:`lrs.nn.lrs_linear.LRSLinear` teacher whose ``V`` and sparse
      values are drawn per user);
    * ``"function"``: the pooled features ``f`` become ``f + a (g_u(f) -
      mean_x g_u(f))`` with ``g_u(f) = W2_u tanh(W1_u f)`` a per-user random
      two-layer map of width 4: input-dependent, no mean class shift;
    * ``"none"``: nothing (every user has the global teacher).

    Returns numpy arrays ``tokens (2n, m + 2 v, T)``, ``labels (2n, m + 2 v)``,
    ``global_labels`` (the teacher without user effects), the public pool
    ``public_tokens (P + P // 8, T)`` and ``public_labels`` (labelled without
    user effects: the data a global base model is pretrained on) and ``info``:
    ``personal_label_fraction`` (labels the user effect changes),
    ``shift_fraction`` (the share of the users' logit changes that is a
    per-user constant, what a class bias can fit) and ``class_frequencies``.
    """
    if kind not in TEACHERS:
        raise ValueError(f"kind must be one of {TEACHERS}; got {kind!r}")
    program = _TASK_PROGRAMS.get((kind, setup))
    if program is None:  # runs once per seed: compile cheaply
        program = _task_arrays.lower(key, kind, setup).compile(
            compiler_options=_CHEAP_COMPILE
        )
        _TASK_PROGRAMS[(kind, setup)] = program
    out = {k: np.asarray(v) for k, v in program(key).items()}
    labels, global_labels = out["labels"], out["global_labels"]
    total, shift = float(out.pop("effect_total")), float(out.pop("effect_shift"))
    freq = np.bincount(labels.ravel(), minlength=setup.num_classes)
    out["info"] = dict(
        personal_label_fraction=float((labels != global_labels).mean()),
        shift_fraction=shift / total if total > 0 else 0.0,
        class_frequencies=(freq / freq.sum()).round(4).tolist(),
    )
    return out


_TASK_PROGRAMS: dict = {}
#: XLA options of ``jax_disable_most_optimizations``, for programs run once.
_CHEAP_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


@functools.partial(jax.jit, static_argnames=("kind", "setup"))
def _task_arrays(key, kind: str, setup: Setup) -> dict:
    """:func:`make_task`'s arrays, as one jitted program per teacher and setup."""
    n_all = 2 * setup.users
    per = setup.samples + 2 * setup.eval_samples
    T, V = setup.seq_len, setup.vocab
    k_teacher, k_users, k_data, k_calib = jax.random.split(key, 4)
    teacher = Classifier(setup, rngs=make_rngs(k_teacher))
    calib = jax.random.randint(k_calib, (2048, T), 0, V)
    _standardize(teacher, calib)
    _balance(teacher, calib)
    tokens = jax.random.randint(k_data, (n_all, per, T), 0, V).astype(jnp.int32)
    flat = tokens.reshape(-1, T)
    ids = jnp.repeat(jnp.arange(n_all), per)
    base_logits = teacher(flat)
    n_pub = setup.public + setup.public // 8
    public = jax.random.randint(jax.random.fold_in(k_data, 1), (n_pub, T), 0, V)
    public_labels = teacher(public).argmax(-1).astype(jnp.int32)
    if kind == "none":
        logits = base_logits
    elif kind == "function":
        logits = _function_teacher(k_users, teacher, flat, ids, n_all, calib)
    else:
        logits = _lrs_teacher(k_users, teacher, flat, ids, n_all)
    effect = (logits - base_logits).reshape(n_all, per, -1)
    return dict(
        tokens=tokens,
        labels=logits.argmax(-1).reshape(n_all, per).astype(jnp.int32),
        global_labels=base_logits.argmax(-1).reshape(n_all, per).astype(jnp.int32),
        public_tokens=public.astype(jnp.int32),
        public_labels=public_labels,
        effect_total=(effect**2).sum(),
        effect_shift=(effect.mean(1) ** 2).sum() * per,
    )


def _standardize(teacher, calib) -> None:
    """Sets the teacher's final norm so that its features have mean 0, variance 1.

    Over random inputs, the pooled features of a random network are mostly a
    common vector; standardized (per feature, over the calibration inputs),
    the teacher's logits depend on the input, and a user's weight change is
    not mostly a constant shift of the class scores.
    """
    f = teacher.features(calib)
    mu, sd = f.mean(0), f.std(0) + 1e-6
    teacher.ln_f.scale[...] = teacher.ln_f.scale[...] / sd
    teacher.ln_f.bias[...] = (teacher.ln_f.bias[...] - mu) / sd


def _balance(teacher, calib, iters: int = 100) -> None:
    """Sets the teacher's head bias so that its argmax classes are balanced."""
    logits = teacher(calib)
    c = logits.shape[1]
    step = 0.5 * logits.std()

    def body(_, bias):
        hits = jnp.bincount((logits + bias).argmax(1), length=c)
        freq = (hits / logits.shape[0]).astype(bias.dtype)
        return bias + step * (1.0 / c - freq) * c

    bias = jax.lax.fori_loop(0, iters, body, -logits.mean(0))
    teacher.head.bias[...] = teacher.head.bias[...] + bias.astype(jnp.float32)


def _lrs_teacher(key, teacher, flat, ids, n_all):
    k_wrap, k_rest = jax.random.split(key)
    wrap(
        teacher,
        linear_targets(len(teacher.blocks)),
        num_users=n_all,
        method="lrs",
        rank=TEACHER_RANK,
        sparsity=TEACHER_SPARSITY,
        rngs=make_rngs(k_wrap),
    )
    for i, layer in enumerate(adapter_layers(teacher).values()):
        k_v, k_pos, k_sign = jax.random.split(jax.random.fold_in(k_rest, i), 3)
        size = layer.in_features * layer.out_features
        layer.V[...] = LRS_STRENGTH * jax.random.normal(k_v, layer.V.shape, jnp.float32)
        order = jnp.argsort(jax.random.uniform(k_pos, (n_all, size)), axis=1)
        layer.indices[...] = order[:, :TEACHER_SPARSITY].astype(jnp.int32)
        sign = jax.random.rademacher(k_sign, (n_all, TEACHER_SPARSITY), jnp.float32)
        layer.values[...] = LRS_SPIKE * sign / math.sqrt(layer.in_features)
    with users(ids):
        return teacher(flat)


def _function_teacher(key, teacher, flat, ids, n_all, calib):
    d, width = teacher.head.in_features, 4
    k1, k2 = jax.random.split(key)
    W1 = jax.random.normal(k1, (n_all, d, width), jnp.float32) * (2.0 / math.sqrt(d))
    W2 = jax.random.normal(k2, (n_all, width, d), jnp.float32) / math.sqrt(width)
    f_calib = teacher.features(calib)
    centre = (
        jnp.einsum("nbw,nwd->nd", jnp.tanh(jnp.einsum("bd,ndw->nbw", f_calib, W1)), W2)
        / f_calib.shape[0]
    )
    f = teacher.features(flat)
    g = jnp.einsum(
        "bw,bwd->bd", jnp.tanh(jnp.einsum("bd,bdw->bw", f, W1[ids])), W2[ids]
    )
    return teacher.head(f + FUNCTION_STRENGTH * (g - centre[ids]))
