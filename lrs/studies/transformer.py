"""Personalized transformer study: LRS layers against the usual adapters.

For each task kind (``lrs``: realizable, ``dense``: misspecified) and each number
of samples per user m, it draws a teacher task, pretrains a global transformer
on the trained users, then for every method

1. trains from that base for ``--steps`` steps (shared phase; early stopping
   on a validation draw of the trained users),
2. cold-starts ``--new-users`` users for ``--cold-steps`` steps with everything
   shared frozen (early stopping on their validation draw),

and records test loss/accuracy on unseen samples of trained and of new users,
per-user parameters and bytes, and the time. Every method gets the same loop,
budget and step sizes. Writes ``transformer.json`` and ``transformer.png``.

Run as ``lrs transformer [...]`` or ``python experiments/personalized_transformer.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from lrs.studies import plotting

RESULTS_NAME = "transformer.json"
PLOT_NAME = "transformer.png"
METHODS = (
    "lrs",
    "per_user_head",
    "per_user_lora",
    "user_conditioned_lora",
    "soft_prompt",
    "user_token",
    "global",
    "full_finetune",
)
EXTRA_METHODS = ("lrs_lowrank", "lrs_sparse")
DEFAULTS = dict(
    kinds="lrs,dense",
    samples="5,10,20,50",
    users=1000,
    new_users=100,
    steps=150,
    cold_steps=60,
    pretrain_steps=200,
    methods=",".join(METHODS),
    d_model=32,
    layers=2,
)
QUICK = dict(
    kinds="lrs",
    samples="10",
    users=200,
    new_users=50,
    steps=40,
    cold_steps=20,
    pretrain_steps=40,
    methods="lrs,per_user_lora,global",
    d_model=16,
    layers=1,
)


def _csv(kind):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{kind}: expected a comma list")
        return items

    return parse


def build_parser(prog: str = "lrs transformer") -> argparse.ArgumentParser:
    """Arguments of the study (imports nothing heavy)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])

    def preset(name):
        return f"{DEFAULTS[name]}; {QUICK[name]} with --quick"

    p.add_argument("--quick", action="store_true", help="a run under a minute")
    p.add_argument("--kinds", help=f"task kinds, lrs and/or dense ({preset('kinds')})")
    p.add_argument("--samples", help=f"samples per user m ({preset('samples')})")
    p.add_argument("--users", type=int, help=f"trained users ({preset('users')})")
    p.add_argument(
        "--new-users", type=int, help=f"cold-start users ({preset('new_users')})"
    )
    p.add_argument("--steps", type=int, help=f"shared-phase steps ({preset('steps')})")
    p.add_argument(
        "--cold-steps", type=int, help=f"cold-start steps ({preset('cold_steps')})"
    )
    p.add_argument(
        "--pretrain-steps",
        type=int,
        help=f"global pretraining ({preset('pretrain_steps')})",
    )
    p.add_argument(
        "--methods",
        help=f"among {', '.join(METHODS + EXTRA_METHODS)} ({preset('methods')})",
    )
    p.add_argument("--d-model", type=int, help=f"model width ({preset('d_model')})")
    p.add_argument(
        "--layers", type=int, help=f"transformer blocks ({preset('layers')})"
    )
    p.add_argument("--rank", type=int, default=4, help="LRS rank r (4)")
    p.add_argument("--sparsity", type=int, default=8, help="LRS sparsity k (8)")
    p.add_argument("--lr", type=float, default=3e-3, help="shared Adam step (3e-3)")
    p.add_argument(
        "--lr-user", type=float, default=0.1, help="per-user Adam step (0.1)"
    )
    p.add_argument("--lr-sparse", type=float, default=0.3, help="LRS IHT step (0.3)")
    p.add_argument("--seed", type=int, default=0, help="seed of tasks and training (0)")
    p.add_argument("--out", default="./lrs-out", help="output directory (./lrs-out)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="no PNG")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _resolve(args) -> None:
    preset = QUICK if args.quick else DEFAULTS
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if isinstance(args.kinds, str):
        args.kinds = _csv("--kinds")(args.kinds)
    if isinstance(args.methods, str):
        args.methods = _csv("--methods")(args.methods)
    if isinstance(args.samples, str):
        try:
            args.samples = [int(s) for s in _csv("--samples")(args.samples)]
        except ValueError:
            raise ValueError(
                f"--samples must be integers; got {args.samples!r}"
            ) from None
    for kind in args.kinds:
        if kind not in ("lrs", "dense"):
            raise ValueError(f"--kinds must be lrs and/or dense; got {kind!r}")
    for name in args.methods:
        if name not in METHODS + EXTRA_METHODS:
            raise ValueError(f"--methods: unknown method {name!r}")
    for name in ("users", "new_users", "steps", "cold_steps", "pretrain_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.samples) < 1:
        raise ValueError("--samples must be >= 1")
    for name in ("lr", "lr_user", "lr_sparse"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("rank", "sparsity", "d_model", "layers"):
        if getattr(args, name) < (1 if name in ("d_model", "layers") else 0):
            raise ValueError(f"--{name.replace('_', '-')} is out of range")
    if args.d_model % 4:
        raise ValueError(f"--d-model must be a multiple of 4 heads; got {args.d_model}")


def make_adapter(name, model, layers, rank, sparsity):
    """The adapter called ``name`` on ``layers`` (same sizes for every run)."""
    from lrs.nn import adapters as A

    if name == "lrs":
        return A.LRS(model, layers, rank=rank, sparsity=sparsity)
    if name == "lrs_lowrank":
        return A.LRS(model, layers, rank=rank, sparsity=0)
    if name == "lrs_sparse":
        return A.LRS(model, layers, rank=0, sparsity=sparsity)
    table = dict(
        per_user_head=A.PerUserHead,
        per_user_lora=A.PerUserLoRA,
        user_conditioned_lora=A.UserConditionedLoRA,
        soft_prompt=A.SoftPrompt,
        user_token=A.UserToken,
        full_finetune=A.FullFineTune,
    )
    table["global"] = A.GlobalModel
    return table[name](model, layers)


def _head(split, users=256):
    """The first ``users`` users of a split: early stopping looks at these."""
    return split.tokens[:users], split.labels[:users]


def _method(name, adapter, run, cold, task, keys, progress, tag):
    from lrs.nn import train as T

    shared, users = adapter.init(keys[0], task.train.labels.shape[0])
    params = {"base": run["base"], "shared": shared, "users": users}
    res = T.train(
        keys[1],
        adapter,
        run["model"],
        params,
        *task.train,
        run["config"],
        val=_head(task.val),
        progress=progress,
        desc=f"{name} {tag}",
    )
    new_users = adapter.init_users(keys[2], task.new_train.labels.shape[0])
    cold_params = {**res.params, "users": new_users}
    cold_seconds, cold_step = 0.0, 0
    if adapter.per_user_floats:
        out = T.train(
            keys[3],
            adapter,
            run["model"],
            cold_params,
            *task.new_train,
            cold,
            phase="new_users",
            val=_head(task.new_val),
            progress=progress,
            desc=f"{name} {tag} cold start",
        )
        cold_params, cold_seconds, cold_step = out.params, out.seconds, out.best_step
    from lrs.nn.adapters import per_user_bytes

    trained = T.evaluate(adapter, run["model"], res.params, *task.test)
    new = T.evaluate(adapter, run["model"], cold_params, *task.new_test)
    return dict(
        method=name,
        per_user_floats=adapter.per_user_floats,
        per_user_ints=adapter.per_user_ints,
        per_user_bytes=per_user_bytes(adapter),
        trained_users=dict(loss=trained[0], accuracy=trained[1]),
        new_users=dict(loss=new[0], accuracy=new[1]),
        train_seconds=res.seconds,
        cold_start_seconds=cold_seconds,
        best_step=res.best_step,
        cold_best_step=cold_step,
    )


def run_setting(args, model, kind, m, key) -> dict:
    """All methods on one task kind and one m; returns the setting's record."""
    import jax

    from lrs.nn import adapters as A
    from lrs.nn import init
    from lrs.nn import train as T
    from lrs.nn.task import TaskConfig, make_task

    layers = (f"block{model.num_layers - 1}/mlp_out", "head")
    tcfg = TaskConfig(
        kind=kind,
        num_users=args.users,
        num_new_users=args.new_users,
        samples_per_user=m,
        layers=layers,
        rank=args.rank,
        sparsity=args.sparsity,
    )
    k_task, k_base, k_pre, k_methods = jax.random.split(key, 4)
    start = time.perf_counter()
    task = make_task(k_task, model, tcfg)
    config = T.TrainConfig(
        progress_updates=5,
        steps=args.steps,
        lr=args.lr,
        lr_user=args.lr_user,
        lr_sparse=args.lr_sparse,
    )
    cold = dataclasses.replace(config, steps=args.cold_steps)
    T.warm_up_sampler(task.train, config)  # compile the batch samplers for this m
    T.warm_up_sampler(task.new_train, cold)  # outside every method's timing
    glob = A.GlobalModel(model, layers)
    pre = T.train(
        k_pre,
        glob,
        model,
        {"base": init(k_base, model), "shared": {}, "users": {}},
        *task.train,
        dataclasses.replace(config, steps=args.pretrain_steps),
        val=_head(task.val),
        progress=args.progress,
        desc=f"pretrain {kind} m={m}",
    )
    run = dict(base=pre.params["base"], model=model, config=config)
    rows = []
    for name, k in zip(args.methods, jax.random.split(k_methods, len(args.methods))):
        adapter = make_adapter(name, model, layers, args.rank, args.sparsity)
        row = _method(
            name,
            adapter,
            run,
            cold,
            task,
            jax.random.split(k, 4),
            args.progress,
            f"{kind} m={m}",
        )
        rows.append(row)
        print(
            f"  {kind:5s} m={m:<3d} {name:22s} trained acc "
            f"{row['trained_users']['accuracy']:.3f}  new acc "
            f"{row['new_users']['accuracy']:.3f}  {row['per_user_bytes']:6d} B/user  "
            f"{row['train_seconds'] + row['cold_start_seconds']:.1f} s",
            flush=True,
        )
    return dict(
        kind=kind,
        samples_per_user=m,
        task=dataclasses.asdict(tcfg),
        task_info=task.info,
        pretrain_seconds=pre.seconds,
        pretrain_best_step=pre.best_step,
        rows=rows,
        seconds=time.perf_counter() - start,
    )


def claim_check(setting: dict, tol: float = 0.005) -> dict:
    """Methods more accurate than LRS by more than ``tol``, per test split.

    ``holds`` is True when none of them stores at least as many bytes per user
    as LRS (LRS matches or beats every method that costs as much or more).
    """
    rows = {r["method"]: r for r in setting["rows"]}
    if "lrs" not in rows:
        return {}
    lrs = rows["lrs"]
    out = {}
    for split in ("trained_users", "new_users"):
        beat = [
            dict(
                method=r["method"],
                bytes=r["per_user_bytes"],
                margin=r[split]["accuracy"] - lrs[split]["accuracy"],
            )
            for r in setting["rows"]
            if r[split]["accuracy"] - lrs[split]["accuracy"] > tol
        ]
        costlier = [b for b in beat if b["bytes"] >= lrs["per_user_bytes"]]
        out[split] = dict(beaten_by=beat, holds=not costlier)
    return out


def markdown_table(results: dict) -> str:
    """One row per (kind, m, method): accuracy/loss of trained and new users."""
    lines = [
        "| teacher | m | method | B/user | trained acc | trained loss | new acc "
        "| new loss | train s | cold s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results["settings"]:
        for r in s["rows"]:
            t, n = r["trained_users"], r["new_users"]
            lines.append(
                f"| {s['kind']} | {s['samples_per_user']} | {r['method']} | "
                f"{r['per_user_bytes']} | {t['accuracy']:.3f} | {t['loss']:.3f} | "
                f"{n['accuracy']:.3f} | {n['loss']:.3f} | {r['train_seconds']:.1f} | "
                f"{r['cold_start_seconds']:.1f} |"
            )
    return "\n".join(lines)


def run(args) -> dict:
    """Runs every setting and writes the JSON (and plot) under ``args.out``."""
    import jax

    from lrs.nn import TransformerConfig

    _resolve(args)
    if args.quick:  # compilation dominates a tiny run: compile cheaply
        jax.config.update("jax_disable_most_optimizations", True)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model = TransformerConfig(
        d_model=args.d_model, num_heads=4, num_layers=args.layers, d_ff=2 * args.d_model
    )
    start, cpu = time.perf_counter(), time.process_time()
    settings = []
    keys = jax.random.split(jax.random.key(args.seed), len(args.kinds))
    for kind, k in zip(args.kinds, keys):
        for m in args.samples:
            settings.append(run_setting(args, model, kind, m, k))
            settings[-1]["claim"] = claim_check(settings[-1])
    results = dict(
        command="transformer",
        args={k: v for k, v in vars(args).items() if k not in ("handler", "subparser")},
        jax_version=jax.__version__,
        backend=jax.default_backend(),
        device=str(jax.devices()[0]),
        model=dataclasses.asdict(model),
        settings=settings,
        total_seconds=time.perf_counter() - start,
        total_cpu_seconds=time.process_time() - cpu,
    )
    path = out / RESULTS_NAME
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {path.resolve()}  ({results['total_seconds']:.0f} s)")
    if args.plot:
        print(f"plot:    {plot_results(results, out / PLOT_NAME).resolve()}")
    return results


def plot_results(results: dict, path) -> Path:
    """Plots the saved results: accuracy vs per-user parameters (smallest m)
    and accuracy vs m, per kind.

    Rows: task kinds; columns: test accuracy of trained users and of new users
    against per-user parameters at the smallest m, then accuracy against m.
    """
    kinds = sorted({s["kind"] for s in results["settings"]}, reverse=True)
    fig, axes = plotting.figure(3, len(kinds))
    methods = [r["method"] for r in results["settings"][0]["rows"]]
    colors = plotting.colours(methods)
    for row, kind in zip(axes, kinds):
        settings = sorted(
            (s for s in results["settings"] if s["kind"] == kind),
            key=lambda s: s["samples_per_user"],
        )
        scarce = settings[0]
        for col, split in enumerate(("trained_users", "new_users")):
            ax = row[col]
            for r in scarce["rows"]:
                x = max(r["per_user_floats"] + r["per_user_ints"], 0.5)
                ax.scatter(x, r[split]["accuracy"], color=colors[r["method"]], s=50)
                ax.annotate(
                    r["method"],
                    (x, r[split]["accuracy"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
            ax.set_xscale("log")
            ax.set_xlabel("per-user parameters (floats + indices; global at 0.5)")
            ax.set_ylabel("test accuracy")
            who = split.replace("_", " ")
            m = scarce["samples_per_user"]
            ax.set_title(f"{kind} teacher, m={m}: {who}")
            plotting.grid(ax)
        ax = row[2]
        for method in methods:
            ms = [s["samples_per_user"] for s in settings]
            acc = [
                next(r for r in s["rows"] if r["method"] == method)["new_users"][
                    "accuracy"
                ]
                for s in settings
            ]
            ax.plot(ms, acc, "o-", color=colors[method], label=method)
        ax.set_xscale("log")
        ax.set_xticks(ms, [str(v) for v in ms])
        ax.minorticks_off()
        ax.set_xlabel("samples per user m")
        ax.set_ylabel("new users' test accuracy")
        ax.set_title(f"{kind} teacher: cold start vs m")
        plotting.grid(ax)
        ax.legend(fontsize=7)
    return Path(plotting.save(fig, path))


def main(argv: list[str] | None = None, prog: str = "lrs transformer") -> int:
    """Parses ``argv`` and runs; returns the exit status (2 on bad arguments)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        _resolve(args)
    except ValueError as e:
        parser.error(str(e))
    run(args)
    return 0


def command(args: argparse.Namespace) -> int:
    """Runs ``lrs transformer``: its own parser reads ``args.rest``."""
    return main(args.rest, prog="lrs transformer")


if __name__ == "__main__":
    sys.exit(main())
