"""A fair personalization study on the Flax NNX adapters (issue 18).

Every method of :func:`lrs.nn.personalize` (LRS, per-user LoRA, PLoRA's
user-conditioned LoRA, soft prompt, user token, per-user head), a per-user
class bias (:class:`lrs.nn.bias_layers.UserBiasLinear`) and dense per-user
deltas on the personalized layers are trained by one protocol:

* **Capacity sweeps**: each method over its natural size (:func:`methods`),
  and every method in two variants: ``frozen`` (the pretrained base is
  frozen, only the adapter's shared and per-user parameters train: the
  adapter's effect alone) and ``joint`` (the base is fine-tuned too, at one
  fixed step size for every method).
* **Same tuning budget**: one learning-rate grid (:data:`GRID`) for the
  adapter's parameters of every method, the same number of full-batch Adam
  steps, validation every ``eval_every`` steps; the (learning rate, step) with
  the best validation accuracy is chosen per seed, and the record says when
  the chosen step is the last one or the rate at the edge of the grid.
* **Seeds and intervals**: every seed draws a new teacher, new users, new
  data, a new pretrained base and new adapter initializations; a row reports
  the mean and the 95% Student-t interval over seeds (:func:`t_interval`),
  and a difference is a win or a loss only when the intervals are disjoint
  (:func:`outcome`).
* **Teachers** (:func:`make_task`): ``lrs`` (realizable: per-user low-rank
  plus sparse weight deltas with rank and sparsity that are not the student's
  defaults), ``function`` (misspecified in function space: a per-user
  two-layer perturbation of the pooled features, centred so that it shifts no
  class score on average: input-dependent only) and ``none`` (no per-user
  structure: every method should tie with the global model).
* **Honest cold start**: new users have only their ``m`` labelled samples.
  The cold-start learning rate and step count are chosen on separate
  calibration users (from the training population, with held-out labels) and
  then applied, fixed, to the new users; step 0 is the zero-shot row.

Output (``--out``): ``fair_study.json`` (every row: method, size, variant,
bytes per user, shared bytes, accuracy per seed with mean and interval,
chosen learning rate and step per seed), ``fair_study.png`` (accuracy
against bytes per user per teacher, with the Pareto front) and
``fair_study.md`` (the tables of wins / ties / losses against LRS, generated
from the JSON by :func:`markdown`).

* **User-level DP of the shared parts** (``--dp``, :func:`run_dp`): the
  base and LRS's ``U`` trained by :func:`lrs.nn.dp.train_shared_private`
  (each user's clipped gradient, Gaussian noise, ``dp_accounting``) at each
  epsilon of ``Setup.dp_epsilons``, every user's own rows then fitted
  locally; one step audited with a canary (:func:`audit_dp_step`). The
  record's ``dp`` section, ``fair_study_dp.png`` and :func:`dp_markdown`.

Run ``python experiments/fair_study.py [--quick] [--dp] [--out DIR] [--seeds N]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lrs.nn.baseline_layers import UserHeadLinear
from lrs.nn.bias_layers import UserBiasLinear
from lrs.nn.lrs_linear import LRSLinear
from lrs.nn.nnx_model import Block, GPTConfig
from lrs.nn.nnx_personalize import adapter_layers, set_child
from lrs.nn.nnx_personalize import personalize as wrap
from lrs.nn.user_state import SharedParam, SparseProbe, UserSupport, UserTable, users
from lrs.studies import plotting
from lrs.validation import check_integer

RESULTS_NAME = "fair_study.json"
PLOT_NAME = "fair_study.png"
DP_PLOT_NAME = "fair_study_dp.png"
TABLE_NAME = "fair_study.md"

#: The learning-rate grid of the adapters' parameters: the same for every method.
GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
#: Adam step size of the base when it is fine-tuned (``joint``), every method.
BASE_LR = 1e-3
#: Adam step size of the global pretraining (the base every method starts from).
PRETRAIN_LR = 3e-3
#: The teachers: realizable LRS, function-space misspecified, no user structure.
TEACHERS = ("lrs", "function", "none")
#: ``frozen``: base frozen (the adapter alone); ``joint``: base fine-tuned too.
VARIANTS = ("frozen", "joint")
#: Rank and sparsity (per personalized layer) of the ``lrs`` teacher.
TEACHER_RANK, TEACHER_SPARSITY = 2, 4
#: The student's default LRS size (``lrs.nn`` docs): not the teacher's.
STUDENT_DEFAULT = (4, 8)
#: Level of every interval.
LEVEL = 0.95


def linear_targets(num_layers: int) -> str:
    """The layers the weight-space methods personalize (and the ``lrs`` teacher
    moves): the last block's MLP output map and the head."""
    return rf"blocks/{num_layers - 1}/mlp/down|head"


@dataclasses.dataclass(frozen=True)
class Setup:
    """Sizes of one run of the study.

    Attributes:
      vocab, seq_len, d_model, num_heads, num_layers, d_ff: the classifier
        (:class:`Classifier`; the blocks are :class:`lrs.nn.nnx_model.Block`).
      num_classes: C.
      users: trained users; as many cold-start users (half calibration, half
        new).
      samples: m labelled training samples per user.
      eval_samples: validation samples and test samples per user (each).
      steps: full-batch steps of every training run (shared phase and cold
        start alike).
      eval_every: steps between validation checks (step 0 is checked too).
      public: sequences of the public pool the base is pretrained on
        (labelled by the teacher without any user effect), and
        ``public // 8`` more for its validation.
      pretrain_steps, pretrain_batch: minibatch Adam steps of the global
        pretraining and their batch size.
      seeds: independent repetitions.
      grid: the learning-rate grid (:data:`GRID`).
      sweep: ``"all"`` (every size of every method), ``"default"`` (all but
        :data:`CUT`, to fit the 30-minute budget) or ``"small"`` (four
        method sizes, for ``--quick``).
      teachers, variants: which of :data:`TEACHERS` and :data:`VARIANTS`.
      joint_sizes: ``"all"`` or ``"one"``: the ``joint`` variant at every size
        or at each method's middle size only (the cut of the default run).
      none_sizes: the same for the ``none`` teacher (sanity row).
      none_variants: the variants run on the ``none`` teacher (those of
        ``variants`` that are also listed here).
      only: run only these method names or ``name:size`` labels (empty: all).
      dp: also run the user-level DP part (:func:`run_dp`) on the ``lrs``
        teacher (or the first teacher when it is not run).
      dp_method: the LRS size the DP part trains (a :func:`methods` label).
      dp_epsilons: the budgets of the DP curve (``inf``: the same training
        without clipping or noise).
      dp_delta, dp_steps, dp_users_per_step, dp_clip, dp_lr, dp_user_lr: the
        :class:`lrs.nn.dp.DPTrainConfig` of the shared phase (fixed in
        advance, not tuned on the users' data; ``dp_users_per_step = 0``:
        every trained user in every step, accounted by PLD without
        subsampling).
      dp_audit_trials: runs per side of the one-step canary audit
        (:func:`audit_dp_step`; 0: no audit).
      dp_audit_epsilon: the claim of the audited step.
    """

    vocab: int = 8
    seq_len: int = 6
    d_model: int = 16
    num_heads: int = 2
    num_layers: int = 1
    d_ff: int = 32
    num_classes: int = 4
    users: int = 48
    samples: int = 8
    eval_samples: int = 16
    steps: int = 80
    eval_every: int = 8
    public: int = 4096
    pretrain_steps: int = 400
    pretrain_batch: int = 256
    seeds: int = 3
    grid: tuple = GRID
    sweep: str = "default"
    teachers: tuple = TEACHERS
    variants: tuple = VARIANTS
    joint_sizes: str = "one"
    none_sizes: str = "one"
    none_variants: tuple = ("frozen",)
    only: tuple = ()
    dp: bool = False
    dp_method: str = "lrs:r4k8"
    dp_epsilons: tuple = (1.0, 2.0, 4.0, 8.0, math.inf)
    dp_delta: float = 1e-5
    dp_steps: int = 40
    dp_users_per_step: int = 0
    dp_clip: float = 1.0
    dp_lr: float = 3e-3
    dp_user_lr: float = 0.1
    dp_audit_trials: int = 20_000
    dp_audit_epsilon: float = 4.0

    def __post_init__(self):
        for name in (
            "vocab",
            "seq_len",
            "d_model",
            "num_heads",
            "num_layers",
            "d_ff",
            "samples",
            "eval_samples",
            "steps",
            "eval_every",
            "public",
            "pretrain_steps",
            "pretrain_batch",
            "seeds",
        ):
            check_integer(name, getattr(self, name), 1)
        check_integer("num_classes", self.num_classes, 2)
        check_integer("users", self.users, 2)
        if self.users % 2:
            raise ValueError(f"users must be even; got {self.users}")
        if self.steps % self.eval_every:
            raise ValueError(
                f"eval_every must divide steps = {self.steps}; got {self.eval_every}"
            )
        if not self.grid or any(not lr > 0 for lr in self.grid):
            raise ValueError(f"grid must hold learning rates > 0; got {self.grid}")
        for name, allowed in (("teachers", TEACHERS), ("variants", VARIANTS)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad or not getattr(self, name):
                raise ValueError(f"{name} must be among {allowed}; got {bad}")
        for name in ("joint_sizes", "none_sizes"):
            if getattr(self, name) not in ("all", "one"):
                raise ValueError(f"{name} must be 'all' or 'one'")
        if self.sweep not in SWEEPS:
            raise ValueError(f"sweep must be one of {SWEEPS}; got {self.sweep!r}")
        known = {m.name for m in methods(self.sweep)} | {
            m.label for m in methods(self.sweep)
        }
        bad = [x for x in self.only if x not in known]
        if bad:
            raise ValueError(f"only: unknown methods {bad}; known: {sorted(known)}")
        lrs_labels = [m.label for m in methods("all") if m.name == "lrs"]
        if self.dp_method not in lrs_labels:
            raise ValueError(f"dp_method must be one of {lrs_labels}")
        if not self.dp_epsilons or any(not e > 0 for e in self.dp_epsilons):
            raise ValueError(f"dp_epsilons must be > 0; got {self.dp_epsilons}")
        check_integer("dp_audit_trials", self.dp_audit_trials, 0)
        check_integer("dp_users_per_step", self.dp_users_per_step, 0)
        if 0 < self.dp_audit_trials < 2:
            raise ValueError("dp_audit_trials must be 0 or >= 2")

    @property
    def checks(self) -> int:
        """Validation checks per run, step 0 included."""
        return self.steps // self.eval_every + 1


# ----------------------------------------------------------------------------
# statistics and the protocol's rules (pure numpy; tested without training)


def t_interval(values, level: float = LEVEL) -> dict:
    """Mean and Student-t interval of ``values`` (one per seed).

    Returns ``{"mean", "lo", "hi", "half", "n"}``; with one value the interval
    is unbounded (``lo = -inf``, ``hi = inf``): one seed proves nothing.
    """
    from scipy import stats  # scipy is a dependency of lrs; imported here only

    x = np.asarray(values, dtype=float)
    n = x.size
    if n == 0:
        raise ValueError("values must hold at least one number")
    mean = float(x.mean())
    if n == 1:
        return dict(mean=mean, lo=-math.inf, hi=math.inf, half=math.inf, n=1)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return dict(mean=mean, lo=mean - half, hi=mean + half, half=half, n=int(n))


def outcome(row: dict, reference: dict) -> str:
    """``"win"`` / ``"loss"`` / ``"tie"`` of ``reference`` against ``row``.

    Both are :func:`t_interval` dicts. The reference wins when its interval
    lies entirely above the row's, loses when entirely below; otherwise
    (overlapping intervals) it is a tie.
    """
    if reference["lo"] > row["hi"]:
        return "win"
    if reference["hi"] < row["lo"]:
        return "loss"
    return "tie"


def paired_outcome(row_values, reference_values, level: float = LEVEL) -> str:
    """:func:`outcome` on the per-seed differences (same seeds: paired).

    ``"win"`` when the interval of ``reference - row`` over seeds lies above
    0, ``"loss"`` when below, ``"tie"`` otherwise. More sensitive than
    :func:`outcome` (the seed-to-seed variation of the task cancels), and
    reported beside it, never instead of it.
    """
    d = np.asarray(reference_values, float) - np.asarray(row_values, float)
    c = t_interval(d, level)
    return "win" if c["lo"] > 0 else ("loss" if c["hi"] < 0 else "tie")


def select(val: np.ndarray) -> tuple[int, int]:
    """``(lr index, check index)`` of the best validation accuracy.

    ``val`` is ``(learning rates, checks)``; ties go to the smaller learning
    rate, then the earlier check.
    """
    val = np.asarray(val)
    flat = int(np.argmax(val))
    return flat // val.shape[1], flat % val.shape[1]


def pareto_front(points) -> list[int]:
    """Indices of the ``(bytes, accuracy)`` points no other point dominates.

    A point is dominated when another costs at most as many bytes and is at
    least as accurate, one of the two strictly. Sorted by bytes.
    """
    pts = [(float(b), float(a), i) for i, (b, a) in enumerate(points)]
    front = []
    for b, a, i in pts:
        if not any((b2 <= b and a2 >= a) and (b2 < b or a2 > a) for b2, a2, _ in pts):
            front.append((b, i))
    return [i for _, i in sorted(front)]


# ----------------------------------------------------------------------------
# methods and their sizes


@dataclasses.dataclass(frozen=True)
class Method:
    """One method at one size.

    Attributes:
      name: ``lrs``, ``lora``, ``user_lora`` (PLoRA), ``prompt``,
        ``user_token``, ``head`` (per-user head), ``class_bias``, ``full``
        (dense per-user deltas on the personalized layers) or ``global``
        (the pretrained base, nothing per user).
      size: the size label (``r2k4``, ``r4``, ``e8``, ``p2``, ...).
      options: keyword arguments of :func:`lrs.nn.personalize` (or of the
        class-bias / dense wrappers).
      middle: the size kept when a sweep is cut to one size per method.
      zero_shot: whether a new user's initial rows give the no-user model
        (a zero-shot row is reported then).
    """

    name: str
    size: str
    options: tuple = ()
    middle: bool = False
    zero_shot: bool = True

    @property
    def label(self) -> str:
        """``name:size``."""
        return f"{self.name}:{self.size}" if self.size else self.name


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
        keep = {"lrs:r2k4", "lora:r1", "user_token:e8", "class_bias"}
        out = [m for m in out if m.label in keep]
    return out


DEFAULT = Setup()
QUICK = Setup(
    d_model=8,
    d_ff=16,
    seq_len=4,
    users=16,
    samples=6,
    eval_samples=8,
    steps=40,
    eval_every=10,
    public=1024,
    pretrain_steps=100,
    pretrain_batch=128,
    seeds=2,
    sweep="small",
    variants=("frozen",),
    dp_method="lrs:r2k4",
    dp_epsilons=(1.0, 8.0, math.inf),
    dp_steps=20,
    dp_audit_trials=2_000,
)


# ----------------------------------------------------------------------------
# the model


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


def _rngs(key) -> nnx.Rngs:
    return nnx.Rngs(params=key)


def personalize(model, method: Method, num_users: int, key) -> list[str]:
    """Wraps ``model``'s layers for ``method`` (in place); returns the paths.

    ``lrs``, ``lora``, ``user_lora`` and ``full`` personalize
    :func:`linear_targets` (the last block's MLP output map and the head),
    ``head`` and ``class_bias`` the head, ``prompt`` and ``user_token`` the
    token embedding; ``global`` nothing.
    """
    opts = dict(method.options)
    rngs = _rngs(key)
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
    return wrap(
        model, targets, num_users=num_users, rngs=rngs, method=method.name, **opts
    )


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


# ----------------------------------------------------------------------------
# teachers

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
    teacher = Classifier(setup, rngs=_rngs(k_teacher))
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
        rngs=_rngs(k_wrap),
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


# ----------------------------------------------------------------------------
# training: one jitted program per method and size, vmapped over seeds and the
# learning-rate grid

_FLOAT_TABLE = nnx.All(UserTable, nnx.Not(UserSupport))


def split(model) -> tuple:
    """``(graphdef, params)`` of a personalized model for :func:`make_program`.

    ``params`` is ``{"base", "shared", "rows", "frozen", "probes"}``: the base
    (``nnx.Param`` that are not adapters' shared factors), the shared factors
    (:class:`~lrs.nn.user_state.SharedParam`), the float per-user tables, the
    rest (integer supports), and for each LRS layer with ``k > 0`` a dense
    ``(users, in, out)`` training stand-in of its sparse part (zero at the
    start, ``k`` non-zeros per user after every step).
    """
    graphdef, shared, base, rows, frozen = nnx.split(
        model, SharedParam, nnx.Param, _FLOAT_TABLE, ...
    )
    probes = {
        path: jnp.zeros((layer.num_users, layer.in_features, layer.out_features))
        for path, layer in _sparse_layers(model).items()
    }
    return graphdef, dict(
        base=base, shared=shared, rows=rows, frozen=frozen, probes=probes
    )


def _sparse_layers(model) -> dict:
    return {
        p: m
        for p, m in adapter_layers(model).items()
        if isinstance(m, LRSLinear) and m.sparsity
    }


def hard_threshold(dense, k: int):
    """Keeps the ``k`` largest-magnitude entries of each user's ``(in, out)`` slice."""
    flat = dense.reshape(dense.shape[0], -1)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    keep = jnp.zeros_like(flat).at[jnp.arange(flat.shape[0])[:, None], idx].set(1.0)
    return (flat * keep).reshape(dense.shape)


def make_program(graphdef, sparsity: dict, setup: Setup):
    """The jitted training run of one method, vmapped over seeds and learning rates.

    ``program(params, lrs, flags, data)``: ``params`` stacked over seeds (leading
    axis ``S``), ``lrs (L,)`` the grid, ``flags = (train base, train shared)``
    (0 or 1), ``data = (tokens (S, n, m, T), labels (S, n, m), held-out tokens
    (S, n, 2 v, T), held-out labels (S, n, 2 v))``. Each of the
    ``S x L`` runs takes ``setup.steps`` full-batch steps on the ``n`` users'
    ``m`` samples:

    * base (``flags[0]``): Adam at :data:`BASE_LR` (the same for every method);
    * shared factors (``flags[1]``) and per-user rows: Adam at the grid's rate;
    * LRS sparse parts: iterative hard thresholding, ``B_u <- H_k(B_u - lr
      g_u / rms(g_u))`` with ``g_u`` the gradient of user ``u``'s dense
      ``(in, out)`` stand-in (normalized per user, so one rate serves every
      scale, as Adam's does for the other parameters).

    Returns ``(acc_a (S, L, checks, n), acc_b (same), loss (S, L, checks),
    best)``: each user's accuracy on the first ``v`` and on the last ``v``
    held-out draws, and the parameters at the check with the best mean
    ``acc_a`` (per run); check ``c`` is after ``c * eval_every`` steps.
    """
    n_steps, every = setup.steps, setup.eval_every

    def logits(p, tokens, ids):
        model = nnx.merge(graphdef, p["base"], p["shared"], p["rows"], p["frozen"])
        layers = adapter_layers(model)
        for path, probe in p["probes"].items():
            layers[path].probe = SparseProbe(probe)
        with users(ids):
            return model(tokens)

    def one(params, lr, flags, data):
        tok, lab, e_tok, e_lab = data
        n, m, t = tok.shape
        ids = jnp.repeat(jnp.arange(n), m)
        x, y = tok.reshape(n * m, t), lab.reshape(-1)
        opt_base, opt_adapt = optax.adam(BASE_LR), optax.adam(lr)

        def loss_fn(train, fixed):
            out = logits({**fixed, **train}, x, ids)
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

        def accuracy(p):  # per user: first half of the held-out draws, second half
            v2 = e_tok.shape[1]
            ids = jnp.repeat(jnp.arange(n), v2)
            out = logits(p, e_tok.reshape(n * v2, t), ids)
            hit = (out.argmax(-1) == e_lab.reshape(-1)).reshape(n, 2, v2 // 2)
            return hit.mean(2).T

        def step(carry, _):
            p, s_base, s_adapt = carry
            train = {k: p[k] for k in ("base", "shared", "rows", "probes")}
            loss, g = jax.value_and_grad(loss_fn)(train, {"frozen": p["frozen"]})
            u_base, s_base = opt_base.update(g["base"], s_base, p["base"])
            (u_shared, u_rows), s_adapt = opt_adapt.update(
                (g["shared"], g["rows"]), s_adapt, (p["shared"], p["rows"])
            )
            new = dict(p)
            new["base"] = jax.tree.map(lambda a, u: a + flags[0] * u, p["base"], u_base)
            new["shared"] = jax.tree.map(
                lambda a, u: a + flags[1] * u, p["shared"], u_shared
            )
            new["rows"] = jax.tree.map(lambda a, u: a + u, p["rows"], u_rows)
            probes = {}
            for path, dense in p["probes"].items():
                grad = g["probes"][path]
                rms = jnp.sqrt(jnp.mean(grad.reshape(n, -1) ** 2, 1)) + 1e-12
                probes[path] = hard_threshold(
                    dense - lr * grad / rms[:, None, None], sparsity[path]
                )
            new["probes"] = probes
            return (new, s_base, s_adapt), loss

        def check(carry, _):
            p, s_base, s_adapt, best, best_acc = carry
            (p, s_base, s_adapt), losses = jax.lax.scan(
                step, (p, s_base, s_adapt), None, length=every
            )
            acc_a, acc_b = accuracy(p)
            better = acc_a.mean() > best_acc
            best = jax.tree.map(lambda b, q: jnp.where(better, q, b), best, p)
            best_acc = jnp.where(better, acc_a.mean(), best_acc)
            return (p, s_base, s_adapt, best, best_acc), (acc_a, acc_b, losses[-1])

        acc0_a, acc0_b = accuracy(params)
        loss0 = loss_fn(
            {k: params[k] for k in ("base", "shared", "rows", "probes")},
            {"frozen": params["frozen"]},
        )
        carry = (
            params,
            opt_base.init(params["base"]),
            opt_adapt.init((params["shared"], params["rows"])),
            params,
            acc0_a.mean(),
        )
        carry, (acc_a, acc_b, losses) = jax.lax.scan(
            check, carry, None, length=n_steps // every
        )
        acc_a = jnp.concatenate([acc0_a[None], acc_a])
        acc_b = jnp.concatenate([acc0_b[None], acc_b])
        losses = jnp.concatenate([loss0[None], losses])
        return acc_a, acc_b, losses, carry[3]

    per_lr = jax.vmap(one, in_axes=(None, 0, None, None))
    return jax.jit(jax.vmap(per_lr, in_axes=(0, None, None, 0)))


def make_pretrain(graphdef, setup: Setup):
    """The jitted global pretraining, vmapped over seeds.

    ``pretrain(params (S, ...), keys (S,), data)`` with ``data = (tokens (S, N,
    T), labels (S, N), val tokens (S, V, T), val labels)``: Adam at
    :data:`PRETRAIN_LR` on minibatches of ``setup.pretrain_batch`` drawn with
    replacement, ``setup.pretrain_steps`` steps, validation ten times along
    the way; returns ``(best params, best validation accuracy, best step)``
    per seed.
    """
    n_steps, batch = setup.pretrain_steps, setup.pretrain_batch
    every = max(n_steps // 10, 1)
    opt = optax.adam(PRETRAIN_LR)

    def one(params, key, data):
        x, y, xv, yv = data

        def loss_fn(p, idx):
            out = nnx.merge(graphdef, p)(x[idx])
            return optax.softmax_cross_entropy_with_integer_labels(out, y[idx]).mean()

        def accuracy(p):
            return (nnx.merge(graphdef, p)(xv).argmax(-1) == yv).mean()

        def step(carry, k):
            p, s = carry
            idx = jax.random.randint(k, (batch,), 0, x.shape[0])
            u, s = opt.update(jax.grad(loss_fn)(p, idx), s, p)
            return (optax.apply_updates(p, u), s), None

        def check(carry, i):
            p, s, best, best_acc, best_step = carry
            (p, s), _ = jax.lax.scan(
                step, (p, s), jax.random.split(jax.random.fold_in(key, i), every)
            )
            acc = accuracy(p)
            better = acc > best_acc
            best = jax.tree.map(lambda b, q: jnp.where(better, q, b), best, p)
            best_step = jnp.where(better, (i + 1) * every, best_step)
            return (p, s, best, jnp.maximum(acc, best_acc), best_step), None

        carry = (params, opt.init(params), params, accuracy(params), 0)
        carry, _ = jax.lax.scan(check, carry, jnp.arange(n_steps // every))
        return carry[2], carry[3], carry[4]

    return jax.jit(jax.vmap(one))


# ----------------------------------------------------------------------------
# the protocol


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _pick(tree, *index):
    return jax.tree.map(lambda a: a[index], tree)


def _splits(tokens, labels, setup: Setup) -> dict:
    """The phases' arrays (numpy, leading axis seeds) from every user's draws.

    ``trained``: the trained users' ``m`` samples and their held-out draws
    (validation, then test). ``cold``: the cold-start users' ``m`` samples and
    their held-out draws: a calibration user's validation then test draws, a
    new user's two held-out halves (both only ever tested on).
    """
    n, m, v = setup.users, setup.samples, setup.eval_samples
    held = slice(m, m + 2 * v)
    return dict(
        trained=(tokens[:, :n, :m], labels[:, :n, :m], tokens[:, :n, held],
                 labels[:, :n, held]),
        cold=(tokens[:, n:, :m], labels[:, n:, :m], tokens[:, n:, held],
              labels[:, n:, held]),
    )  # fmt: skip


def _keys(seed_key, what: str):
    return jax.random.fold_in(seed_key, sum(map(ord, what)))


class _Clock:
    """Wall and CPU seconds since creation (and the machine's load)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def seconds(self) -> float:
        return time.perf_counter() - self.wall

    def cpu_seconds(self) -> float:
        return time.process_time() - self.cpu


def pretrain(setup: Setup, tasks, tokens, labels, seed_keys, cache) -> dict:
    """Global pretraining (one base per seed) and the ``global`` row's accuracies.

    The base is trained on the public pool of each seed's task (labelled by
    the teacher without user effects) and validated on its held-out part;
    ``cache`` keeps the compiled program across teachers.
    """
    n, h, m, v = setup.users, setup.users // 2, setup.samples, setup.eval_samples
    models = [Classifier(setup, rngs=_rngs(_keys(k, "base"))) for k in seed_keys]
    graphdef = nnx.split(models[0])[0]
    params = _stack([nnx.state(mdl) for mdl in models])
    T = setup.seq_len
    cut = setup.public
    pub_x = np.stack([t["public_tokens"] for t in tasks])
    pub_y = np.stack([t["public_labels"] for t in tasks])
    data = (pub_x[:, :cut], pub_y[:, :cut], pub_x[:, cut:], pub_y[:, cut:])
    keys = jnp.stack([_keys(k, "pretrain") for k in seed_keys])
    clock = _Clock()
    if "pretrain" not in cache:
        cache["pretrain"] = make_pretrain(graphdef, setup)
    best, val, step = cache["pretrain"](params, keys, data)

    @jax.jit
    def accuracy(p, tok, lab):
        out = jax.vmap(lambda q, x: nnx.merge(graphdef, q)(x))(
            p, tok.reshape(tok.shape[0], -1, T)
        )
        return (out.argmax(-1) == lab.reshape(lab.shape[0], -1)).mean(-1)

    test = slice(m + v, m + 2 * v)
    trained = accuracy(best, tokens[:, :n, test], labels[:, :n, test])
    held = slice(m, m + 2 * v)  # a new user's two held-out halves, as in run_method
    new = accuracy(best, tokens[:, n + h :, held], labels[:, n + h :, held])
    return dict(
        states=[_pick(best, s) for s in range(len(seed_keys))],
        val=np.asarray(val).tolist(),
        step=np.asarray(step).tolist(),
        trained=np.asarray(trained).tolist(),
        new=np.asarray(new).tolist(),
        seconds=clock.seconds(),
    )


def _initial(setup: Setup, method: Method, bases, seed_keys):
    """Each seed's personalized model from its pretrained base (stacked)."""
    params, graphdef, info = [], None, None
    for base, key in zip(bases, seed_keys):
        model = Classifier(setup, rngs=_rngs(_keys(key, "base")))
        nnx.update(model, base)
        personalize(model, method, setup.users, _keys(key, method.label))
        graphdef, p = split(model)
        params.append(p)
        info = info or dict(
            storage(model),
            sparsity={
                path: layer.sparsity for path, layer in _sparse_layers(model).items()
            },
        )
    return graphdef, _stack(params), info


def _cold_params(graphdef, chosen, setup: Setup, method: Method, seed_keys):
    """Each seed's chosen model with fresh rows for the cold-start users."""
    out = []
    for s, key in enumerate(seed_keys):
        p = _pick(chosen, s)
        model = nnx.merge(graphdef, p["base"], p["shared"], p["rows"], p["frozen"])
        rngs = _rngs(_keys(key, "cold " + method.label))
        for layer in adapter_layers(model).values():
            for name, rows in layer.new_rows(setup.users, rngs).items():
                getattr(layer, name)[...] = rows
        out.append(split(model)[1])
    return _stack(out)


def _choose(curves, grid, every) -> dict:
    """Per seed: the chosen (lr, step) on ``curves (S, L, checks)`` and flags."""
    lr_i, check = zip(*(select(c) for c in curves))
    last = curves.shape[2] - 1
    return dict(
        lr_index=list(lr_i),
        check=list(check),
        lr=[grid[i] for i in lr_i],
        step=[c * every for c in check],
        step_is_last=[c == last for c in check],
        lr_at_edge=[i in (0, len(grid) - 1) and len(grid) > 1 for i in lr_i],
    )


def run_method(setup, method, variant, bases, seed_keys, splits, compiled) -> dict:
    """The shared phase then the cold start of one method, size and variant."""
    clock = _Clock()
    graphdef, params, info = _initial(setup, method, bases, seed_keys)
    grid = jnp.asarray(setup.grid, jnp.float32)
    compile_seconds = 0.0
    if method.label not in compiled:
        lowered = make_program(graphdef, info["sparsity"], setup).lower(
            params, grid, jnp.ones(2, jnp.float32), splits["trained"]
        )
        compiled[method.label] = lowered.compile()
        compile_seconds = clock.seconds()
    program = compiled[method.label]
    flags = jnp.asarray([1.0 if variant == "joint" else 0.0, 1.0], jnp.float32)
    acc_a, acc_b, _, best = program(params, grid, flags, splits["trained"])
    val = np.asarray(acc_a).mean(-1)  # (S, L, checks)
    chosen = _choose(val, setup.grid, setup.eval_every)
    S = len(seed_keys)
    trained = np.asarray(acc_b).mean(-1)[range(S), chosen["lr_index"], chosen["check"]]
    start = _pick(best, np.arange(S), np.asarray(chosen["lr_index"]))
    cold = _cold_params(graphdef, start, setup, method, seed_keys)
    c_a, c_b = program(cold, grid, jnp.zeros(2, jnp.float32), splits["cold"])[:2]
    h = setup.users // 2
    cal = np.asarray(c_a)[..., :h].mean(-1)  # calibration users' validation
    new = (np.asarray(c_a)[..., h:].mean(-1) + np.asarray(c_b)[..., h:].mean(-1)) / 2
    cold_choice = _choose(cal, setup.grid, setup.eval_every)
    new_acc = new[range(S), cold_choice["lr_index"], cold_choice["check"]]
    zero = new[:, 0, 0] if method.zero_shot else None
    return dict(
        method=method.name,
        size=method.size,
        label=method.label,
        options=dict(method.options),
        variant=variant,
        **{k: v for k, v in info.items() if k != "sparsity"},
        trained=dict(
            acc=trained.tolist(),
            ci=t_interval(trained),
            val=val[range(S), chosen["lr_index"], chosen["check"]].tolist(),
            **chosen,
        ),
        new=dict(
            acc=new_acc.tolist(),
            ci=t_interval(new_acc),
            val=cal[range(S), cold_choice["lr_index"], cold_choice["check"]].tolist(),
            zero_shot=None
            if zero is None
            else dict(acc=zero.tolist(), ci=t_interval(zero)),
            **cold_choice,
        ),
        budget=dict(
            grid=np.asarray(grid).tolist(),
            steps=setup.steps,
            eval_every=setup.eval_every,
            checks=int(acc_a.shape[2]),
            cold_checks=int(c_a.shape[2]),
            seeds=S,
        ),
        compile_seconds=compile_seconds,
        seconds=clock.seconds(),
    )


def _global_row(pre) -> dict:
    return dict(
        method="global",
        size="",
        label="global",
        options={},
        variant="base",
        bytes_per_user=0,
        floats_per_user=0,
        ints_per_user=0,
        shared_bytes=0,
        base_bytes=None,
        trained=dict(
            acc=pre["trained"],
            ci=t_interval(pre["trained"]),
            val=pre["val"],
            step=pre["step"],
        ),
        new=dict(
            acc=pre["new"],
            ci=t_interval(pre["new"]),
            zero_shot=dict(acc=pre["new"], ci=t_interval(pre["new"])),
        ),
        compile_seconds=0.0,
        seconds=pre["seconds"],
    )


def plan(setup: Setup, teacher: str) -> list[tuple[Method, str]]:
    """The ``(method, variant)`` runs of one teacher under ``setup``'s cuts."""
    out = []
    for method in methods(setup.sweep):
        if setup.only and not {method.name, method.label} & set(setup.only):
            continue
        for variant in setup.variants:
            if teacher == "none" and variant not in setup.none_variants:
                continue
            cut = (
                setup.none_sizes
                if teacher == "none"
                else (setup.joint_sizes if variant == "joint" else "all")
            )
            if cut == "one" and not method.middle and setup.sweep != "small":
                continue
            out.append((method, variant))
    return out


def references(rows: list[dict]) -> dict:
    """Per (variant, split): the LRS row with the best mean validation accuracy."""
    out = {}
    for variant in {r["variant"] for r in rows if r["method"] == "lrs"}:
        cands = [r for r in rows if r["method"] == "lrs" and r["variant"] == variant]
        for split in ("trained", "new"):
            best = max(cands, key=lambda r: np.mean(r[split]["val"]))
            out[f"{variant}/{split}"] = best["label"]
    return out


def judge(rows: list[dict], refs: dict) -> None:
    """Adds ``vs_lrs`` (``win`` / ``tie`` / ``loss`` of LRS) to every row, in place.

    Each row is compared with the reference LRS row of its variant (the
    ``global`` row with the ``frozen`` one) by :func:`outcome` (``outcome``:
    the rule) and :func:`paired_outcome` (``paired``: for information); a
    reference is not compared with itself.
    """
    by = {(r["label"], r["variant"]): r for r in rows}
    for r in rows:
        variant = r["variant"] if r["variant"] in VARIANTS else "frozen"
        r["vs_lrs"] = {}
        for split in ("trained", "new"):
            ref_label = refs.get(f"{variant}/{split}")
            if ref_label is None or (r["label"], r["variant"]) == (ref_label, variant):
                continue
            ref = by[(ref_label, variant)]
            r["vs_lrs"][split] = dict(
                reference=ref_label,
                outcome=outcome(r[split]["ci"], ref[split]["ci"]),
                paired=paired_outcome(r[split]["acc"], ref[split]["acc"]),
            )


def _log(line: str) -> None:
    print(line, flush=True)


def run(setup: Setup, out: Path, *, seed: int = 0, log=_log) -> dict:
    """Runs the study under ``setup``; writes the JSON, the table and the plot.

    The outputs are rewritten after each teacher (``complete`` is False until
    the last one), so an interrupted run keeps what it finished.
    """
    out.mkdir(parents=True, exist_ok=True)
    clock = _Clock()
    load_start = os.getloadavg()
    teachers, compiled, dp_part = [], {}, None
    for t_i, teacher in enumerate(setup.teachers):
        seed_keys = [
            jax.random.fold_in(jax.random.key(seed), 1000 * t_i + s)
            for s in range(setup.seeds)
        ]
        tasks = [make_task(_keys(k, "task"), teacher, setup) for k in seed_keys]
        tokens = np.stack([t["tokens"] for t in tasks])
        labels = np.stack([t["labels"] for t in tasks])
        splits = _splits(tokens, labels, setup)
        pre = pretrain(setup, tasks, tokens, labels, seed_keys, compiled)
        rows = [_global_row(pre)]
        log(
            f"[{teacher}] global: trained {np.mean(pre['trained']):.3f} "
            f"new {np.mean(pre['new']):.3f} ({pre['seconds']:.0f} s)"
        )
        for method, variant in plan(setup, teacher):
            row = run_method(
                setup, method, variant, pre["states"], seed_keys, splits, compiled
            )
            rows.append(row)
            log(
                f"[{teacher}] {row['label']:<14} {variant:<6} "
                f"{row['bytes_per_user']:5d} B/user  trained "
                f"{row['trained']['ci']['mean']:.3f}+-{row['trained']['ci']['half']:.3f}"
                f"  new {row['new']['ci']['mean']:.3f}+-{row['new']['ci']['half']:.3f}"
                f"  ({row['compile_seconds']:.0f} s compile, {row['seconds']:.0f} s)"
            )
        refs = references(rows)
        judge(rows, refs)
        if setup.dp and teacher == dp_teacher(setup):
            dp_part = dp_section(setup, teacher, pre, seed_keys, splits, compiled, log)
        teachers.append(
            dict(
                teacher=teacher,
                info=[t["info"] for t in tasks],
                pretrain=dict(val=pre["val"], step=pre["step"]),
                references=refs,
                rows=rows,
            )
        )
        record = _record(setup, seed, teachers, clock, load_start)
        if dp_part is not None:
            record["dp"] = dp_part
        record["complete"] = t_i == len(setup.teachers) - 1
        write(record, out)
    return record


def dp_teacher(setup: Setup) -> str:
    """The teacher of the DP part: ``lrs`` when it runs, else the first."""
    return "lrs" if "lrs" in setup.teachers else setup.teachers[0]


def dp_section(setup, teacher, pre, seed_keys, splits, compiled, log=_log) -> dict:
    """The record's ``dp`` section: :func:`run_dp` and :func:`audit_dp_step`."""
    part = dict(teacher=teacher, **run_dp(setup, pre["states"], seed_keys, splits,
                                          compiled, log))  # fmt: skip
    part["global"] = dict(trained=pre["trained"], new=pre["new"])
    part["setup"] = {
        k: v for k, v in dataclasses.asdict(setup).items() if k.startswith("dp")
    }
    if setup.dp_audit_trials:
        part["audit"] = audit_dp_step(
            setup, pre["states"][0], key=_keys(seed_keys[0], "audit")
        )
        a = part["audit"]
        log(
            f"[dp] audit of one step: lower bound {a['epsilon_lower_bound']:.3f} "
            f"<= claim {a['epsilon_claimed']:.3f}: {a['below_claim']} "
            f"({a['seconds']:.0f} s)"
        )
    return part


def run_dp_only(setup: Setup, out: Path, *, seed: int = 0, into=None, log=_log):
    """Only the DP part (its teacher's tasks and bases, rebuilt from ``seed``).

    ``into``: a saved record (same setup and seed) that gets the ``dp``
    section; its global row must be reproduced exactly (the same bases).
    """
    clock = _Clock()
    teacher = dp_teacher(setup)
    t_i = setup.teachers.index(teacher)
    seed_keys = [
        jax.random.fold_in(jax.random.key(seed), 1000 * t_i + s)
        for s in range(setup.seeds)
    ]
    tasks = [make_task(_keys(k, "task"), teacher, setup) for k in seed_keys]
    tokens = np.stack([t["tokens"] for t in tasks])
    labels = np.stack([t["labels"] for t in tasks])
    splits = _splits(tokens, labels, setup)
    pre = pretrain(setup, tasks, tokens, labels, seed_keys, {})
    part = dp_section(setup, teacher, pre, seed_keys, splits, {}, log)
    if into is not None:  # the same bases as the saved comparison's?
        saved = next(t for t in into["teachers"] if t["teacher"] == teacher)
        part["global_reproduced"] = bool(
            np.allclose(saved["rows"][0]["trained"]["acc"], pre["trained"])
        )
    part["seconds_with_pretraining"] = clock.seconds()
    record = into if into is not None else dict(study="fair", teachers=[])
    record["dp"] = part
    record.setdefault("complete", True)
    write(record, out)
    return record


def _record(setup, seed, teachers, clock, load_start) -> dict:
    return dict(
        study="fair",
        setup=dataclasses.asdict(setup),
        constants=dict(
            grid=list(setup.grid),
            base_lr=BASE_LR,
            pretrain_lr=PRETRAIN_LR,
            teacher_rank=TEACHER_RANK,
            teacher_sparsity=TEACHER_SPARSITY,
            student_default=list(STUDENT_DEFAULT),
            linear_targets=linear_targets(setup.num_layers),
            lrs_strength=LRS_STRENGTH,
            lrs_spike=LRS_SPIKE,
            function_strength=FUNCTION_STRENGTH,
            level=LEVEL,
        ),
        seed=seed,
        teachers=teachers,
        machine=dict(
            platform=platform.platform(),
            cpus=os.cpu_count(),
            jax=jax.__version__,
            backend=jax.default_backend(),
            load_average_start=list(load_start),
            load_average_end=list(os.getloadavg()),
        ),
        total_seconds=clock.seconds(),
        total_cpu_seconds=clock.cpu_seconds(),
    )


def write(record: dict, out: Path) -> None:
    """Writes ``fair_study.json``, ``fair_study.md`` and ``fair_study.png``
    (and ``fair_study_dp.png`` when the record has a ``dp`` section)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_NAME).write_text(json.dumps(_plain(record), indent=1) + "\n")
    parts = [markdown(record)] if record["teachers"] else []
    if "dp" in record:
        parts.append(dp_markdown(record))
        plot_dp(record, out / DP_PLOT_NAME)
    (out / TABLE_NAME).write_text("\n\n".join(parts) + "\n")
    if record["teachers"]:
        plot(record, out / PLOT_NAME)


def rejudge(record: dict) -> dict:
    """Recomputes every teacher's references and outcomes from its rows (in place)."""
    for t in record["teachers"]:
        t["references"] = references(t["rows"])
        judge(t["rows"], t["references"])
    return record


def _plain(x):
    """JSON-safe copy (tuples to lists, numpy scalars to Python, inf as strings)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


# ----------------------------------------------------------------------------
# user-level DP training of the shared parts (base and U), personal rows local


def cross_entropy(logits, labels):
    """Mean cross-entropy of one user's examples (the DP part's ``loss_fn``)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def dp_config(setup: Setup, epsilon: float):
    """The :class:`lrs.nn.dp.DPTrainConfig` of the shared phase at ``epsilon``.

    ``train='all'``: every ``nnx.Param`` that is not a per-user table, i.e.
    the pretrained base and the adapters' shared factors ``U``.
    """
    from lrs.nn import dp

    return dp.DPTrainConfig(
        epsilon=float(epsilon),
        delta=setup.dp_delta,
        steps=setup.dp_steps,
        users_per_step=setup.dp_users_per_step or setup.users,
        clip_norm=setup.dp_clip,
        learning_rate=setup.dp_lr,
        user_lr=setup.dp_user_lr,
        train="all",
    )


def _dp_models(setup, method, bases, seed_keys, tokens, labels, epsilon):
    """Per seed: the shared phase at ``epsilon`` (0: none), then fresh rows.

    Returns the stacked :func:`split` parameters (every user's rows reset to
    a new user's, so the personal phase is the same for every budget) and
    the :class:`lrs.nn.dp.DPTrainResult` s.
    """
    from lrs.nn import dp

    params, results = [], []
    for s, (base, key) in enumerate(zip(bases, seed_keys)):
        model = Classifier(setup, rngs=_rngs(_keys(key, "base")))
        nnx.update(model, base)
        personalize(model, method, setup.users, _keys(key, method.label))
        if epsilon > 0:
            results.append(
                dp.train_shared_private(
                    model,
                    jnp.asarray(tokens[s]),
                    jnp.asarray(labels[s]),
                    dp_config(setup, epsilon),
                    key=_keys(key, f"dp {epsilon}"),
                    loss_fn=cross_entropy,
                )
            )
        for layer in adapter_layers(model).values():
            for name, rows in layer.new_rows(setup.users).items():
                getattr(layer, name)[...] = rows
        params.append(split(model)[1])
    return _stack(params), results


def run_dp(setup, bases, seed_keys, splits, compiled, log=None) -> dict:
    """Accuracy against epsilon: DP shared phase, then local personal phase.

    For each budget in ``(0, *setup.dp_epsilons)`` and each seed: the shared
    parts of ``setup.dp_method`` (the pretrained base and ``U``) are trained
    on the trained users' ``m`` samples by
    :func:`lrs.nn.dp.train_shared_private` (user-level DP-SGD: each sampled
    user's clipped gradient, Gaussian noise, ``dp_accounting``; budget 0: not
    trained at all, the pretrained base and the initial ``U``). Then, with
    everything shared frozen, every user's own rows (``V`` and the ``k``
    sparse entries, by iterative hard thresholding) are fitted on that user's
    samples only (local: they are never released) by the study's program
    (:func:`make_program`, same grid and steps), for trained and cold-start
    users alike. The personal phase's (rate, step) is chosen on the
    calibration users (not in the DP training set) and applied to the
    trained and the new users. Returns the ``dp`` section of the record.
    """
    method = next(m for m in methods("all") if m.label == setup.dp_method)
    clock = _Clock()
    graphdef, params, info = _initial(setup, method, bases, seed_keys)
    grid = jnp.asarray(setup.grid, jnp.float32)
    if method.label not in compiled:
        compiled[method.label] = (
            make_program(graphdef, info["sparsity"], setup)
            .lower(params, grid, jnp.ones(2, jnp.float32), splits["trained"])
            .compile()
        )
    program = compiled[method.label]
    zeros = jnp.zeros(2, jnp.float32)
    S, h = len(seed_keys), setup.users // 2
    tok, lab = splits["trained"][:2]
    rows = []
    for epsilon in (0.0, *setup.dp_epsilons):
        start = _Clock()
        stacked, results = _dp_models(
            setup, method, bases, seed_keys, tok, lab, epsilon
        )
        dp_seconds = start.seconds()
        t_b = np.asarray(program(stacked, grid, zeros, splits["trained"])[1])
        c_a, c_b = (np.asarray(a) for a in program(stacked, grid, zeros,
                                                   splits["cold"])[:2])  # fmt: skip
        choice = _choose(c_a[..., :h].mean(-1), setup.grid, setup.eval_every)
        idx = (range(S), choice["lr_index"], choice["check"])
        trained = t_b.mean(-1)[idx]
        new = ((c_a[..., h:].mean(-1) + c_b[..., h:].mean(-1)) / 2)[idx]
        rows.append(
            dict(
                epsilon=epsilon,
                noise_multiplier=[r.noise_multiplier for r in results],
                epsilon_spent=[r.epsilon for r in results],
                accountant=results[0].accountant if results else None,
                sampling_rate=results[0].sampling_rate if results else None,
                trained=dict(acc=trained.tolist(), ci=t_interval(trained)),
                new=dict(acc=new.tolist(), ci=t_interval(new)),
                local=choice,
                dp_seconds=dp_seconds,
                seconds=start.seconds(),
            )
        )
        if log:
            log(
                f"[dp] eps {epsilon:<4g} trained "
                f"{rows[-1]['trained']['ci']['mean']:.3f}"
                f"+-{rows[-1]['trained']['ci']['half']:.3f}  new "
                f"{rows[-1]['new']['ci']['mean']:.3f}"
                f"+-{rows[-1]['new']['ci']['half']:.3f}  ({start.seconds():.0f} s)"
            )
    config = dataclasses.asdict(dp_config(setup, 1.0))
    del config["epsilon"]
    return dict(
        method=method.label,
        config=config,
        bytes_per_user=info["bytes_per_user"],
        shared_bytes=info["shared_bytes"],
        base_bytes=info["base_bytes"],
        rows=rows,
        seconds=clock.seconds(),
    )


def audit_dp_step(setup: Setup, base, *, key, users: int = 8) -> dict:
    """Canary audit of one step of the DP part on the study's model.

    The method of :func:`lrs.audit.audit_nn_dp_step` on the study's
    :class:`Classifier` (pretrained ``base``, ``setup.dp_method`` adapters,
    cross-entropy): D and D' differ in one user, the canary, whose ``m``
    samples (the same tokens) are labelled with one class in D and another
    in D'. One step of :func:`lrs.nn.dp.train_shared_private` (every user in
    the batch, noise calibrated so that this release alone spends
    ``setup.dp_audit_epsilon`` at ``setup.dp_delta``) runs
    ``setup.dp_audit_trials`` times on each side; a run's score is the
    projection of its noisy gradient sum on the canary's noiseless effect,
    and :func:`lrs.audit.epsilon_lower_bound` turns the two samples into a
    95% lower bound on epsilon. Returns the ``audit`` section of the record.
    """
    from lrs.audit import epsilon_lower_bound
    from lrs.nn import dp
    from lrs.private import accounting

    clock = _Clock()
    epsilon, trials = setup.dp_audit_epsilon, setup.dp_audit_trials
    plan1 = accounting.Plan(
        steps=1, private_init=False, moment_histogram=False, step_histogram=False
    )
    z = accounting.calibrate(plan1, epsilon, setup.dp_delta, "pld")
    claim = accounting.epsilon_spent(plan1, z, setup.dp_delta, "pld")
    method = next(m for m in methods("all") if m.label == setup.dp_method)
    k_model, k_x, k_y, k_out, k_in = jax.random.split(key, 5)
    model = Classifier(setup, rngs=_rngs(k_model))
    nnx.update(model, base)
    personalize(model, method, users, k_model)
    m, T, C = setup.samples, setup.seq_len, setup.num_classes
    x = jax.random.randint(k_x, (users, m, T), 0, setup.vocab).astype(jnp.int32)
    y = jax.random.randint(k_y, (users, m), 0, C).astype(jnp.int32)
    y_out, y_in = y.at[0].set(0), y.at[0].set(1)
    graphdef, itabs, ftabs, shared, frozen = nnx.split(
        model, UserSupport, dp._FLOAT_TABLE, nnx.Param, ...
    )
    config = dataclasses.replace(dp_config(setup, epsilon), steps=1,
                                 users_per_step=users)  # fmt: skip
    opt = optax.sgd(0.0)
    state = (itabs, ftabs, shared, opt.init(shared))
    step = dp._make_step(graphdef, opt, cross_entropy, config, 1.0, users)
    leaves, treedef = jax.tree.flatten(shared)

    def release(labels, scale, k):
        keys = jax.random.split(k, len(leaves) + 1)
        normals = jax.tree.unflatten(
            treedef,
            [scale * jax.random.normal(kk, a.shape, a.dtype)
             for kk, a in zip(keys[1:], leaves, strict=True)],
        )  # fmt: skip
        _, (_, out) = step(state, frozen, x, labels, keys[0], normals)
        return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(out)]) * users

    silent = jax.random.key(1)
    sum_out, sum_in = release(y_out, 0.0, silent), release(y_in, 0.0, silent)
    diff = (sum_in - sum_out) / setup.dp_clip

    @jax.jit
    def scores(keys, labels):
        runs = jax.vmap(lambda k: release(labels, z, k))(keys)
        return ((runs - sum_out) / setup.dp_clip) @ diff

    def side(labels, k, batch=1000):
        out = []
        for lo in range(0, trials, batch):
            keys = jax.random.split(jax.random.fold_in(k, lo), min(batch, trials - lo))
            out.append(np.asarray(scores(keys, labels), np.float64))
        return np.concatenate(out)

    s_out, s_in = side(y_out, k_out), side(y_in, k_in)
    bound = epsilon_lower_bound(s_in, s_out, setup.dp_delta, confidence=LEVEL)
    return dict(
        epsilon_claimed=claim,
        delta=setup.dp_delta,
        noise_multiplier=z,
        epsilon_lower_bound=bound.epsilon,
        confidence=LEVEL,
        trials=trials,
        users=users,
        sensitivity_used=float(jnp.linalg.norm(diff)),
        below_claim=bool(bound.epsilon <= claim),
        seconds=clock.seconds(),
    )


# ----------------------------------------------------------------------------
# report: markdown tables and the Pareto plot, both from the record alone


def _ci(c: dict) -> str:
    lo, hi = float(c["lo"]), float(c["hi"])
    if not math.isfinite(lo):
        return f"{float(c['mean']):.3f}"
    return f"{float(c['mean']):.3f} [{lo:.3f}, {hi:.3f}]"


_MARK = {"win": "W", "tie": "T", "loss": "L"}


def _notes(row: dict) -> str:
    notes = []
    for split, name in (("trained", "shared"), ("new", "cold")):
        part = row[split]
        last = sum(bool(x) for x in part.get("step_is_last", []))
        edge = sum(bool(x) for x in part.get("lr_at_edge", []))
        lrs = sorted({f"{x:g}" for x in part.get("lr", [])})
        steps = part.get("step", [])
        if lrs:
            notes.append(
                f"{name}: lr {'/'.join(lrs)}, step {'/'.join(map(str, steps))}"
                + (f", last x{last}" if last else "")
            )
        del edge  # the grid's edges are reported in the JSON (lr_at_edge)
    return "; ".join(notes)


def _judged(rows, split, variant):
    return [
        r
        for r in rows
        if split in r.get("vs_lrs", {})
        and (
            r["variant"] == variant or (r["variant"] == "base" and variant == "frozen")
        )
    ]


def markdown(record: dict) -> str:
    """The summary and per-teacher tables (LRS against every row) from a record.

    ``W`` / ``T`` / ``L``: LRS (the reference size, chosen on validation,
    same variant) wins / ties / loses against the row: a win or a loss only
    when the 95% intervals over seeds are disjoint. In parentheses, the
    paired comparison of the same seeds (:func:`paired_outcome`), for
    information.
    """
    lines = [
        "| teacher | users | variant | LRS reference | B/user | LRS wins | ties "
        "| LRS losses | losses to rows with >= LRS's bytes | paired W / T / L |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    per_teacher = []
    for t in record["teachers"]:
        rows = t["rows"]
        by = {(r["label"], r["variant"]): r for r in rows}
        for split in ("trained", "new"):
            for variant in VARIANTS:
                ref_label = t["references"].get(f"{variant}/{split}")
                if ref_label is None:
                    continue
                ref = by[(ref_label, variant)]
                judged = _judged(rows, split, variant)

                def count(kind, outcome, judged=judged):
                    return [r for r in judged if r["vs_lrs"][split][kind] == outcome]

                costly = [
                    r["label"]
                    for r in count("outcome", "loss")
                    if r["bytes_per_user"] >= ref["bytes_per_user"]
                ]
                paired = " / ".join(
                    str(len(count("paired", o))) for o in ("win", "tie", "loss")
                )
                who = "trained" if split == "trained" else "new (cold start)"
                lines.append(
                    f"| {t['teacher']} | {who} | {variant} | {ref_label} | "
                    f"{ref['bytes_per_user']} | {len(count('outcome', 'win'))} | "
                    f"{len(count('outcome', 'tie'))} | "
                    f"{len(count('outcome', 'loss'))} | "
                    f"{', '.join(costly) or 'none'} | {paired} |"
                )
        info = t["info"]
        personal = np.mean([i["personal_label_fraction"] for i in info])
        shift = np.mean([i["shift_fraction"] for i in info])
        block = [
            f"**Teacher `{t['teacher']}`**: personal labels {personal:.0%}, "
            f"constant (class-shift) share of the user effect {shift:.0%}; "
            f"accuracy mean [95% interval] over {len(info)} seeds.",
            "",
            "| method | variant | B/user | shared B | trained users | LRS | "
            "new users (cold start) | LRS | zero-shot | chosen lr, step |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            marks = []
            for split in ("trained", "new"):
                v = r.get("vs_lrs", {}).get(split)
                variant = r["variant"] if r["variant"] in VARIANTS else "frozen"
                ref = t["references"].get(f"{variant}/{split}")
                if v:
                    marks.append(
                        f"{_MARK[v['outcome']]} ({_MARK[v['paired']].lower()})"
                    )
                else:
                    marks.append("ref" if ref == r["label"] else "")
            zero = r["new"].get("zero_shot")
            block.append(
                f"| {r['label']} | {r['variant']} | {r['bytes_per_user']} | "
                f"{r['shared_bytes']} | {_ci(r['trained']['ci'])} | {marks[0]} | "
                f"{_ci(r['new']['ci'])} | {marks[1]} | "
                f"{_ci(zero['ci']) if zero else '-'} | {_notes(r)} |"
            )
        per_teacher.append("\n".join(block))
    return "\n\n".join(["\n".join(lines), *per_teacher])


def plot(record: dict, path) -> str:
    """Accuracy against bytes per user, per teacher and user group, with the front.

    Columns: teachers; rows: trained users, new users (cold start). Each
    method's sizes are joined (filled: frozen base, hollow: joint); error bars
    are the 95% intervals; the dashed line is the Pareto front of the means
    (global at 1 byte on the log axis).
    """
    teachers = record["teachers"]
    fig, axes = plotting.figure(len(teachers), 2)
    names = ["global", *dict.fromkeys(m.name for m in methods("all"))]
    colours = plotting.colours(names)
    for col, t in enumerate(teachers):
        for row_i, split in enumerate(("trained", "new")):
            ax = axes[row_i][col]
            points = []
            for name in names:
                for variant in ("base", *VARIANTS):
                    rows = [
                        r
                        for r in t["rows"]
                        if r["method"] == name and r["variant"] == variant
                    ]
                    if not rows:
                        continue
                    rows.sort(key=lambda r: r["bytes_per_user"])
                    x = [max(r["bytes_per_user"], 1) for r in rows]
                    y = [float(r[split]["ci"]["mean"]) for r in rows]
                    half = [float(r[split]["ci"]["half"]) for r in rows]
                    err = [  # the interval, clipped to accuracies in [0, 1]
                        [min(h, a) for h, a in zip(half, y)],
                        [min(h, 1 - a) for h, a in zip(half, y)],
                    ]
                    hollow = variant == "joint"
                    ax.errorbar(
                        x,
                        y,
                        yerr=err,
                        color=colours[name],
                        lw=1,
                        capsize=2,
                        marker="*" if name == "global" else ("s" if hollow else "o"),
                        mfc="white" if hollow else colours[name],
                        ms=5,
                        ls=":" if hollow else "-",
                        label=name if variant in ("base", "frozen") else None,
                    )
                    points += list(zip(x, y))
            front = [points[i] for i in pareto_front(points)]
            if front:
                ax.step(
                    [p[0] for p in front],
                    [p[1] for p in front],
                    where="post",
                    color=plotting.REFERENCE,
                    ls="--",
                    lw=1,
                    alpha=0.6,
                )
            ax.set_xscale("log")
            ax.set_xlabel("bytes per user (log; global at 1)")
            ax.set_ylabel("test accuracy")
            who = "trained users" if split == "trained" else "new users (cold start)"
            ax.set_title(f"{t['teacher']} teacher: {who}")
            plotting.grid(ax)
    axes[0][0].legend(fontsize=6, ncol=2)
    return plotting.save(fig, path)


def _eps_label(e) -> str:
    e = float(e)
    return "0 (shared not trained)" if e == 0 else ("inf (no noise)" if e == math.inf
                                                  else f"{e:g}")  # fmt: skip


def dp_markdown(record: dict) -> str:
    """The DP part's table (accuracy against epsilon) and its audit, from a record.

    Every row is compared with the ``inf`` row (the same training without
    clipping or noise) by :func:`outcome` (W / T / L of the non-private
    training: disjoint intervals) and, in parentheses, :func:`paired_outcome`.
    """
    part = record["dp"]
    by = {float(r["epsilon"]): r for r in part["rows"]}
    ref = by.get(math.inf)
    c = part["config"]
    seeds = len(part["rows"][0]["trained"]["acc"])
    lines = [
        f"**User-level DP** (teacher `{part['teacher']}`, {part['method']}, "
        f"{part['bytes_per_user']} B/user): shared phase DP-SGD on the base and "
        f"`U` (delta {c['delta']:g}, {c['steps']} steps, {c['users_per_step']} "
        f"users per step, clip {c['clip_norm']:g}, Adam {c['learning_rate']:g}), "
        f"personal rows fitted locally; accuracy mean [95% interval] over "
        f"{seeds} seeds.",
        "",
        "| epsilon | noise multiplier z | accountant | trained users | vs inf "
        "| new users (cold start) | vs inf | personal phase lr, step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    g = part["global"]
    lines.append(
        f"| global (no user rows) | - | - | {_ci(t_interval(g['trained']))} | | "
        f"{_ci(t_interval(g['new']))} | | |"
    )
    for r in part["rows"]:
        e = float(r["epsilon"])
        marks = []
        for split in ("trained", "new"):
            if ref is None or e == math.inf:
                marks.append("ref" if e == math.inf else "")
                continue
            rule = outcome(ref[split]["ci"], r[split]["ci"])
            pair = paired_outcome(ref[split]["acc"], r[split]["acc"])
            marks.append(f"{_MARK[rule]} ({_MARK[pair].lower()})")
        z = [float(x) for x in r["noise_multiplier"]]
        z_text = f"{z[0]:.3g}" if z and z[0] > 0 else "-"
        lrs_ = "/".join(sorted({f"{x:g}" for x in r["local"]["lr"]}))
        steps = "/".join(map(str, r["local"]["step"]))
        lines.append(
            f"| {_eps_label(e)} | {z_text} | "
            f"{r['accountant'] if z and z[0] > 0 else '-'} | "
            f"{_ci(r['trained']['ci'])} | {marks[0]} | {_ci(r['new']['ci'])} | "
            f"{marks[1]} | lr {lrs_}, step {steps} |"
        )
    a = part.get("audit")
    if a:
        lines += [
            "",
            f"**Audit of one step** (canary user, {a['trials']:,} runs per side, "
            f"{a['users']} users): claimed epsilon {a['epsilon_claimed']:.3f} at "
            f"delta {a['delta']:g} (z = {a['noise_multiplier']:.3f}); empirical "
            f"{a['confidence']:.0%} lower bound **{a['epsilon_lower_bound']:.3f}** "
            f"({'below' if a['below_claim'] else 'ABOVE'} the claim; canary "
            f"sensitivity used {a['sensitivity_used']:.2f} of 2 clip norms).",
        ]
    return "\n".join(lines)


def plot_dp(record: dict, path) -> str:
    """Accuracy against epsilon (trained and new users) with 95% intervals."""
    part = record["dp"]
    fig, axes = plotting.figure(1, 1, size=(6.0, 4.2))
    ax = axes[0][0]
    rows = part["rows"]
    x = np.arange(len(rows))
    for i, (split, name) in enumerate(
        (("trained", "trained users"), ("new", "new users (cold start)"))
    ):
        y = np.array([float(r[split]["ci"]["mean"]) for r in rows])
        half = np.array([float(r[split]["ci"]["half"]) for r in rows])
        ax.errorbar(x + 0.06 * (2 * i - 1), y, yerr=half, marker="o", capsize=3,
                    color=f"C{i}", label=name)  # fmt: skip
        glob = np.mean(part["global"][split])
        ax.axhline(glob, color=f"C{i}", ls=":", lw=1,
                   label=f"global model ({name})")  # fmt: skip
    ax.set_xticks(x, [_eps_label(r["epsilon"]).split(" (")[0] for r in rows])
    ax.set_xlabel(
        f"epsilon at delta {part['config']['delta']:g} (0: shared parts not trained)"
    )
    ax.set_ylabel("test accuracy")
    ax.set_title(f"user-level DP shared phase, {part['method']}, {part['teacher']}")
    plotting.grid(ax)
    ax.legend(fontsize=7)
    return plotting.save(fig, path)


# ----------------------------------------------------------------------------
# command line


def build_parser(prog: str = "fair_study.py") -> argparse.ArgumentParser:
    """``--quick``, ``--out``, ``--seeds`` and the cuts (imports nothing heavy)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, 2 seeds, small sweep, frozen only (< 2 min)",
    )
    p.add_argument("--out", default="./lrs-out/fair", help="output folder")
    p.add_argument("--seeds", type=int, help="seeds (3; 2 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="first random seed (0)")
    p.add_argument("--teachers", help=f"comma list among {', '.join(TEACHERS)}")
    p.add_argument("--variants", help=f"comma list among {', '.join(VARIANTS)}")
    p.add_argument("--methods", help="comma list of method names or name:size labels")
    p.add_argument("--users", type=int, help="trained users (= cold-start users)")
    p.add_argument("--steps", type=int, help="steps of every training run")
    p.add_argument(
        "--report",
        metavar="JSON",
        help="no training: rebuild the table and plot of a saved record into --out",
    )
    p.add_argument(
        "--sweep",
        choices=SWEEPS,
        help="sizes: all, default (all but lrs.studies.fair.CUT) or small (quick)",
    )
    p.add_argument(
        "--dp",
        action="store_true",
        help="also run the user-level DP part (accuracy against epsilon, audit)",
    )
    p.add_argument(
        "--dp-only",
        action="store_true",
        help="run only the DP part (its teacher's data and bases, then DP)",
    )
    p.add_argument(
        "--dp-into",
        metavar="JSON",
        help="with --dp-only: add the dp section to this saved record (its setup "
        "and seed), writing into --out",
    )
    p.add_argument("--dp-epsilons", help="comma list, e.g. 1,2,4,8,inf")
    p.add_argument("--dp-trials", type=int, help="audit runs per side (0: no audit)")
    p.add_argument(
        "--joint-sizes",
        choices=("all", "one"),
        help="joint variant at every size or the middle one (one)",
    )
    return p


def _saved_setup(record: dict) -> Setup:
    """The :class:`Setup` of a saved record (lists back to tuples)."""
    fields = {f.name for f in dataclasses.fields(Setup)}
    kept = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in record["setup"].items()
        if k in fields and not k.startswith("dp")
    }
    return Setup(**kept)


def setup_from_args(args, base: Setup | None = None) -> Setup:
    """The :class:`Setup` that ``args`` ask for (ValueError when it is not valid)."""
    setup = base or (QUICK if args.quick else DEFAULT)
    changes = {}
    if args.dp or args.dp_only:
        changes["dp"] = True
    if args.dp_epsilons:
        changes["dp_epsilons"] = tuple(
            float(x) for x in args.dp_epsilons.split(",") if x.strip()
        )
    if args.dp_trials is not None:
        changes["dp_audit_trials"] = args.dp_trials
    if args.seeds is not None:
        if args.seeds < 2:
            raise ValueError(
                f"--seeds must be >= 2 (an interval needs 2); got {args.seeds}"
            )
        changes["seeds"] = args.seeds
    for name in ("teachers", "variants"):
        if getattr(args, name):
            changes[name] = tuple(
                x.strip() for x in getattr(args, name).split(",") if x.strip()
            )
    for name in ("users", "steps"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.joint_sizes:
        changes["joint_sizes"] = args.joint_sizes
    if args.sweep:
        changes["sweep"] = args.sweep
    if args.methods:
        changes["only"] = tuple(x.strip() for x in args.methods.split(",") if x.strip())
    return dataclasses.replace(setup, **changes)


def main(argv: list[str] | None = None, prog: str = "fair_study.py") -> int:
    """Parses ``argv`` (``--quick``, ``--out DIR``, ``--seeds N``, ...) and runs."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    into = None
    if args.dp_into:
        if not args.dp_only:
            parser.error("--dp-into needs --dp-only")
        into = json.loads(Path(args.dp_into).read_text())
    try:
        setup = setup_from_args(args, _saved_setup(into) if into else None)
    except ValueError as e:
        parser.error(str(e))
    if args.report:
        record = rejudge(json.loads(Path(args.report).read_text()))
        write(record, Path(args.out).expanduser())
        print(f"report: {(Path(args.out).expanduser() / TABLE_NAME).resolve()}")
        return 0
    cheap = jax.config.read("jax_disable_most_optimizations")
    if args.quick:  # compilation dominates a tiny run: compile cheaply
        jax.config.update("jax_disable_most_optimizations", True)
    try:
        if args.dp_only:
            seed = into["seed"] if into else args.seed
            record = run_dp_only(setup, Path(args.out).expanduser(), seed=seed,
                                 into=into)  # fmt: skip
            out = Path(args.out).expanduser()
            seconds = record["dp"]["seconds_with_pretraining"]
            print(f"results: {(out / RESULTS_NAME).resolve()}  ({seconds:.0f} s)")
            return 0
        else:
            record = run(setup, Path(args.out).expanduser(), seed=args.seed)
    finally:
        jax.config.update("jax_disable_most_optimizations", cheap)
    out = Path(args.out).expanduser()
    print(
        f"results: {(out / RESULTS_NAME).resolve()}  "
        f"({record['total_seconds']:.0f} s wall, "
        f"{record['total_cpu_seconds']:.0f} s CPU)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
