"""Per-client states on the devices (small populations).

The whole ``[N, ...]`` store lives in device memory, replicated over the
mesh, and gathers and scatters run as small jitted programs: no host round
trip. Use it when the store is small next to device memory (``auto`` picks
it when the replicated store takes at most a quarter of the memory budget).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fedkd_jax.store.base import ClientStore
from fedkd_jax.store.host import host_array


@jax.jit
def _take(store, ids):
    return jax.tree.map(lambda a: jnp.take(a, ids, axis=0, mode="clip"), store)


@partial(jax.jit, donate_argnums=0)
def _put(store, ids, rows):
    return jax.tree.map(lambda a, r: a.at[ids].set(r, mode="drop"), store, rows)


class DeviceStore(ClientStore):
    """Per-client states in device memory, replicated on ``mesh``."""

    kind = "device"

    def __init__(self, template: Any, num_clients: int, mesh: jax.sharding.Mesh):
        super().__init__(template, num_clients)
        self._sharding = NamedSharding(mesh, P())
        self.arrays = self._allocate()

    def _allocate(self):
        return jax.tree.map(
            lambda t: jax.jit(lambda: jnp.zeros((self.num_clients,) + tuple(t.shape), t.dtype),
                              out_shardings=self._sharding)(),
            self.template)

    def _ids(self, ids: np.ndarray) -> jax.Array:
        return jax.device_put(np.asarray(ids, np.int32), self._sharding)

    def gather(self, ids: np.ndarray) -> tuple[Any, np.ndarray]:
        ids = np.asarray(ids, np.int64)
        safe = np.minimum(ids, self.num_clients - 1)
        fresh = (ids >= self.num_clients) | ~self.touched[safe]
        return _take(self.arrays, self._ids(ids)), fresh

    def scatter(self, ids: np.ndarray, states: Any) -> None:
        ids = np.asarray(ids, np.int64)
        self.arrays = _put(self.arrays, self._ids(np.minimum(ids, self.num_clients)), states)
        self._mark(ids[ids < self.num_clients])

    def read(self, ids: np.ndarray) -> list[np.ndarray]:
        return [np.array(host_array(a)) for a in jax.tree.leaves(_take(self.arrays, self._ids(ids)))]

    def write(self, ids: np.ndarray, leaves: list[np.ndarray]) -> None:
        ids = np.asarray(ids, np.int64)
        rows = jax.tree.unflatten(jax.tree.structure(self.template),
                                  [jax.device_put(r, self._sharding) for r in leaves])
        self.arrays = _put(self.arrays, self._ids(ids), rows)
        self._mark(ids)
        self._dirty = np.zeros(0, np.int64)

    def reset(self) -> None:
        super().reset()
        self.arrays = self._allocate()
