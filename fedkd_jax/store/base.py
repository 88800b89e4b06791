"""The per-client state store: where each client's persistent state lives.

Shape key: ``N`` clients, ``U`` clients in one dispatch's union of cohorts.

A round never owns the population. Before a dispatch the engine asks the
store for the states of the clients it will train (:meth:`ClientStore.gather`);
afterwards it hands back their new states (:meth:`ClientStore.scatter`).

Stores are *lazy*: a client's initial state is a pure function of the run's
seed and the client id, so a store holds only clients that have trained at
least once (``touched``). Gathering an untouched client returns zeros and a
``fresh`` flag, and the compiled program initialises it from its key. A
population of 10^5 private teachers therefore costs memory (or disk) only for
the clients ever sampled.

Three backends share this interface: :class:`~fedkd_jax.store.DeviceStore`
(arrays on the accelerator, today's behaviour for small populations),
:class:`~fedkd_jax.store.HostStore` (numpy in host memory) and
:class:`~fedkd_jax.store.DiskStore` (memory-mapped files). All give
bit-identical runs: the compiled round is the same program for all three.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np

from fedkd_jax.errors import ConfigError

STORES = ("auto", "device", "host", "disk")


def state_bytes(template: Any) -> int:
    """Bytes of one client's state (``template``: shapes of one client's leaves)."""
    return int(sum(math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in jax.tree.leaves(template)))


def physical_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 8 << 30


def default_budget_gb() -> float:
    """Half the machine's memory."""
    return physical_memory_bytes() / 2 / 2**30


def choose_store(kind: str, *, num_clients: int, per_client_bytes: int, num_devices: int,
                 budget_gb: float | None, union_size: int) -> str:
    """Resolve ``auto`` and check the memory budget (before anything is allocated).

    ``auto``: ``device`` when the whole store, replicated on every device, takes
    at most a quarter of the budget; ``host`` when it fits in half of it;
    ``disk`` otherwise. A budget smaller than one dispatch's cohort states (the
    union the round holds in memory) is refused for every backend.
    """
    if kind not in STORES:
        raise ConfigError("run.client_store", f"unknown value {kind!r}; allowed: {', '.join(STORES)}")
    budget = (default_budget_gb() if budget_gb is None else float(budget_gb)) * 2**30
    need = per_client_bytes * max(union_size, 1)
    if per_client_bytes and need > budget:
        raise ConfigError("run.memory_budget_gb",
                          f"{budget / 2**30:.3g} GB cannot hold one dispatch's client states "
                          f"({union_size} clients x {per_client_bytes / 2**20:.3g} MB = {need / 2**30:.3g} GB); "
                          "raise it or lower run.cohort_size / run.rounds_per_dispatch")
    if kind != "auto":
        return kind
    total = per_client_bytes * num_clients
    if total * num_devices <= budget / 4:
        return "device"
    if total <= budget / 2:
        return "host"
    return "disk"


class ClientStore:
    """Interface of a lazy per-client store (see the module docstring).

    Attributes:
      kind: ``device``, ``host`` or ``disk``.
      num_clients: ``N``.
      template: pytree of ``ShapeDtypeStruct``, one client's state.
      touched: ``[N]`` bool, clients holding a stored state.
    """

    kind = "abstract"

    def __init__(self, template: Any, num_clients: int):
        self.template = template
        self.num_clients = int(num_clients)
        self.touched = np.zeros(self.num_clients, bool)
        self._dirty: set[int] | np.ndarray = np.zeros(0, np.int64)
        self.owner: tuple | None = None  # (key bits) of the run the stored states belong to
        self.round = 0  # rounds completed by the stored states

    # -------------------------------------------------------------- for rounds
    def gather(self, ids: np.ndarray) -> tuple[Any, np.ndarray]:
        """``(states [U, ...], fresh [U] bool)`` of clients ``ids`` (ids ``>= N`` are padding)."""
        raise NotImplementedError

    def scatter(self, ids: np.ndarray, states: Any) -> None:
        """Store the new ``states [U, ...]`` of clients ``ids`` (padding ids are ignored)."""
        raise NotImplementedError

    # --------------------------------------------------------- for checkpoints
    def read(self, ids: np.ndarray) -> list[np.ndarray]:
        """Host copies ``[len(ids), ...]`` of every leaf for touched clients ``ids``."""
        raise NotImplementedError

    def write(self, ids: np.ndarray, leaves: list[np.ndarray]) -> None:
        """Put host rows (one array per leaf) for clients ``ids`` and mark them touched."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget every stored state (all clients back to their seed-defined start)."""
        self.touched[:] = False
        self._dirty = np.zeros(0, np.int64)
        self.owner = None
        self.round = 0

    def take_dirty(self) -> np.ndarray:
        """Ids written since the last call (for incremental checkpoints)."""
        d = np.unique(np.asarray(self._dirty, np.int64))
        self._dirty = np.zeros(0, np.int64)
        return d

    def _mark(self, ids: np.ndarray) -> None:
        self.touched[ids] = True
        self._dirty = np.concatenate([np.asarray(self._dirty, np.int64), ids])

    def bind(self, owner: tuple, round_index: int) -> None:
        """Check the store belongs to this run and round before a dispatch.

        A store touched by another run (another key), or holding states from a
        later round than the state being stepped, would silently mix runs.
        """
        if self.touched.any():
            if self.owner is not None and owner != self.owner:
                raise ValueError("this client store holds another run's states; call Simulator.reset_store() first")
            if round_index != self.round:
                raise ValueError(f"the client store holds the states after round {self.round}, but the state "
                                 f"being stepped is at round {round_index}; call Simulator.reset_store() to start over")
        self.owner = owner
        self.round = round_index

    @property
    def per_client_bytes(self) -> int:
        return state_bytes(self.template)

    def disk_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass


def real_ids(ids: np.ndarray, num_clients: int) -> np.ndarray:
    ids = np.asarray(ids, np.int64)
    return ids[ids < num_clients]
