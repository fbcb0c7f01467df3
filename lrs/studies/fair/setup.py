"""The protocol's constants and :class:`Setup`, the sizes of one run."""

from __future__ import annotations

import dataclasses
import math

from lrs.studies.fair.method_table import SWEEPS, methods
from lrs.validation import check_integer

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


#: Level of every interval.
LEVEL = 0.95


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
