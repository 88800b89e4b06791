"""FedDF: ensemble distillation for robust model fusion.

Lin et al. 2020, "Ensemble Distillation for Robust Model Fusion in Federated
Learning" (NeurIPS).

Clients train as in FedAvg and upload their models. The server first
averages them (FedAvg with the server optimizer). It then distils the
cohort's ensemble into that average on an unlabeled proxy set: the target is
the mean of the cohort models' logits (weighted like the average, by example
count). This runs for ``distill_steps`` Adam steps on random proxy batches at
temperature ``T``, with a fresh Adam state each round, inside the same
compiled round. The engine evaluates each client's model *as the server
receives it* (global + decompressed delta) on the proxy set and averages
those logits (``aux_from_update``), as a real server would from the uploads.
They add no uploaded bytes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedkd_jax.algorithms.base import ClientData, ClientOutput, FederatedAlgorithm
from fedkd_jax.algorithms.fedavg import FedAvgState, local_sgd_algorithm
from fedkd_jax.algorithms.server_distill import check_proxy, distill_on_proxy, proxy_logits
from fedkd_jax.errors import ConfigError
from fedkd_jax.models import Model, Params
from fedkd_jax.tree_util import tree_bytes


class FedDFState(NamedTuple):
    """Global parameters, server optimizer state, and the server's proxy set ``[P, D]``."""

    params: Params
    opt_state: optax.OptState
    proxy: jax.Array


def feddf(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    proxy_x: Any,
    *,
    batch_size: int,
    local_epochs: int = 1,
    local_steps: int | None = None,
    distill_steps: int = 50,
    distill_lr: float = 1e-3,
    distill_batch_size: int = 64,
    temperature: float = 1.0,
) -> FederatedAlgorithm:
    """Build FedDF; ``proxy_x [P, D]`` is the server's unlabeled proxy data."""
    proxy = check_proxy(proxy_x, model, "feddf")
    if not temperature > 0:
        raise ConfigError("distill.temperature", f"must be > 0; got {temperature}")
    if distill_steps < 1:
        raise ConfigError("distill.server_steps", f"must be a positive integer; got {distill_steps}")
    base = local_sgd_algorithm(
        "feddf", model, client_optimizer, server_optimizer,
        batch_size=batch_size, local_epochs=local_epochs, local_steps=local_steps,
    )
    distill_opt = optax.adam(distill_lr)

    def init(key: jax.Array) -> FedDFState:
        s = base.init(key)
        return FedDFState(s.params, s.opt_state, proxy)

    def client_update(bcast, cs, data: ClientData, key: jax.Array) -> ClientOutput:
        return base.client_update(bcast[0], cs, data, key)

    def aux_from_update(bcast, delta):
        # the server's view of this client's model: global + (decompressed) delta
        params, proxy_rows = bcast
        return proxy_logits(model.apply, jax.tree.map(jnp.add, params, delta), proxy_rows)

    def server_update(state: FedDFState, mean_delta, mean_logits, key: jax.Array):
        avg, _ = base.server_update(FedAvgState(state.params, state.opt_state), mean_delta, (), key)
        params, _, m = distill_on_proxy(
            model.apply, avg.params, distill_opt.init(avg.params), distill_opt, state.proxy, mean_logits, key,
            steps=distill_steps, batch_size=distill_batch_size, temperature=temperature,
        )
        return FedDFState(params, avg.opt_state, state.proxy), m

    return FederatedAlgorithm(
        name="feddf",
        model=model,
        init=init,
        init_client=None,
        broadcast=lambda state: (state.params, state.proxy),
        client_update=client_update,
        server_update=server_update,
        model_params=lambda state: state.params,
        download_bytes=tree_bytes(jax.eval_shape(model.init, jax.random.key(0))),
        aux_from_update=aux_from_update,
    )
