"""fedkd_jax: a JAX-accelerated simulator for federated knowledge distillation.

Importing the package exposes the machine's CPU cores as JAX devices (unless
JAX already started or the user chose a count): see
:func:`fedkd_jax.engine.configure_cpu_devices`.
"""

from fedkd_jax._devices import configure_cpu_devices

configure_cpu_devices()

from fedkd_jax import algorithms, compression, data, engine, losses, models  # noqa: E402
from fedkd_jax.algorithms import FederatedAlgorithm, fedavg  # noqa: E402
from fedkd_jax.data import FederatedData, federate  # noqa: E402
from fedkd_jax.engine import SimState, Simulator, client_mesh  # noqa: E402
from fedkd_jax.errors import ConfigError, DataError, FedKDError  # noqa: E402
from fedkd_jax.models import Model, make_model  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "FedKDError",
    "FederatedAlgorithm",
    "FederatedData",
    "Model",
    "SimState",
    "Simulator",
    "algorithms",
    "client_mesh",
    "compression",
    "configure_cpu_devices",
    "data",
    "engine",
    "fedavg",
    "federate",
    "losses",
    "make_model",
    "models",
]
