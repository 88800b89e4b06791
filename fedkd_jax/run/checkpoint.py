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
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

FORMAT = 1


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
    """Asynchronous saves every few rounds, keeping the last ``keep``; verified restores."""

    def __init__(self, directory: str, *, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.keep = keep
        self.manager = self._manager()
        self.events: list[str] = []

    def _manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, enable_async_checkpointing=True),
            item_names=("state", "integrity"),
        )

    def save(self, round_index: int, state: Any) -> None:
        record = {"format": FORMAT, "round": int(round_index), "checksums": checksums(state)}
        self.manager.save(
            int(round_index),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), integrity=ocp.args.JsonSave(record)),
        )

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, round_index: int, like: Any) -> Any:
        """Restore one step into ``like``'s structure and shardings and verify it."""
        r = self.manager.restore(
            int(round_index),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(like)), integrity=ocp.args.JsonRestore()),
        )
        record, state = r.integrity, r.state
        if record.get("round") != int(round_index):
            raise ValueError(f"integrity record names round {record.get('round')}")
        if int(np.asarray(state.round)) != int(round_index):
            raise ValueError(f"state holds round {int(np.asarray(state.round))}")
        if record.get("checksums") != checksums(state):
            raise ValueError("checksum mismatch (the files were altered after saving)")
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

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
