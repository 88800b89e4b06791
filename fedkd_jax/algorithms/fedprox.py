"""FedProx: FedAvg with a proximal term, keeping stragglers' partial work.

Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (MLSys).
Each client minimises ``CE + (mu / 2) * ||w - w_global||^2``; clients that
stop early (stragglers, see :func:`fedkd_jax.algorithms.fedavg.straggler_steps`)
still contribute their partial update, where FedAvg drops it. The engine
chooses the stragglers (``Simulator(straggler_fraction=...)``).
"""

from __future__ import annotations

import optax

from fedkd_jax.algorithms.base import FederatedAlgorithm
from fedkd_jax.algorithms.fedavg import local_sgd_algorithm
from fedkd_jax.models import Model


def fedprox(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    mu: float,
    batch_size: int,
    local_epochs: int = 1,
    local_steps: int | None = None,
) -> FederatedAlgorithm:
    """Build FedProx with proximal weight ``mu`` (``mu = 0`` keeps only the straggler rule)."""
    return local_sgd_algorithm(
        "fedprox", model, client_optimizer, server_optimizer,
        batch_size=batch_size, local_epochs=local_epochs, local_steps=local_steps,
        proximal_mu=mu, drop_stragglers=False,
    )
