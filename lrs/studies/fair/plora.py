"""PLoRA as published: its training objective (dropouts and the
mutual-information term) for the study's ``plora`` rows.

PLoRA (Zhang et al., AAAI 2024) trains its user-conditioned LoRA
(:class:`lrs.nn.baseline_layers.PLoRALinear`) with two additions meant for
cold-start users, both read here from the authors' code
(github.com/yoyo-yun/PLoRA: ``trainer/trainer.py``, ``models/plms/bert.py``,
``models/ppeft/plora.py``), which is what this module follows:

* **personalized dropout** (PDropout): each training row loses its whole user
  term ``e_u P B`` with probability ``user_dropout`` (the layers' own
  argument), so the shared ``A B`` learns to serve a user without an
  embedding; the LoRA dropout (rate ``dropout``) acts on ``x`` and ``e_u``;
* **mutual-information maximization** (MIM), a weight ``lambda`` on the sum
  of two terms, added to the cross-entropy:

  ``L_MI = mean_l mean((s_l (x~ A_l + m e~_u P_l) B_l - s_l x~' A_l B_l)^2)
  + mean_b KL(softmax(z_b / T) || softmax(z0_b / T))``

  over the PLoRA layers ``l`` (the adapter's output with the user and without
  it, ``x~'`` under a fresh dropout mask: the code's ``mim_list`` and its
  ``MSELoss``), and over the batch: ``z`` the personalized logits, ``z0``
  the head applied to the no-user model's features, computed without
  gradient (the code's ``KLDivLoss(log_softmax(z0 / 4), softmax(z / 4))``,
  ``T = 4``). Both terms pull the personalized model and the no-user model
  together, so the zero-shot model (no user) stays close to the personalized
  one; the code calls it mutual-information maximization, and it is a
  distillation between the two models, not an estimator of a mutual
  information.

In the authors' few-shot phase (new users' embeddings only) PDropout and the
MI term are off and the LoRA dropout stays on: the study's cold start does
the same (``shared_phase = 0``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lrs.nn.baseline_layers import plora_mode
from lrs.nn.user_state import users

#: PLoRA's temperature of the logit term (``/ 4`` in the authors' trainer).
TEMPERATURE = 4.0


def mutual_information_loss(logits, generic, record, temperature=TEMPERATURE):
    """PLoRA's MI term: layer-wise squared differences plus the logits' KL.

    Args:
      logits: ``(n, c)`` the personalized model's logits.
      generic: ``(n, c)`` the no-user model's logits (gradient stopped on its
        features by the caller, as in the authors' code).
      record: ``[(with_user, without_user), ...]`` of the PLoRA layers
        (:func:`lrs.nn.baseline_layers.plora_mode`); may be empty.
      temperature: ``T``.

    Returns:
      The scalar ``L_MI`` of the module docstring.
    """
    p = jax.nn.log_softmax(logits / temperature, axis=-1)
    q = jax.nn.log_softmax(generic / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(p) * (p - q), axis=-1).mean()
    if not record:
        return kl
    mse = [jnp.mean((a - b) ** 2) for a, b in record]
    return kl + sum(mse) / len(mse)


def objective(model, tokens, labels, ids, key, *, shared_phase, mi_weight):
    """PLoRA's training loss of a study ``Classifier`` on one batch.

    ``CE(model(tokens)) + mi_weight * shared_phase * L_MI`` with the layers'
    dropouts drawn from ``key`` (PDropout scaled by ``shared_phase``, 1 in the
    shared phase and 0 in the cold start, a number or a traced scalar).
    """
    k_user, k_generic = jax.random.split(key)
    record = [] if mi_weight else None
    mode = dict(rngs=nnx.Rngs(dropout=k_user), user_dropout_scale=shared_phase)
    with users(ids), plora_mode(record=record, **mode):
        out = model(tokens)
    ce = optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()
    if not mi_weight:
        return ce
    rngs = nnx.Rngs(dropout=k_generic)
    with users(ids), plora_mode(rngs=rngs, zero_shot=True):
        generic = model.head(jax.lax.stop_gradient(model.features(tokens)))
    mi = mutual_information_loss(out, generic, record)
    return ce + mi_weight * shared_phase * mi
