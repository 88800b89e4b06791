"""The compiled federated round, devices and evaluation."""

from fedkd_jax.engine.cohort import Plan, make_plan, sample_cohort, straggler_flags
from fedkd_jax.engine.evaluation import (
    EvalData,
    eval_clients,
    make_eval_data,
    make_evaluator,
    make_personal_evaluator,
    summarize_clients,
)
from fedkd_jax.engine.mesh import CLIENTS, client_mesh, configure_cpu_devices
from fedkd_jax.engine.placement import fetch, put_replicated, put_sharded
from fedkd_jax.engine.simulator import (
    PoolData,
    SimState,
    Simulator,
    client_init_key,
    client_key,
    round_key,
)
from fedkd_jax.tree_util import tree_bytes

__all__ = [
    "CLIENTS",
    "EvalData",
    "Plan",
    "PoolData",
    "SimState",
    "Simulator",
    "client_init_key",
    "client_key",
    "eval_clients",
    "fetch",
    "make_eval_data",
    "make_plan",
    "put_replicated",
    "put_sharded",
    "straggler_flags",
    "client_mesh",
    "configure_cpu_devices",
    "make_evaluator",
    "make_personal_evaluator",
    "round_key",
    "sample_cohort",
    "summarize_clients",
    "tree_bytes",
]
