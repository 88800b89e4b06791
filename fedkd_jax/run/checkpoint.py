"""Crash-safe orbax checkpoints of the whole :class:`~fedkd_jax.engine.SimState`.

* Saves are asynchronous (orbax ``CheckpointManager``); orbax commits a step
  atomically, so ``kill -9`` mid-save leaves the previous steps intact.
* Each step also stores an integrity record: the round and a position-weighted
  checksum of every leaf, computed on device in one jitted pass. Orbax
  detects a truncated file but not flipped bits; the checksum catches both.
* :meth:`Checkpointer.restore_latest` walks back from the newest step,
  moves any unreadable or mismatching step aside (to ``<dir>-corrupt/``,
  never deleting it) with a report, and restores the newest good one.
* Restores go through an abstract target carrying the *current* mesh's
  shardings: a checkpoint written on 4 devices restores on 2 or 1, and back.
* The per-client population store (``SimState.clients``, e.g. FedKD's
  private teachers) is not rewritten whole each time: orbax saves the rest of
  the state, and :mod:`fedkd_jax.run.client_store` writes only the clients
  changed since the previous checkpoint, chained to a periodic full base.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fedkd_jax.run.client_store import ClientStoreCheckpointer

FORMAT = 2


def _words(x: jax.Array) -> jax.Array:
    """A leaf's raw bits as a flat uint32 vector."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = jnp.asarray(x)
    if x.dtype.itemsize == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    return x.astype(jnp.uint32).reshape(-1)  # small ints; 8-byte types are not used in states


@jax.jit
def _checksums(tree: Any) -> list[jax.Array]:
    out = []
    for leaf in jax.tree.leaves(tree):
        w = _words(leaf)
        # odd multipliers: any single-bit change alters the sum modulo 2^32
        mult = jnp.arange(w.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
        out.append(jnp.sum(w * mult, dtype=jnp.uint32))
    return out


def checksums(tree: Any) -> list[int]:
    """Position-weighted uint32 checksum of every leaf of ``tree``."""
    return [int(c) for c in jax.device_get(_checksums(tree))]


def abstract_like(state: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """Shape/dtype/sharding target for a restore (from live or abstract arrays)."""

    def one(x):
        s = sharding if sharding is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, state)


class Checkpointer:
    """Asynchronous saves every few rounds, keeping the last ``keep``; verified restores.

    Args:
      directory: orbax's directory (``<run>/checkpoints``); the incremental
        client store lives beside it in ``<run>/checkpoints-clients``.
      keep: checkpoints retained.
      num_clients: population size (needed when the state has a client store).
    """

    def __init__(self, directory: str, *, keep: int = 3, num_clients: int | None = None):
        self.directory = os.path.abspath(directory)
        self.keep = keep
        self.manager = self._manager()
        self.events: list[str] = []
        self.store_dir = self.directory.rstrip(os.sep) + "-clients"
        self.store = ClientStoreCheckpointer(self.store_dir, num_clients) if num_clients else None
        self.blocking_seconds = 0.0  # time save() held up the caller

    def _manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, enable_async_checkpointing=True),
            item_names=("state", "integrity"),
        )

    @staticmethod
    def _has_store(state: Any) -> bool:
        return bool(jax.tree.leaves(state.clients))

    def save(self, round_index: int, state: Any, dirty: np.ndarray | None = None) -> None:
        """Save ``state`` at ``round_index``; ``dirty``: clients changed since the last save."""
        t0 = time.perf_counter()
        chain = None
        small = state
        if self._has_store(state):
            if self.store is None:
                raise ValueError("this state has a client store: pass num_clients to Checkpointer")
            chain = self.store.save(round_index, state.clients, dirty)
            small = state.replace(clients=())
            with open(os.path.join(self.store_dir, f"chain-{int(round_index):09d}.json.tmp"), "w") as f:
                json.dump(chain, f)
            os.replace(os.path.join(self.store_dir, f"chain-{int(round_index):09d}.json.tmp"),
                       os.path.join(self.store_dir, f"chain-{int(round_index):09d}.json"))
        record = {"format": FORMAT, "round": int(round_index), "checksums": checksums(small), "store_chain": chain}
        self.manager.save(
            int(round_index),
            args=ocp.args.Composite(state=ocp.args.StandardSave(small), integrity=ocp.args.JsonSave(record)),
        )
        if chain is not None:
            self._prune(set(self.steps()) | {int(round_index)})
        self.blocking_seconds += time.perf_counter() - t0

    def _prune(self, retained: set[int]) -> None:
        keep = set()
        for name in os.listdir(self.store_dir):
            if name.startswith("chain-") and name.endswith(".json"):
                r = int(name[6:15])
                path = os.path.join(self.store_dir, name)
                if r in retained:
                    with open(path) as f:
                        keep.update(e["file"] for e in json.load(f) if e["file"])
                    keep.add(name)
                elif r < min(retained):
                    os.remove(path)
                else:
                    keep.add(name)  # a newer step still being committed
        self.store.prune(keep)

    def start_fresh(self) -> None:
        """A new run: the client store's chain starts from the run's (unsaved) initial state."""
        if self.store is not None:
            self.store.start_from_init()

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, round_index: int, like: Any) -> Any:
        """Restore one step into ``like``'s structure and shardings and verify it.

        ``like`` should be the run's initial state (``sim.init(seed)`` placed on the
        mesh): its client store is the base of the incremental store chain.
        """
        has_store = self._has_store(like)
        small_like = like.replace(clients=()) if has_store else like
        r = self.manager.restore(
            int(round_index),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(small_like)),
                                    integrity=ocp.args.JsonRestore()),
        )
        record, state = r.integrity, r.state
        if record.get("round") != int(round_index):
            raise ValueError(f"integrity record names round {record.get('round')}")
        if int(np.asarray(state.round)) != int(round_index):
            raise ValueError(f"state holds round {int(np.asarray(state.round))}")
        if record.get("checksums") != checksums(state):
            raise ValueError("checksum mismatch (the files were altered after saving)")
        if has_store:
            if self.store is None:
                raise ValueError("this state has a client store: pass num_clients to Checkpointer")
            host = self.store.load(record.get("store_chain") or [], like.clients)
            clients = jax.tree.map(lambda h, l: jax.device_put(h, l.sharding), host, like.clients)
            state = state.replace(clients=clients)
        return state

    def restore_latest(self, like: Any) -> tuple[Any, int] | None:
        """Newest verified checkpoint as ``(state, round)``; bad ones are moved aside and reported."""
        for step in sorted(self.steps(), reverse=True):
            try:
                return self.restore(step, like), step
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                moved = self._quarantine(step)
                msg = (f"checkpoint of round {step} is unreadable or corrupted ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:160]}); moved to {moved}, trying the previous one")
                self.events.append(msg)
                warnings.warn(msg, stacklevel=2)
        return None

    def _quarantine(self, step: int) -> str:
        self.manager.close()
        src = os.path.join(self.directory, str(step))
        dst_root = self.directory.rstrip(os.sep) + "-corrupt"
        os.makedirs(dst_root, exist_ok=True)
        dst = os.path.join(dst_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if os.path.exists(src):
            shutil.move(src, dst)
        self.manager = self._manager()
        return dst

    def wait(self) -> None:
        self.manager.wait_until_finished()
        if self.store is not None:
            self.store.wait()

    def close(self) -> None:
        self.wait()
        self.manager.close()
        if self.store is not None:
            self.store.close()
