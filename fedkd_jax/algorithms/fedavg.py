"""FedAvg and its server-optimizer variants.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS); server optimizers from Reddi et al. 2021,
"Adaptive Federated Optimization" (ICLR).

Each cohort client starts from the global parameters, runs local SGD on its
data, and uploads its delta; the server averages deltas weighted by example
counts and applies ``server_optimizer`` to the negated mean delta.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from fedkd_jax.algorithms.base import ClientData, ClientOutput, FederatedAlgorithm
from fedkd_jax.algorithms.local import local_train
from fedkd_jax.losses import cross_entropy
from fedkd_jax.models import Model, Params


class FedAvgState(NamedTuple):
    """Server state: global parameters and the server optimizer's state."""

    params: Params
    opt_state: optax.OptState


def fedavg(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    local_epochs: int = 1,
    local_steps: int | None = None,
) -> FederatedAlgorithm:
    """Build FedAvg (or FedAvgM / FedAdam / FedYogi via ``server_optimizer``).

    Args:
      model: the shared model.
      client_optimizer: local optax optimizer, re-initialised every round.
      server_optimizer: optax optimizer applied to ``-mean_delta``
        (``optax.sgd(1.0)`` is plain FedAvg).
      batch_size: local batch size ``B``.
      local_epochs: local epochs ``E`` (ignored when ``local_steps`` is set).
      local_steps: fixed number of local steps instead of epochs.
    """

    def loss_fn(params, x, y, where):
        logits, _ = model.apply(params, x)
        return cross_entropy(logits, y, where=where)

    def init(key: jax.Array) -> FedAvgState:
        params = model.init(key)
        return FedAvgState(params, server_optimizer.init(params))

    def client_update(params: Params, client_state, data: ClientData, key: jax.Array) -> ClientOutput:
        new_params, metrics = local_train(
            loss_fn, params, client_optimizer, data.x, data.y, data.count, key,
            batch_size=batch_size, epochs=local_epochs, steps=local_steps,
        )
        delta = jax.tree.map(lambda a, b: a - b, new_params, params)
        return ClientOutput(delta, data.count.astype(jax.numpy.float32), client_state, metrics)

    def server_update(state: FedAvgState, mean_delta, mean_aux, key: jax.Array):
        del mean_aux, key
        grads = jax.tree.map(lambda d: -d, mean_delta)
        updates, opt_state = server_optimizer.update(grads, state.opt_state, state.params)
        return FedAvgState(optax.apply_updates(state.params, updates), opt_state), {}

    return FederatedAlgorithm(
        name="fedavg",
        model=model,
        init=init,
        init_client=None,
        broadcast=lambda state: state.params,
        client_update=client_update,
        server_update=server_update,
        model_params=lambda state: state.params,
    )
