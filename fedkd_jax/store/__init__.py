"""Per-client state stores: device, host memory and disk (see :mod:`fedkd_jax.store.base`)."""

from fedkd_jax.store.base import STORES, ClientStore, choose_store, default_budget_gb, state_bytes
from fedkd_jax.store.device import DeviceStore
from fedkd_jax.store.host import DiskStore, HostStore, host_array


def make_store(kind: str, template, num_clients: int, *, mesh=None, directory: str | None = None) -> ClientStore:
    """A store by name (``device``, ``host`` or ``disk``; resolve ``auto`` with :func:`choose_store`)."""
    if kind == "device":
        return DeviceStore(template, num_clients, mesh)
    if kind == "host":
        return HostStore(template, num_clients)
    if kind == "disk":
        if not directory:
            from fedkd_jax.errors import ConfigError

            raise ConfigError("run.store_dir", "the disk store needs a directory")
        return DiskStore(template, num_clients, directory)
    from fedkd_jax.errors import ConfigError

    raise ConfigError("run.client_store", f"unknown value {kind!r}; allowed: {', '.join(STORES)}")


__all__ = ["STORES", "ClientStore", "DeviceStore", "DiskStore", "HostStore", "choose_store", "default_budget_gb",
           "host_array", "make_store", "state_bytes"]
