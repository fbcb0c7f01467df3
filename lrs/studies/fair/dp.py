"""User-level DP training of the shared parts (base and U), personal rows local,
and the one-step canary audit."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lrs.nn.nnx_personalize import adapter_layers
from lrs.nn.user_state import UserSupport
from lrs.studies.fair.method_table import methods, personalize
from lrs.studies.fair.model import Classifier, make_rngs
from lrs.studies.fair.programs import make_program, split
from lrs.studies.fair.setup import LEVEL, Setup
from lrs.studies.fair.stats import choose, t_interval
from lrs.studies.fair.training import (
    Clock,
    initial_params,
    key_for,
    print_line,
    stack_trees,
)


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
        model = Classifier(setup, rngs=make_rngs(key_for(key, "base")))
        nnx.update(model, base)
        personalize(model, method, setup.users, key_for(key, method.label))
        if epsilon > 0:
            results.append(
                dp.train_shared_private(
                    model,
                    jnp.asarray(tokens[s]),
                    jnp.asarray(labels[s]),
                    dp_config(setup, epsilon),
                    key=key_for(key, f"dp {epsilon}"),
                    loss_fn=cross_entropy,
                )
            )
        for layer in adapter_layers(model).values():
            for name, rows in layer.new_rows(setup.users).items():
                getattr(layer, name)[...] = rows
        params.append(split(model)[1])
    return stack_trees(params), results


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
    clock = Clock()
    graphdef, params, info = initial_params(setup, method, bases, seed_keys)
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
        start = Clock()
        stacked, results = _dp_models(
            setup, method, bases, seed_keys, tok, lab, epsilon
        )
        dp_seconds = start.seconds()
        t_b = np.asarray(program(stacked, grid, zeros, splits["trained"])[1])
        c_a, c_b = (np.asarray(a) for a in program(stacked, grid, zeros,
                                                   splits["cold"])[:2])  # fmt: skip
        choice = choose(c_a[..., :h].mean(-1), setup.grid, setup.eval_every)
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

    clock = Clock()
    epsilon, trials = setup.dp_audit_epsilon, setup.dp_audit_trials
    plan1 = accounting.Plan(
        steps=1, private_init=False, moment_histogram=False, step_histogram=False
    )
    z = accounting.calibrate(plan1, epsilon, setup.dp_delta, "pld")
    claim = accounting.epsilon_spent(plan1, z, setup.dp_delta, "pld")
    method = next(m for m in methods("all") if m.label == setup.dp_method)
    k_model, k_x, k_y, k_out, k_in = jax.random.split(key, 5)
    model = Classifier(setup, rngs=make_rngs(k_model))
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


def dp_teacher(setup: Setup) -> str:
    """The teacher of the DP part: ``lrs`` when it runs, else the first."""
    return "lrs" if "lrs" in setup.teachers else setup.teachers[0]


def dp_section(
    setup, teacher, pre, seed_keys, splits, compiled, log=print_line
) -> dict:
    """The record's ``dp`` section: :func:`run_dp` and :func:`audit_dp_step`."""
    part = dict(teacher=teacher, **run_dp(setup, pre["states"], seed_keys, splits,
                                          compiled, log))  # fmt: skip
    part["global"] = dict(trained=pre["trained"], new=pre["new"])
    part["setup"] = {
        k: v for k, v in dataclasses.asdict(setup).items() if k.startswith("dp")
    }
    if setup.dp_audit_trials:
        part["audit"] = audit_dp_step(
            setup, pre["states"][0], key=key_for(seed_keys[0], "audit")
        )
        a = part["audit"]
        log(
            f"[dp] audit of one step: lower bound {a['epsilon_lower_bound']:.3f} "
            f"<= claim {a['epsilon_claimed']:.3f}: {a['below_claim']} "
            f"({a['seconds']:.0f} s)"
        )
    return part
