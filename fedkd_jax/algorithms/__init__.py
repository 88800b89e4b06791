"""Federated algorithms: factories returning :class:`FederatedAlgorithm`."""

from fedkd_jax.algorithms.base import ClientData, ClientOutput, FederatedAlgorithm
from fedkd_jax.algorithms.fedavg import FedAvgState, fedavg
from fedkd_jax.algorithms.local import batch_schedule, epoch_order, local_train, num_local_steps, tree_where
from fedkd_jax.algorithms.optimizers import (
    CLIENT_OPTIMIZERS,
    SERVER_OPTIMIZERS,
    client_optimizer,
    server_optimizer,
)

ALGORITHMS = ("fedavg",)

__all__ = [
    "ALGORITHMS",
    "CLIENT_OPTIMIZERS",
    "SERVER_OPTIMIZERS",
    "ClientData",
    "ClientOutput",
    "FedAvgState",
    "FederatedAlgorithm",
    "batch_schedule",
    "client_optimizer",
    "epoch_order",
    "fedavg",
    "local_train",
    "num_local_steps",
    "server_optimizer",
    "tree_where",
]
