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
* The per-client population store (:mod:`fedkd_jax.store`, e.g. FedKD's
  private teachers) is not part of the state and is not rewritten whole:
  orbax saves the simulation state, and :mod:`fedkd_jax.runner.client_store`
  writes only the clients changed since the previous checkpoint, chained to
  a periodic base of the touched clients.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fedkd_jax.engine.cohort import key_bits
from fedkd_jax.runner.client_store import ClientStoreCheckpointer, IntegrityError

FORMAT = 2
# Orbax's asynchronous saves coordinate through process-wide state; several
# checkpointers (a sweep's runs) committing from their writer threads at once
# collide, so commits go one at a time.
_ORBAX_LOCK = threading.Lock()


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
      store: the live client store (:mod:`fedkd_jax.store`), or ``None``.
    """

    def __init__(self, directory: str, *, keep: int = 3, store: Any = None):
        self.directory = os.path.abspath(directory)
        self.keep = keep
        self.manager = self._manager()
        self.events: list[str] = []
        self.store_dir = self.directory.rstrip(os.sep) + "-clients"
        self.client_store = store  # the live ClientStore, or None for stateless algorithms
        self.store = ClientStoreCheckpointer(self.store_dir, store.num_clients) if store is not None else None
        self.blocking_seconds = 0.0  # time save() held up the caller

    def _manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, enable_async_checkpointing=True),
            item_names=("state", "integrity"),
        )

    def save(self, round_index: int, state: Any) -> None:
        """Save ``state`` (and the client store's changes) at ``round_index``.

        Without a client store this is one asynchronous orbax save. With one,
        the caller copies the rows changed since the last save out of the store;
        the writer thread then writes the store segment, *then* commits the
        orbax step (waiting for it) and only then prunes store files, so a
        checkpoint never names a missing file and files are never pruned
        before a newer checkpoint is committed.
        """
        t0 = time.perf_counter()
        r = int(round_index)
        record = {"format": FORMAT, "round": r, "checksums": checksums(state), "store_chain": None}
        if self.store is None:
            self._orbax_save(r, state, record)
        else:
            def commit(chain):
                if self.store.primary:
                    path = os.path.join(self.store_dir, f"chain-{r:09d}.json")
                    with open(path + ".tmp", "w") as f:
                        json.dump(chain, f)
                    os.replace(path + ".tmp", path)
                with _ORBAX_LOCK:
                    self.manager.save(r, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                 integrity=ocp.args.JsonSave(dict(record, store_chain=chain))))
                    self.manager.wait_until_finished()
                if self.store.primary:
                    self._prune()

            self.store.save(r, self.client_store, self.client_store.take_dirty(), then=commit)
        self.blocking_seconds += time.perf_counter() - t0

    def _orbax_save(self, r: int, state: Any, record: dict) -> None:
        with _ORBAX_LOCK:
            self.manager.save(r, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         integrity=ocp.args.JsonSave(record)))

    def _prune(self) -> None:
        """Drop store files and chain records no committed checkpoint needs (writer thread)."""
        retained = set(self.steps())
        keep: set[str] = set()
        for name in os.listdir(self.store_dir) if os.path.isdir(self.store_dir) else []:
            if not (name.startswith("chain-") and name.endswith(".json")):
                continue
            r = int(name[6:15])
            path = os.path.join(self.store_dir, name)
            if r in retained:
                with open(path) as f:
                    keep.update(e["file"] for e in json.load(f) if e["file"])
            elif retained and r < min(retained):
                os.remove(path)
        self.store.prune(keep)

    def start_fresh(self) -> None:
        """A new run: the client store's chain starts from the run's (unsaved) initial state."""
        if self.store is not None:
            self.store.start_from_init()

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def committed_steps(self) -> list[int]:
        """Steps committed on disk, read from the directory alone (no orbax call, no device):
        safe from any thread, even while a save is in flight or a dispatch hangs. Orbax
        writes a step under a temporary name and renames it when complete."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, round_index: int, like: Any) -> Any:
        """Restore one step into ``like``'s structure and shardings and verify it;
        rebuild the client store (if any) from the step's chain.

        Raises:
          IntegrityError: the step's files are missing, truncated or altered.
        """
        try:
            r = self.manager.restore(
                int(round_index),
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(like)),
                                        integrity=ocp.args.JsonRestore()),
            )
        except Exception as e:  # noqa: BLE001 - classify below
            if _looks_damaged(e):
                raise IntegrityError(f"unreadable files ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e
            raise
        record, state = r.integrity, r.state
        if not isinstance(record, dict) or record.get("round") != int(round_index):
            raise IntegrityError(f"integrity record does not name round {round_index}")
        if int(np.asarray(state.round)) != int(round_index):
            raise IntegrityError(f"state holds round {int(np.asarray(state.round))}")
        if record.get("checksums") != checksums(state):
            raise IntegrityError("checksum mismatch (the files were altered after saving)")
        if self.store is not None:
            self.store.load(record.get("store_chain") or [], self.client_store)
            self.client_store.owner = key_bits(state.key)
            self.client_store.round = int(round_index)
        return state

    def restore_latest(self, like: Any) -> tuple[Any, int] | None:
        """Newest verified checkpoint as ``(state, round)``, or ``None`` if there is none.

        Damaged steps are moved aside (with the store files only they use) and
        reported, and the previous one is tried. Any other failure (say, a state
        structure that no longer matches after a library change) is raised
        untouched, and so is the case where every existing step is damaged:
        a run never silently restarts from round 0 over saved work.
        """
        steps = sorted(self.steps(), reverse=True)
        for step in steps:
            try:
                return self.restore(step, like), step
            except IntegrityError as e:
                moved = self._quarantine(step)
                msg = (f"checkpoint of round {step} is unreadable or corrupted ({e}); "
                       f"moved to {moved}, trying the previous one")
                self.events.append(msg)
                warnings.warn(msg, stacklevel=2)
        if steps:
            raise IntegrityError(
                f"none of the {len(steps)} checkpoints in {self.directory} could be restored; they were moved to "
                f"{self.directory}-corrupt/ and nothing else was changed"
            )
        return None

    def _quarantine(self, step: int) -> str:
        """Move a damaged step (and the store files no other step needs) aside; never delete."""
        self.manager.close()
        dst_root = self.directory.rstrip(os.sep) + "-corrupt"
        dst = os.path.join(dst_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(dst, exist_ok=True)
        src = os.path.join(self.directory, str(step))
        if os.path.exists(src):
            shutil.move(src, os.path.join(dst, "state"))
        chain_path = os.path.join(self.store_dir, f"chain-{step:09d}.json")
        if os.path.exists(chain_path):
            with open(chain_path) as f:
                mine = {e["file"] for e in json.load(f) if e.get("file")}
            others: set[str] = set()
            for name in os.listdir(self.store_dir):  # exists: it holds chain_path
                if name.startswith("chain-") and name.endswith(".json") and name != os.path.basename(chain_path):
                    with open(os.path.join(self.store_dir, name)) as f:
                        others.update(e["file"] for e in json.load(f) if e.get("file"))
            os.makedirs(os.path.join(dst, "clients"), exist_ok=True)
            for name in sorted(mine - others) + [os.path.basename(chain_path)]:
                if os.path.exists(os.path.join(self.store_dir, name)):
                    shutil.move(os.path.join(self.store_dir, name), os.path.join(dst, "clients", name))
        self.manager = self._manager()
        return dst

    def wait(self) -> None:
        """Block until every queued save is written and committed."""
        if self.store is not None:
            self.store.wait()  # its writer thread commits the orbax steps
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()
        if self.store is not None:
            self.store.close()


_DAMAGE_HINTS = ("error while reading", "data_loss", "out_of_range", "corrupt", "truncat", "unexpected end",
                 "checksum", "not found", "no such file", "expecting", "decode")


def _looks_damaged(e: BaseException) -> bool:
    """Whether an orbax restore failure comes from damaged files (vs. a code/config mismatch)."""
    if isinstance(e, (IntegrityError, FileNotFoundError, EOFError, json.JSONDecodeError)):
        return True
    text = f"{type(e).__name__}: {e}".lower()
    return any(h in text for h in _DAMAGE_HINTS)
