"""Mask-aware distillation losses. Each returns ``(loss, metrics)``.

Shape key: ``B`` batch rows, ``K`` classes, ``F`` feature width.

* Soft-label KD (Hinton et al. 2015, "Distilling the Knowledge in a Neural
  Network"): ``T^2 * KL(softmax(t/T) || softmax(s/T))``; the ``T^2`` factor
  keeps the soft term's gradient magnitude roughly independent of ``T``.
* Hint matching (Romero et al. 2015, "FitNets"): MSE between a teacher
  feature and a learned linear projection of the student feature.
* Adaptive mutual distillation (Wu et al. 2022, "Communication-efficient
  federated learning via knowledge distillation", Nature Communications):
  teacher and student distil into each other, with the distillation and
  hidden losses divided by ``CE_t + CE_s`` so they weaken while predictions
  are still poor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedkd_jax.losses.classification import cross_entropy, masked_mean

sg = jax.lax.stop_gradient


def kl_rows(target_logits: jax.Array, logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Per-row ``KL(softmax(target/T) || softmax(logits/T))``, ``[B]``, via log-softmax."""
    logp_t = jax.nn.log_softmax(target_logits.astype(jnp.float32) / temperature)
    logp_s = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)
    return jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)


def kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float = 1.0,
    where: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Hinton soft-label loss ``T^2 * KL(teacher_T || student_T)``, mean over real rows.

    The teacher side is a target: no gradient flows into ``teacher_logits``.
    """
    kl = masked_mean(kl_rows(sg(teacher_logits), student_logits, temperature), where)
    loss = temperature**2 * kl
    return loss, {"kd": loss}


def kd_mix(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    alpha: float,
    temperature: float,
    where: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``alpha * CE(y, s) + (1 - alpha) * T^2 * KL(teacher_T || student_T)``."""
    ce, m = cross_entropy(student_logits, labels, where=where)
    kd, _ = kd_loss(student_logits, teacher_logits, temperature=temperature, where=where)
    loss = alpha * ce + (1.0 - alpha) * kd
    return loss, {"loss": loss, "ce": ce, "kd": kd, "accuracy": m["accuracy"]}


def hint_loss(
    projected_student: jax.Array,
    teacher_features: jax.Array,
    *,
    where: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """FitNets hint: mean over real rows of the per-row mean squared error.

    Args:
      projected_student: ``[B, F]``, the student feature after its learned
        projection (trained with the student).
      teacher_features: ``[B, F]`` target (no gradient).
    """
    err = jnp.mean((projected_student - sg(teacher_features)) ** 2, axis=-1)
    loss = masked_mean(err, where)
    return loss, {"hint": loss}


def fedkd_mutual(
    teacher_logits: jax.Array,
    student_logits: jax.Array,
    labels: jax.Array,
    teacher_features: jax.Array,
    projected_student: jax.Array,
    *,
    temperature: float = 1.0,
    where: jax.Array | None = None,
) -> tuple[tuple[jax.Array, jax.Array], dict[str, jax.Array]]:
    """FedKD adaptive mutual distillation on one batch.

    ``L_t = CE_t + T^2 KL(y_s || y_t) / (CE_t + CE_s) + H / (CE_t + CE_s)``
    ``L_s = CE_s + T^2 KL(y_t || y_s) / (CE_t + CE_s) + H / (CE_t + CE_s)``

    with ``y = softmax(logits / T)``. The paper (Wu et al. 2022, Eqs. 1-4)
    writes the KL terms at temperature 1; at ``T = 1`` the ``T^2`` factor is
    1 and this is exactly the paper's loss. At ``T > 1`` the ``T^2`` factor
    (Hinton et al. 2015), as in every other KD term of this package, keeps the
    soft term's gradient at the scale of ``T = 1``, so a temperature ablation
    measures the temperature, not a silently shrunken distillation weight.
    Each KL is summed over classes and averaged over the batch's real rows
    (PyTorch's ``reduction="batchmean"``).

    ``H`` is the MSE between the teacher feature and the projected student
    feature. In each loss the *other* model's outputs are targets
    (stop-gradient), and the adaptive weight ``1 / (CE_t + CE_s)`` is a
    weight, not something to minimise (stop-gradient). Both losses share one
    batch; sum them and take one gradient: ``L_t`` reaches only the teacher,
    ``L_s`` only the student (and the projection through ``H``).

    Returns:
      ``((L_t, L_s), metrics)``.
    """
    ce_t, mt = cross_entropy(teacher_logits, labels, where=where)
    ce_s, ms = cross_entropy(student_logits, labels, where=where)
    w = 1.0 / sg(ce_t + ce_s + 1e-8)
    kl_t = masked_mean(kl_rows(sg(student_logits), teacher_logits, temperature), where)
    kl_s = masked_mean(kl_rows(sg(teacher_logits), student_logits, temperature), where)
    h_t = masked_mean(jnp.mean((teacher_features - sg(projected_student)) ** 2, axis=-1), where)
    h_s = masked_mean(jnp.mean((projected_student - sg(teacher_features)) ** 2, axis=-1), where)
    t2 = temperature**2
    loss_t = ce_t + w * t2 * kl_t + w * h_t
    loss_s = ce_s + w * t2 * kl_s + w * h_s
    return (loss_t, loss_s), {
        "loss": loss_s,
        "teacher_loss": loss_t,
        "ce_student": ce_s,
        "ce_teacher": ce_t,
        "kd_weight": w,
        "hidden": h_s,
        "accuracy": ms["accuracy"],
        "teacher_accuracy": mt["accuracy"],
    }
