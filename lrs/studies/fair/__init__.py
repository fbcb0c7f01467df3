"""A fair personalization study on the Flax NNX adapters (issue 18).

Every method of :func:`lrs.nn.personalize` (LRS, per-user LoRA, PLoRA's
user-conditioned LoRA, soft prompt, user token, per-user head), PLoRA as
published (its layer with personalized dropout and the mutual-information
term, :mod:`~lrs.studies.fair.plora`), a per-user class bias
(:class:`lrs.nn.bias_layers.UserBiasLinear`) and dense per-user deltas on the
personalized layers are trained by one protocol:

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

Modules: :mod:`~lrs.studies.fair.setup` (constants, :class:`Setup`),
:mod:`~lrs.studies.fair.method_table` (:class:`Method`, :func:`methods`,
:func:`personalize`, :func:`storage`), :mod:`~lrs.studies.fair.model`
(:class:`Classifier`), :mod:`~lrs.studies.fair.tasks` (the teachers),
:mod:`~lrs.studies.fair.programs` (the jitted programs),
:mod:`~lrs.studies.fair.plora` (PLoRA's published training objective),
:mod:`~lrs.studies.fair.training` (pretraining, :func:`run_method`),
:mod:`~lrs.studies.fair.stats` (intervals, outcomes, judging),
:mod:`~lrs.studies.fair.dp` (the DP part and its audit),
:mod:`~lrs.studies.fair.study` (:func:`run`, the record),
:mod:`~lrs.studies.fair.report` (tables, plots, writing) and
:mod:`~lrs.studies.fair.cli` (:func:`main`).
"""

import dataclasses  # noqa: F401  (``fair.dataclasses`` as in the single module)

from lrs.nn.user_state import UserSupport  # noqa: F401  (``fair.UserSupport``, tests)
from lrs.studies.fair.cli import build_parser, main, setup_from_args
from lrs.studies.fair.dp import (
    audit_dp_step,
    cross_entropy,
    dp_config,
    dp_section,
    dp_teacher,
    run_dp,
)
from lrs.studies.fair.method_table import (
    CUT,
    PLORA_DROPOUT,
    PLORA_MI,
    PLORA_USER_DROPOUT,
    STUDENT_DEFAULT,
    SWEEPS,
    TEACHER_RANK,
    TEACHER_SPARSITY,
    Method,
    linear_targets,
    methods,
    personalize,
    storage,
)
from lrs.studies.fair.model import Classifier
from lrs.studies.fair.plora import mutual_information_loss, objective
from lrs.studies.fair.programs import hard_threshold, make_pretrain, make_program, split
from lrs.studies.fair.report import (
    DP_PLOT_NAME,
    PLOT_NAME,
    RESULTS_NAME,
    TABLE_NAME,
    dp_markdown,
    markdown,
    plot,
    plot_dp,
    write,
)
from lrs.studies.fair.setup import (
    BASE_LR,
    DEFAULT,
    GRID,
    LEVEL,
    PRETRAIN_LR,
    QUICK,
    TEACHERS,
    VARIANTS,
    Setup,
)
from lrs.studies.fair.stats import (
    judge,
    outcome,
    paired_outcome,
    pareto_front,
    references,
    rejudge,
    select,
    t_interval,
)
from lrs.studies.fair.study import plan, run, run_dp_only
from lrs.studies.fair.tasks import (
    FUNCTION_STRENGTH,
    LRS_SPIKE,
    LRS_STRENGTH,
    make_task,
)
from lrs.studies.fair.training import pretrain, run_method

__all__ = [
    "RESULTS_NAME",
    "PLOT_NAME",
    "DP_PLOT_NAME",
    "TABLE_NAME",
    "GRID",
    "BASE_LR",
    "PRETRAIN_LR",
    "TEACHERS",
    "VARIANTS",
    "TEACHER_RANK",
    "TEACHER_SPARSITY",
    "STUDENT_DEFAULT",
    "LEVEL",
    "linear_targets",
    "Setup",
    "t_interval",
    "outcome",
    "paired_outcome",
    "select",
    "pareto_front",
    "Method",
    "SWEEPS",
    "CUT",
    "PLORA_DROPOUT",
    "PLORA_USER_DROPOUT",
    "PLORA_MI",
    "mutual_information_loss",
    "objective",
    "methods",
    "DEFAULT",
    "QUICK",
    "Classifier",
    "personalize",
    "storage",
    "LRS_STRENGTH",
    "LRS_SPIKE",
    "FUNCTION_STRENGTH",
    "make_task",
    "split",
    "hard_threshold",
    "make_program",
    "make_pretrain",
    "pretrain",
    "run_method",
    "plan",
    "references",
    "judge",
    "run",
    "dp_teacher",
    "dp_section",
    "run_dp_only",
    "write",
    "rejudge",
    "cross_entropy",
    "dp_config",
    "run_dp",
    "audit_dp_step",
    "markdown",
    "plot",
    "dp_markdown",
    "plot_dp",
    "build_parser",
    "setup_from_args",
    "main",
]
