"""Orbax checkpoints of the whole :class:`~fedkd_jax.engine.SimState`."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Asynchronous saves every few rounds, keeping the last ``keep``.

    Restores always go through an abstract target built from a live state,
    so NamedTuple optimizer states and typed PRNG keys come back typed.
    """

    def __init__(self, directory: str, *, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
        )

    def save(self, round_index: int, state) -> None:
        self.manager.save(int(round_index), args=ocp.args.StandardSave(state))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, round_index: int, like):
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(int(round_index), args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
