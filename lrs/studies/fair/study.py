"""The study's driver: which runs, every teacher in turn, the record."""

from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path

import jax
import numpy as np

from lrs.studies.fair.dp import dp_section, dp_teacher
from lrs.studies.fair.method_table import (
    STUDENT_DEFAULT,
    TEACHER_RANK,
    TEACHER_SPARSITY,
    Method,
    linear_targets,
    methods,
)
from lrs.studies.fair.report import write
from lrs.studies.fair.setup import BASE_LR, LEVEL, PRETRAIN_LR, Setup
from lrs.studies.fair.stats import judge, references, t_interval
from lrs.studies.fair.tasks import (
    FUNCTION_STRENGTH,
    LRS_SPIKE,
    LRS_STRENGTH,
    make_task,
)
from lrs.studies.fair.training import (
    Clock,
    key_for,
    pretrain,
    print_line,
    run_method,
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


def _teacher_data(setup, seed: int, t_i: int, teacher: str, compiled: dict):
    """One teacher's per-seed keys, tasks, data splits and pretrained bases
    (``compiled``: the programs cache shared across teachers)."""
    seed_keys = [
        jax.random.fold_in(jax.random.key(seed), 1000 * t_i + s)
        for s in range(setup.seeds)
    ]
    tasks = [make_task(key_for(k, "task"), teacher, setup) for k in seed_keys]
    tokens = np.stack([t["tokens"] for t in tasks])
    labels = np.stack([t["labels"] for t in tasks])
    pre = pretrain(setup, tasks, tokens, labels, seed_keys, compiled)
    return seed_keys, tasks, _splits(tokens, labels, setup), pre


def run(setup: Setup, out: Path, *, seed: int = 0, log=print_line) -> dict:
    """Runs the study under ``setup``; writes the JSON, the table and the plot.

    The outputs are rewritten after each teacher (``complete`` is False until
    the last one), so an interrupted run keeps what it finished.
    """
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    load_start = os.getloadavg()
    teachers, compiled, dp_part = [], {}, None
    for t_i, teacher in enumerate(setup.teachers):
        seed_keys, tasks, splits, pre = _teacher_data(
            setup, seed, t_i, teacher, compiled
        )
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


def run_dp_only(setup: Setup, out: Path, *, seed: int = 0, into=None, log=print_line):
    """Only the DP part (its teacher's tasks and bases, rebuilt from ``seed``).

    ``into``: a saved record (same setup and seed) that gets the ``dp``
    section; its global row must be reproduced exactly (the same bases).
    """
    clock = Clock()
    teacher = dp_teacher(setup)
    t_i = setup.teachers.index(teacher)
    seed_keys, _, splits, pre = _teacher_data(setup, seed, t_i, teacher, {})
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
