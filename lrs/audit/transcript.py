"""The transcript attacker of ``lrs.audit``: the likelihood ratio of every
release of a private fit.

The fit releases, in order, the noisy clipped moment sum ``M`` (with its clip
level), then per shared step ``i`` the clip levels ``(C_G, C_H)``, the noisy
clipped sums ``(G_i, H_i)`` and ``U_{i+1}`` (``fit(..., transcript=True)``).
Given everything released before it, each sum is Gaussian,

    G_i ~ N(mu_D(U_0..U_i, C), (2 z C_G)^2 I)   (H, M: iid upper triangle),

and the mean depends on the data set only through the users' clipped
contributions, which depend on released values and each user's own data. An
attacker who knows every user but the one in the slot (the usual auditing
adversary) replays them: the base users' sum ``b``, and the slot user's
contribution ``o`` in D and ``n`` in D'. The log-likelihood ratio of D' against
D is then, up to the factor ``1 / (4 z^2)``,

    sum over releases  <x - b - (o + n) / 2, n - o> / C^2

(upper triangle for the symmetric ``H`` and ``M``). It is the Neyman-Pearson
optimal test for the Gaussian releases (it ignores the little the noisy counts
of the clip levels say), and it does not suffer from what limits the final-U
attacker: each Newton step re-fits U from all users, so the base users'
statistics undo the previous step's tilt and the final U keeps mostly the last
step's noise and canary push; subtracting the replayed base sum ``b`` removes
that restoring force, and every release's evidence adds up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lrs import peruser
from lrs.config import AMHTConfig
from lrs.data import UserData
from lrs.private import mechanism as mech
from lrs.private.statistics import usable_users, user_statistics


def replay_data(data_out: UserData, data_in: UserData) -> UserData:
    """The ``t`` base users, then D's slot user, then D''s: ``t + 2`` users."""
    return UserData(*(jnp.concatenate([a, b[-1:]]) for a, b in zip(data_out, data_in)))


def _groups(users: int, dtype) -> jax.Array:
    """``(3, t + 2)`` indicators of the base users, D's slot and D''s slot."""
    index = jnp.arange(users)
    t = users - 2
    return jnp.stack([index < t, index == t, index == t + 1]).astype(dtype)


def release_score(x, sums, clip, *, symmetric: bool) -> jax.Array:
    """``<x - b - (o + n)/2, n - o> / clip^2`` in float64, ``sums = (b, o, n)``.

    For a symmetric release only the upper triangle (incl. the diagonal)
    counts: its entries carry the independent noise.
    """
    x, base, out, into = (jnp.asarray(a, jnp.float64) for a in (x, *sums))
    diff = (x - base - (out + into) / 2) * (into - out)
    if symmetric:
        diff = jnp.triu(diff)
    return jnp.sum(diff) / jnp.asarray(clip, jnp.float64) ** 2


def _weights(norms, clips, eligible, non_private) -> jax.Array:
    """Clip weights at the released clip levels, as the fit computes them."""
    if non_private:
        weights = jnp.ones(norms.shape[:1], norms.dtype)
    else:
        weights = mech.clip_weights(norms, clips)
    return jnp.where(eligible, weights, 0)


def _moment_score(data, eligible, groups, moment, clip, non_private):
    """The moment release's term: each user adds ``c_i a_i a_i^T`` with
    ``a_i = X_i^T y_i / m_i`` (computed as ``s_i s_i^T``, ``s_i = sqrt(c_i)
    a_i``, so an overflowed ``a_i`` with weight 0 adds exactly 0)."""
    X = jnp.where(data.mask[..., None], data.X, 0)
    y = jnp.where(data.mask, data.y, 0)
    count = jnp.maximum(jnp.sum(data.mask, axis=1), 1).astype(X.dtype)
    a = jnp.einsum("cmd,cm->cd", X, y) / count[:, None]
    norms = jnp.where(eligible, mech.safe_norm(a, -1) ** 2, 0)
    weights = _weights(norms[:, None], clip[None], eligible, non_private)
    sums = []
    for g in groups:
        s = mech.weighted(a, jnp.sqrt(weights * g))
        sums.append(s.T @ s)
    return release_score(moment, sums, clip, symmetric=True)


def _step_score(data, eligible, groups, U, fits, G, H, clips, non_private):
    stat_G, stat_H = user_statistics(data.X, data.y, data.mask, U, fits)
    norms = jnp.stack(
        [mech.safe_norm(stat_G, (1, 2)), mech.safe_norm(stat_H, (1, 2))], 1
    )
    norms = jnp.where(eligible[:, None], norms, 0)
    weights = _weights(norms, clips, eligible, non_private)
    sums_G = [mech.weighted(stat_G, weights * g).sum(0) for g in groups]
    sums_H = [mech.weighted(stat_H, weights * g).sum(0) for g in groups]
    return release_score(G, sums_G, clips[0], symmetric=False) + release_score(
        H, sums_H, clips[1], symmetric=True
    )


def transcript_score(
    data: UserData,
    released: dict,
    clip_gradient,
    clip_gram,
    config: AMHTConfig,
    *,
    non_private: bool,
) -> jax.Array:
    """The log-likelihood ratio (times ``4 z^2``) of one fit's transcript.

    Args:
      data: :func:`replay_data` of D and D' (``t + 2`` users).
      released: ``run_prepared``'s released values: ``U (T+1, d, r)``,
        ``G (T, d, r)``, ``H (T, r, r)``, ``moment (d, d)`` or None,
        ``clip_moment``.
      clip_gradient, clip_gram: ``(T,)`` the released clip levels.
      config: the fit's (prepared) :class:`lrs.AMHTConfig`.
      non_private: the fit skipped the clipping (the audit's broken variant).

    Returns:
      A float64 scalar, higher for D' (canary in).
    """
    data, eligible = usable_users(data, config.rank + config.sparsity)
    groups = _groups(data.X.shape[0], data.X.dtype)
    Us = released["U"]
    score = jnp.zeros((), jnp.float64)
    if released["moment"] is not None:
        score += _moment_score(
            data,
            eligible,
            groups,
            released["moment"],
            released["clip_moment"],
            non_private,
        )
    fits = peruser.per_user_step(data, Us[0], None, config)
    for i in range(config.num_iters):  # T is small and static
        clips = jnp.stack([clip_gradient[i], clip_gram[i]])
        score += _step_score(
            data,
            eligible,
            groups,
            Us[i],
            fits,
            released["G"][i],
            released["H"][i],
            clips,
            non_private,
        )
        if i + 1 < config.num_iters:
            fits = peruser.per_user_step(data, Us[i + 1], fits.support, config)
    return score
