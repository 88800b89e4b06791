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
   ensemble target is the uniform mean of the cohort students' logits
   on the proxy rows, as in FedDF, but distilled into the larger teacher
   instead of the student. The teacher never sees labels. Over rounds it
   accumulates the ensembles of all cohorts and hands that knowledge back to
   the next cohort's students through step 2.

The proxy logits come from each student as the server receives it (global
plus decompressed delta, ``aux_from_update``), so they add no uploaded bytes.

**Warm-up: a random teacher is never a target.** With ``warmup="rounds"``
(the default) clients train with cross-entropy only (``alpha = 1``) until the
teacher has received ``warmup_rounds`` distillation updates (step 4), and
only then mix in the KD term. With ``warmup="labeled"`` the server first
trains its teacher with cross-entropy on its labeled proxy rows
(``warmup_steps`` Adam steps, inside ``init``), so the KD term applies from
round 0. Downloads count the teacher in every round.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedkd_jax.algorithms.base import ClientData, ClientOutput, FederatedAlgorithm
from fedkd_jax.algorithms.fedavg import FedAvgState, server_sgd_update
from fedkd_jax.algorithms.local import local_train
from fedkd_jax.algorithms.server_distill import check_proxy, distill_on_proxy, pass_batches, proxy_logits
from fedkd_jax.errors import ConfigError, concrete
from fedkd_jax.losses import cross_entropy, kd_mix
from fedkd_jax.models import Model, Params
from fedkd_jax.tree_util import tree_bytes


class ServerTeacherState(NamedTuple):
    """Student (global) parameters and server optimizer state, the teacher, its
    Adam state and the number of distillation updates the teacher has received
    (int32). The proxy set is server data (``server_data["proxy"]``)."""

    params: Params
    opt_state: optax.OptState
    teacher: Params
    teacher_opt_state: optax.OptState
    teacher_updates: jax.Array

WARMUPS = ("rounds", "labeled")


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
    warmup: str = "rounds",
    warmup_rounds: int = 10,
    warmup_steps: int = 200,
    proxy_y: Any = None,
    logit_weight: float = 1.0,
) -> FederatedAlgorithm:
    """Build server-teacher KD (see the module docstring for every step).

    Args:
      warmup: ``rounds`` or ``labeled`` (see the module docstring).
      warmup_rounds: teacher updates before clients distil from it (``rounds``).
      warmup_steps: Adam steps of labeled pre-training (``labeled``).
      proxy_y: ``[P]`` labels of the proxy rows, needed by ``labeled`` only.
      logit_weight: the uploaded logit differences are multiplied by it (and the
        aggregate divided by it): their share of DP's joint clip.
    """
    proxy = check_proxy(proxy_x, student, "server_teacher_kd")
    if warmup not in WARMUPS:
        raise ConfigError("distill.teacher_warmup", f"unknown value {warmup!r}; allowed: {', '.join(WARMUPS)}")
    if warmup == "labeled" and proxy_y is None:
        raise ConfigError("distill.teacher_warmup", "'labeled' needs the proxy's labels (data.proxy=holdout)")
    if warmup_rounds < 0:
        raise ConfigError("distill.warmup_rounds", f"must be >= 0; got {warmup_rounds}")
    threshold = 0 if warmup == "labeled" else int(warmup_rounds)
    if concrete(alpha) and not 0.0 <= alpha <= 1.0:
        raise ConfigError("distill.alpha", f"must be in [0, 1]; got {alpha}")
    if concrete(temperature) and not temperature > 0:
        raise ConfigError("distill.temperature", f"must be > 0; got {temperature}")
    if distill_steps < 1:
        raise ConfigError("distill.server_steps", f"must be a positive integer; got {distill_steps}")
    teacher_opt = optax.adam(distill_lr)
    student_update = server_sgd_update(server_optimizer)

    def pretrain(t: Params, key: jax.Array) -> Params:
        labels = jnp.asarray(proxy_y, jnp.int32)
        opt = optax.adam(distill_lr)

        def step(carry, s):
            p, st = carry
            idx, mask = pass_batches(key, s, proxy.shape[0], distill_batch_size)
            g = jax.grad(lambda q: cross_entropy(teacher.apply(q, jnp.asarray(proxy)[idx])[0], labels[idx],
                                                 where=mask)[0])(p)
            u, st = opt.update(g, st, p)
            return (optax.apply_updates(p, u), st), None

        (t, _), _ = jax.lax.scan(step, (t, opt.init(t)), jnp.arange(warmup_steps))
        return t

    def init(key: jax.Array) -> ServerTeacherState:
        ks, kt = jax.random.split(key)
        s, t = student.init(ks), teacher.init(kt)
        if warmup == "labeled":
            t = pretrain(t, jax.random.fold_in(kt, 1))
        return ServerTeacherState(s, server_optimizer.init(s), t, teacher_opt.init(t), jnp.zeros((), jnp.int32))

    def client_update(bcast, cs, data: ClientData, key: jax.Array) -> ClientOutput:
        params, t_params, ready = bcast
        a = jnp.where(ready, alpha, 1.0)  # a teacher still warming up is not a target

        def loss_fn(p, x, y, where):
            s_logits, _ = student.apply(p, x)
            t_logits, _ = teacher.apply(t_params, x)
            return kd_mix(s_logits, t_logits, y, alpha=a, temperature=temperature, where=where)

        new, metrics = local_train(
            loss_fn, params, client_optimizer, data.x, data.y, data.count, key,
            batch_size=batch_size, epochs=local_epochs, steps=local_steps,
        )
        delta = jax.tree.map(lambda a, b: a - b, new, params)
        weight = data.count.astype(jnp.float32)
        # the teacher's target is the uniform mean of the students' logits, as in FedDF
        return ClientOutput(delta, weight, cs, metrics, aux_weight=(weight > 0).astype(jnp.float32))

    def aux_from_update(bcast, delta, sdata):
        # the server's view of this client's student (global + decompressed delta), as logits
        # relative to the global student's (see feddf: DP clips them jointly with the delta)
        params, proxy = bcast[0], sdata["proxy"]
        return logit_weight * (proxy_logits(student.apply, jax.tree.map(jnp.add, params, delta), proxy)
                               - proxy_logits(student.apply, params, proxy))

    def server_update(state: ServerTeacherState, mean_delta, mean_dlogits, key: jax.Array, sdata):
        mean_logits = proxy_logits(student.apply, state.params, sdata["proxy"]) + mean_dlogits / logit_weight
        s, _ = student_update(FedAvgState(state.params, state.opt_state), mean_delta, (), key)
        t, t_opt, m = distill_on_proxy(
            teacher.apply, state.teacher, state.teacher_opt_state, teacher_opt, sdata["proxy"], mean_logits, key,
            steps=distill_steps, batch_size=distill_batch_size, temperature=temperature,
        )
        return ServerTeacherState(s.params, s.opt_state, t, t_opt, state.teacher_updates + 1), m

    down = tree_bytes(jax.eval_shape(student.init, jax.random.key(0))) + tree_bytes(
        jax.eval_shape(teacher.init, jax.random.key(0))
    )
    return FederatedAlgorithm(
        name="server_teacher_kd",
        model=student,
        init=init,
        init_client=None,
        broadcast=lambda state: (state.params, state.teacher, state.teacher_updates >= threshold),
        client_update=client_update,
        server_update=server_update,
        model_params=lambda state: state.params,
        download_bytes=down,
        aux_from_update=aux_from_update,
        server_data={"proxy": np.asarray(proxy)},
    )
