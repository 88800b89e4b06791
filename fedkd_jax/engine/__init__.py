"""The compiled federated round, devices and evaluation."""

from fedkd_jax.engine.evaluation import make_evaluator, make_personal_evaluator, summarize_clients
from fedkd_jax.engine.mesh import CLIENTS, client_mesh, configure_cpu_devices
from fedkd_jax.engine.simulator import (
    SimState,
    Simulator,
    client_key,
    round_key,
    sample_cohort,
)
from fedkd_jax.tree_util import tree_bytes

__all__ = [
    "CLIENTS",
    "SimState",
    "Simulator",
    "client_key",
    "client_mesh",
    "configure_cpu_devices",
    "make_evaluator",
    "make_personal_evaluator",
    "round_key",
    "sample_cohort",
    "summarize_clients",
    "tree_bytes",
]
