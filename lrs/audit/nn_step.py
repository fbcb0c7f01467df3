"""Audit of one user-level DP step of :mod:`lrs.nn.dp` with a canary user.

The same method as the linear audits (docs/privacy.md, section 5): D and D'
differ in one user, a crafted canary whose labels are flipped and scaled so
that its clipped gradient points one way in D and the other way in D' (the
worst case of the replace-one sensitivity ``2 C``). The real step
(:func:`lrs.nn.dp._make_step`, every user in the batch, noise calibrated so
that this one release spends ``epsilon``) runs ``trials`` times on each side;
the score of a run is the projection of its release onto the difference the
canary makes (known to the auditor, who runs the step without noise on D and
D'), and :func:`lrs.audit.epsilon_lower_bound` turns the detection rates into
a lower bound on epsilon.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from lrs.audit.bounds import epsilon_lower_bound
from lrs.audit.run import AuditResult
from lrs.private import accounting
from lrs.validation import check_integer, check_key, check_real, check_representable

__all__ = ["audit_nn_dp_step"]

FAULTS = (None, "half_noise")
D_IN, D_OUT, RANK, SAMPLES = 6, 3, 2, 8


def _problem(users: int, key):
    """A personalized MLP and D, D' (slot 0 holds the canary)."""
    from flax import nnx

    from lrs.nn import layers, nnx_model

    k_model, k_v, k_w, k_x, k_c = jax.random.split(key, 5)
    seed = int(jax.random.randint(k_model, (), 0, 2**30))
    model = nnx_model.MLP((D_IN, D_OUT), rngs=nnx.Rngs(seed))
    layers.personalize(
        model, "layers/0", rank=RANK, sparsity=1, num_users=users, rngs=nnx.Rngs(seed)
    )
    layer = model.layers[0]
    layer.V[...] = jax.random.normal(k_v, layer.V.shape, jnp.float32)
    W = jax.random.normal(k_w, (D_IN, D_OUT))
    x = jax.random.normal(k_x, (users, SAMPLES, D_IN))
    y = jnp.einsum("umi,io->umo", x, W)
    canary = 100.0 * jax.random.normal(k_c, (SAMPLES, D_OUT))  # clipped in both
    y_out, y_in = y.at[0].set(canary), y.at[0].set(-canary)
    return model, x.astype(jnp.float32), y_out.astype(jnp.float32), y_in


def audit_nn_dp_step(
    epsilon: float = 4.0,
    *,
    delta: float = 1e-5,
    trials: int = 100_000,
    users: int = 20,
    clip_norm: float = 1.0,
    fault: str | None = None,
    confidence: float = 0.95,
    batch_trials: int = 5_000,
    key=None,
) -> AuditResult:
    """A lower bound on the epsilon of one DP step of :mod:`lrs.nn.dp`.

    Args:
      epsilon: the claim (the step's noise is calibrated to it alone).
      delta: in (0, 1).
      trials: runs per data set (half choose the test, half bound).
      users: users of the data sets (all in the step's batch).
      clip_norm: the clip level ``C``.
      fault: ``None`` or ``'half_noise'`` (a broken step that must be flagged).
      confidence: probability that the bound holds.
      batch_trials: runs vectorized at once.
      key: seeds the data and the runs (default ``jax.random.key(0)``).

    Returns:
      An :class:`lrs.audit.AuditResult` with ``level='nn_step'``.
    """
    import optax
    from flax import nnx

    from lrs.nn import dp, layers

    if fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}; got {fault!r}")
    epsilon = check_real("epsilon", epsilon, "a finite number > 0")
    delta = check_real("delta", delta, "a number in (0, 1)")
    confidence = check_real("confidence", confidence, "a number in (0, 1)")
    clip_norm = check_real("clip_norm", clip_norm, "a finite number > 0")
    for name, value, ok in (
        ("epsilon", epsilon, epsilon > 0),
        ("delta", delta, 0 < delta < 1),
        ("confidence", confidence, 0 < confidence < 1),
        ("clip_norm", clip_norm, clip_norm > 0),
    ):
        if not ok:
            raise ValueError(f"{name} is out of range; got {value!r}")
    check_representable("clip_norm", clip_norm, np.float32)
    trials = check_integer("trials", trials, 2)
    users = check_integer("users", users, 2)
    batch_trials = check_integer("batch_trials", batch_trials, 1)
    key = check_key(key, default=jax.random.key(0))
    k_data, k_out, k_in = jax.random.split(key, 3)
    plan = accounting.Plan(
        steps=1, private_init=False, moment_histogram=False, step_histogram=False
    )
    z = accounting.calibrate(plan, epsilon, delta, "pld")
    claim = accounting.epsilon_spent(plan, z, delta, "pld")
    start = time.perf_counter()
    with jax.enable_x64(True):
        model, x, y_out, y_in = _problem(users, k_data)
        graphdef, itabs, ftabs, shared, frozen = nnx.split(
            model, layers.UserSupport, dp._FLOAT_TABLE, layers.SharedParam, ...
        )
        config = dp.DPTrainConfig(
            epsilon=epsilon, delta=delta, steps=1, users_per_step=users,
            clip_norm=clip_norm,
        )  # fmt: skip
        opt = optax.sgd(0.0)
        state = (itabs, ftabs, shared, opt.init(shared))
        z_run = z / 2 if fault == "half_noise" else z

        def release(y, noise_z, k):
            step = dp._make_step(graphdef, opt, dp._mse, config, noise_z, users)
            k_batch, k_noise = jax.random.split(k)
            shapes = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float64), shared)
            leaves, treedef = jax.tree.flatten(shapes)
            keys = jax.random.split(k_noise, len(leaves))
            normals = jax.tree.unflatten(
                treedef,
                [
                    jax.random.normal(kk, a.shape, jnp.float64)
                    for kk, a in zip(keys, leaves, strict=True)
                ],
            )
            _, (_, released) = step(state, frozen, x, y, k_batch, normals)
            flat = jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(released)])
            return flat.astype(jnp.float64) * users  # the noisy sum

        silent = jax.random.key(1)
        sum_out = release(y_out, 0.0, silent)
        sum_in = release(y_in, 0.0, silent)
        diff = (sum_in - sum_out) / clip_norm
        sensitivity = float(jnp.linalg.norm(diff))

        @jax.jit
        def scores(keys, y):
            runs = jax.vmap(lambda k: release(y, z_run, k))(keys)
            return ((runs - sum_out) / clip_norm) @ diff

        def side(y, k):
            out = []
            for lo in range(0, trials, batch_trials):
                n = min(batch_trials, trials - lo)
                keys = jax.random.split(jax.random.fold_in(k, lo), n)
                out.append(np.asarray(scores(keys, y)))
            return np.concatenate(out)

        scores_out, scores_in = side(y_out, k_out), side(y_in, k_in)
    if not (np.all(np.isfinite(scores_out)) and np.all(np.isfinite(scores_in))):
        raise ValueError("audit_nn_dp_step: a run gave a non-finite score")
    bound = epsilon_lower_bound(scores_in, scores_out, delta, confidence=confidence)
    return AuditResult(
        level="nn_step",
        canary="crafted",
        dtype="float32",
        observe="final",
        fault=fault,
        epsilon_claimed=claim,
        delta=delta,
        noise_multiplier=z,
        bound=bound,
        trials=trials,
        seconds=time.perf_counter() - start,
        sensitivity_used=sensitivity,
        flagged=bound.epsilon > claim or not math.isfinite(claim),
    )
