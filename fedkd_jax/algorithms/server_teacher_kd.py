"""Server-teacher KD: a large teacher at the server teaches the clients' students.

The seed design of this project: knowledge distillation from a server-held
teacher into client students, with only students aggregated.

Each round:

1. The server broadcasts the global student *and* its teacher (both counted
   in the downloaded bytes).
2. Each sampled client trains the student on its local data with
   ``alpha * CE(y, s) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))``.
   The teacher's logits ``t`` come from the downloaded teacher on the same
   batch (Hinton et al. 2015). The client uploads only the student's delta.
3. The server averages the student deltas and applies its optimizer (FedAvg).
4. **Teacher update.** The server updates its teacher from what the round
   produced: the cohort's trained students. On the server's unlabeled proxy
   set it takes ``distill_steps`` Adam steps (lr ``distill_lr``, Adam state
   persisting across rounds) on ``T^2 * KL(ensemble_T || teacher_T)``. The
   ensemble target is the example-weighted mean of the cohort students' logits
   on the proxy rows, as in FedDF, but distilled into the larger teacher
   instead of the student. The teacher never sees labels. Over rounds it
   accumulates the ensembles of all cohorts and hands that knowledge back to
   the next cohort's students through step 2.

The proxy logits come from each student as the server receives it (global
plus decompressed delta, ``aux_from_update``), so they add no uploaded bytes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedkd_jax.algorithms.base import ClientData, ClientOutput, FederatedAlgorithm
from fedkd_jax.algorithms.fedavg import FedAvgState, server_sgd_update
from fedkd_jax.algorithms.local import local_train
from fedkd_jax.algorithms.server_distill import check_proxy, distill_on_proxy, proxy_logits
from fedkd_jax.errors import ConfigError
from fedkd_jax.losses import kd_mix
from fedkd_jax.models import Model, Params
from fedkd_jax.tree_util import tree_bytes


class ServerTeacherState(NamedTuple):
    """Student (global) parameters and server optimizer state, the teacher, its
    Adam state, and the server's proxy set ``[P, D]``."""

    params: Params
    opt_state: optax.OptState
    teacher: Params
    teacher_opt_state: optax.OptState
    proxy: jax.Array


def server_teacher_kd(
    student: Model,
    teacher: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    proxy_x: Any,
    *,
    alpha: float,
    temperature: float,
    batch_size: int,
    local_epochs: int = 1,
    local_steps: int | None = None,
    distill_steps: int = 50,
    distill_lr: float = 1e-3,
    distill_batch_size: int = 64,
) -> FederatedAlgorithm:
    """Build server-teacher KD (see the module docstring for every step)."""
    proxy = check_proxy(proxy_x, student, "server_teacher_kd")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError("distill.alpha", f"must be in [0, 1]; got {alpha}")
    if not temperature > 0:
        raise ConfigError("distill.temperature", f"must be > 0; got {temperature}")
    if distill_steps < 1:
        raise ConfigError("distill.server_steps", f"must be a positive integer; got {distill_steps}")
    teacher_opt = optax.adam(distill_lr)
    student_update = server_sgd_update(server_optimizer)

    def init(key: jax.Array) -> ServerTeacherState:
        ks, kt = jax.random.split(key)
        s, t = student.init(ks), teacher.init(kt)
        return ServerTeacherState(s, server_optimizer.init(s), t, teacher_opt.init(t), proxy)

    def client_update(bcast, cs, data: ClientData, key: jax.Array) -> ClientOutput:
        params, t_params, _ = bcast

        def loss_fn(p, x, y, where):
            s_logits, _ = student.apply(p, x)
            t_logits, _ = teacher.apply(t_params, x)
            return kd_mix(s_logits, t_logits, y, alpha=alpha, temperature=temperature, where=where)

        new, metrics = local_train(
            loss_fn, params, client_optimizer, data.x, data.y, data.count, key,
            batch_size=batch_size, epochs=local_epochs, steps=local_steps,
        )
        delta = jax.tree.map(lambda a, b: a - b, new, params)
        return ClientOutput(delta, data.count.astype(jnp.float32), cs, metrics)

    def aux_from_update(bcast, delta):
        # the server's view of this client's student: global + (decompressed) delta
        params, _, proxy_rows = bcast
        return proxy_logits(student.apply, jax.tree.map(jnp.add, params, delta), proxy_rows)

    def server_update(state: ServerTeacherState, mean_delta, mean_logits, key: jax.Array):
        s, _ = student_update(FedAvgState(state.params, state.opt_state), mean_delta, (), key)
        t, t_opt, m = distill_on_proxy(
            teacher.apply, state.teacher, state.teacher_opt_state, teacher_opt, state.proxy, mean_logits, key,
            steps=distill_steps, batch_size=distill_batch_size, temperature=temperature,
        )
        return ServerTeacherState(s.params, s.opt_state, t, t_opt, state.proxy), m

    down = tree_bytes(jax.eval_shape(student.init, jax.random.key(0))) + tree_bytes(
        jax.eval_shape(teacher.init, jax.random.key(0))
    )
    return FederatedAlgorithm(
        name="server_teacher_kd",
        model=student,
        init=init,
        init_client=None,
        broadcast=lambda state: (state.params, state.teacher, state.proxy),
        client_update=client_update,
        server_update=server_update,
        model_params=lambda state: state.params,
        download_bytes=down,
        aux_from_update=aux_from_update,
    )
