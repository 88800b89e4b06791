"""The 1-D ``clients`` mesh (see :mod:`fedkd_jax._devices` for the CPU device count)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from fedkd_jax._devices import all_devices, configure_cpu_devices
from fedkd_jax.errors import ConfigError

CLIENTS = "clients"
__all__ = ["CLIENTS", "client_mesh", "configure_cpu_devices"]


def client_mesh(num_devices: int | str | None = None) -> Mesh:
    """A 1-D mesh named ``clients`` over the first ``num_devices`` devices (default, or ``"all"``: all).

    Built with ``Mesh`` (Auto axis types) so XLA partitions what is outside the
    explicit ``shard_map``.
    """
    devices = jax.devices()
    num_devices = all_devices(num_devices)
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ConfigError("run.devices", f"must be in [1, {len(devices)}] (devices available); got {num_devices}")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (CLIENTS,))
