"""Federated algorithms: factories returning :class:`FederatedAlgorithm`."""

from fedkd_jax.algorithms.base import ClientData, ClientOutput, FederatedAlgorithm
from fedkd_jax.algorithms.fedavg import FedAvgState, fedavg, server_sgd_update, straggler_steps
from fedkd_jax.algorithms.feddf import FedDFState, feddf
from fedkd_jax.algorithms.fedkd import TeacherState, fedkd
from fedkd_jax.algorithms.fedprox import fedprox
from fedkd_jax.algorithms.server_distill import distill_on_proxy
from fedkd_jax.algorithms.server_teacher_kd import ServerTeacherState, server_teacher_kd
from fedkd_jax.algorithms.local import (
    batch_schedule,
    epoch_order,
    local_train,
    num_local_steps,
    real_steps,
    scan_batches,
    tree_where,
)
from fedkd_jax.algorithms.optimizers import (
    ADAPTIVE_FORMS,
    CLIENT_OPTIMIZERS,
    SERVER_DEFAULTS,
    SERVER_OPTIMIZERS,
    ReddiState,
    client_optimizer,
    reddi_adaptive,
    server_optimizer,
    server_settings,
)

ALGORITHMS = ("fedavg", "fedprox", "fedkd", "server_teacher_kd", "feddf", "fd", "fedproto", "fedmd", "heterofl", "fedrolex")

__all__ = [
    "ADAPTIVE_FORMS",
    "ALGORITHMS",
    "CLIENT_OPTIMIZERS",
    "SERVER_DEFAULTS",
    "SERVER_OPTIMIZERS",
    "ClientData",
    "ClientOutput",
    "FedAvgState",
    "FedDFState",
    "FederatedAlgorithm",
    "ReddiState",
    "ServerTeacherState",
    "TeacherState",
    "batch_schedule",
    "client_optimizer",
    "distill_on_proxy",
    "epoch_order",
    "fedavg",
    "feddf",
    "fedkd",
    "fedprox",
    "local_train",
    "num_local_steps",
    "real_steps",
    "reddi_adaptive",
    "scan_batches",
    "server_optimizer",
    "server_settings",
    "server_sgd_update",
    "server_teacher_kd",
    "straggler_steps",
    "tree_where",
]
