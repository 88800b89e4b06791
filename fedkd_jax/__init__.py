"""fedkd_jax: a JAX-accelerated simulator for federated knowledge distillation.

Importing the package configures nothing in JAX. Entry points (the ``fedkd``
CLI, the scripts) call :func:`configure_cpu_devices` to expose the machine's
cores as devices before JAX starts; call it yourself first in a script that
wants that, and :func:`configure_compile_cache` to keep compiled programs on
disk across runs (``fk.run``, ``fk.sweep`` and the CLI do both).
"""

from fedkd_jax import aggregation, algorithms, compression, data, engine, hetero, losses, models, privacy, store
from fedkd_jax._devices import configure_cpu_devices
from fedkd_jax.compile_cache import configure_compile_cache
from fedkd_jax.api import Result, run, sweep
from fedkd_jax.algorithms import FederatedAlgorithm, fedavg
from fedkd_jax.data import FederatedData, federate
from fedkd_jax.engine import SimState, Simulator, client_mesh
from fedkd_jax.errors import ConfigError, DataError, FedKDError
from fedkd_jax.models import Model, make_model

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Result",
    "DataError",
    "FedKDError",
    "FederatedAlgorithm",
    "FederatedData",
    "Model",
    "SimState",
    "Simulator",
    "aggregation",
    "algorithms",
    "client_mesh",
    "compression",
    "configure_compile_cache",
    "configure_cpu_devices",
    "data",
    "engine",
    "fedavg",
    "federate",
    "hetero",
    "losses",
    "make_model",
    "models",
    "privacy",
    "run",
    "store",
    "sweep",
]
