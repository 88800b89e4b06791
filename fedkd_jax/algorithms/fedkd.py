"""FedKD: private teachers, a shared student, adaptive mutual distillation.

Wu et al. 2022, "Communication-efficient federated learning via knowledge
distillation", Nature Communications 13:2032.

Every client of the population owns a persistent private *teacher* (a larger
model), its optimizer state and a private linear projection of student
features into the teacher's feature space. None of them ever leaves the
client; they change only in rounds where that client is sampled. Per-client
state lives in the engine's population store (``SimState.clients``),
gathered for the cohort and written back inside the compiled round.

Each round a sampled client downloads the shared *student*, then trains
teacher and student together on the same local batches with adaptive mutual
distillation (:func:`fedkd_jax.losses.fedkd_mutual`). It uploads only the
student's delta, which the engine may compress with FedKD's dynamic SVD
(``fedkd_jax.compression.svd``). The server averages student deltas and
applies its optimizer, as in FedAvg.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedkd_jax.algorithms.base import ClientData, ClientOutput, FederatedAlgorithm
from fedkd_jax.algorithms.fedavg import FedAvgState, server_sgd_update
from fedkd_jax.algorithms.local import scan_batches
from fedkd_jax.errors import ConfigError, concrete
from fedkd_jax.losses import fedkd_mutual
from fedkd_jax.models import Model, Params


class TeacherState(NamedTuple):
    """One client's private state (stacked ``[N, ...]`` in the population store).

    Attributes:
      params: the private teacher's parameters.
      opt_state: the teacher's optimizer state (persists across rounds).
      proj: ``{"kernel": [F_s, F_t], "bias": [F_t]}``, projecting student
        features onto teacher features for the hidden loss.
      proj_opt_state: the projection's optimizer state.
    """

    params: Params
    opt_state: optax.OptState
    proj: Params
    proj_opt_state: optax.OptState


def fedkd(
    student: Model,
    teacher: Model,
    student_optimizer: optax.GradientTransformation,
    teacher_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    local_epochs: int = 1,
    local_steps: int | None = None,
    temperature: float = 1.0,
) -> FederatedAlgorithm:
    """Build FedKD.

    Args:
      student: the shared model (aggregated, evaluated globally).
      teacher: each client's private model (evaluated on local test splits).
      student_optimizer: local optimizer of the student (fresh every round).
      teacher_optimizer: optimizer of the teacher and the projection; its
        state persists in the client's store entry.
      server_optimizer: applied to the negated mean student delta.
      temperature: softmax temperature of the mutual KL terms (the paper uses 1).
    """
    if concrete(temperature) and not temperature > 0:
        raise ConfigError("distill.temperature", f"must be > 0; got {temperature}")
    fs, ft = student.feature_dim, teacher.feature_dim

    def init(key: jax.Array) -> FedAvgState:
        params = student.init(key)
        return FedAvgState(params, server_optimizer.init(params))

    def init_client(key: jax.Array) -> TeacherState:
        kt, kp = jax.random.split(key)
        t = teacher.init(kt)
        proj = {"kernel": jax.random.normal(kp, (fs, ft)) * jnp.sqrt(1.0 / fs), "bias": jnp.zeros((ft,))}
        return TeacherState(t, teacher_optimizer.init(t), proj, teacher_optimizer.init(proj))

    def losses(params, xb, yb, where):
        t_logits, t_feat = teacher.apply(params["teacher"], xb)
        s_logits, s_feat = student.apply(params["student"], xb)
        projected = s_feat @ params["proj"]["kernel"] + params["proj"]["bias"]
        (lt, ls), m = fedkd_mutual(t_logits, s_logits, yb, t_feat, projected, temperature=temperature, where=where)
        # One gradient of L_t + L_s: the stop-gradients inside route L_t to the
        # teacher and L_s to the student and the projection.
        return lt + ls, m

    grad_fn = jax.value_and_grad(losses, has_aux=True)

    def client_update(params: Params, cs: TeacherState, data: ClientData, key: jax.Array) -> ClientOutput:
        def step(carry, xb, yb, where):
            p, t_opt, s_opt, p_opt = carry
            (_, m), g = grad_fn(p, xb, yb, where)
            ut, t_opt = teacher_optimizer.update(g["teacher"], t_opt, p["teacher"])
            us, s_opt = student_optimizer.update(g["student"], s_opt, p["student"])
            up, p_opt = teacher_optimizer.update(g["proj"], p_opt, p["proj"])
            p = {
                "teacher": optax.apply_updates(p["teacher"], ut),
                "student": optax.apply_updates(p["student"], us),
                "proj": optax.apply_updates(p["proj"], up),
            }
            return (p, t_opt, s_opt, p_opt), m

        start = {"teacher": cs.params, "student": params, "proj": cs.proj}
        carry = (start, cs.opt_state, student_optimizer.init(params), cs.proj_opt_state)
        (p, t_opt, _, p_opt), metrics = scan_batches(
            step, carry, data.x, data.y, data.count, key,
            batch_size=batch_size, epochs=local_epochs, steps=local_steps,
        )
        delta = jax.tree.map(lambda a, b: a - b, p["student"], params)
        new_state = TeacherState(p["teacher"], t_opt, p["proj"], p_opt)
        return ClientOutput(delta, data.count.astype(jnp.float32), new_state, metrics)

    return FederatedAlgorithm(
        name="fedkd",
        model=student,
        init=init,
        init_client=init_client,
        broadcast=lambda state: state.params,
        client_update=client_update,
        server_update=server_sgd_update(server_optimizer),
        model_params=lambda state: state.params,
        personal_model=teacher,
        personal_params=lambda cs: cs.params,
    )
