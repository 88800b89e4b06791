"""Incremental checkpoints of the per-client population store.

A FedKD population of 1,000 clients carries about 880 MB of private
teachers, but a round changes only its cohort's entries. And the store's
starting point is a pure function of the seed (every client's state is
initialised from ``(seed, client)``), so it is never written: a chain starts
from the virtual base ``init`` (every client untouched, see
:mod:`fedkd_jax.store`). Rewriting the whole store every few rounds would
dominate the run: about 6.5 s per save against 0.6 s for 10 rounds on
W2-sized models. Instead each checkpoint writes a *segment* holding only the
rows changed since the previous checkpoint (copied out of the live store
when the checkpoint is taken), and once the segments add up to
``compact_factor`` times the touched clients, a *base* of every touched
client is written. A disk store is therefore never copied whole.

To restore round ``r``, its base is loaded and its segments are applied in
order. The checkpoint's integrity record (see
:mod:`fedkd_jax.runner.checkpoint`) lists that chain. A missing, torn or altered
file makes the checkpoint invalid, and the restore falls back to an older one.

Files are written by a background thread: to ``*.tmp`` first, then renamed
into place, so a crash leaves either the whole file or none of it. A file
holds ``np.save`` records, one after another: the ids, one array per leaf of
the store (``[n, ...]`` rows), and last the CRC-32 of each of those, checked
on every load.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import jax
import numpy as np


class IntegrityError(ValueError):
    """A checkpoint file is missing, truncated or fails its checksum."""


class StoreWriteError(RuntimeError):
    """A background write of the client store failed."""


def _lower_priority() -> None:
    """Let training threads win the cores: the writer only needs idle time."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not permitted
        pass


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8))


class ClientStoreCheckpointer:
    """Writes store bases and segments under ``directory``; rebuilds a store from a chain."""

    def __init__(self, directory: str, num_clients: int, *, compact_factor: float = 4.0):
        self.directory = directory
        self.num_clients = num_clients
        self.compact_factor = compact_factor
        self.chain: list[dict[str, Any]] = []  # entries since (and including) the current base
        self._rows_since_base = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedkd-store", initializer=_lower_priority)
        self._pending: list[Future] = []
        self.writer_cpu_seconds = 0.0  # CPU time the background writer has spent
        self.primary = jax.process_index() == 0

    # ---------------------------------------------------------------- save
    def start_from_init(self) -> None:
        """Begin a fresh run: the chain's base is the (unsaved) initial store."""
        self.chain = [{"kind": "init", "round": 0, "file": None, "rows": 0}]
        self._rows_since_base = 0

    def save(self, round_index: int, store: Any, dirty: np.ndarray | None,
             then: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
        """Queue this round's entry; return the chain a checkpoint of this round needs.

        ``store`` is the live :class:`~fedkd_jax.store.ClientStore`; the rows
        are copied out of it here, so later rounds may overwrite it while the
        writer thread works. ``dirty``: ids of clients whose state changed since
        the previous save (``None``: unknown, write a base of every touched
        client). ``then(chain)`` runs on the writer thread once the file is on
        disk (the caller commits its checkpoint there, so no checkpoint ever
        names a store file that does not exist yet).

        Raises:
          StoreWriteError: an earlier background write failed (disk full, ...).
        """
        self._check_failures()
        os.makedirs(self.directory, exist_ok=True)
        while len(self._pending) > 1:  # bound the backlog (each entry pins a store's buffers)
            self._pending[0].exception()  # waits
            self._check_failures()
        touched = int(store.touched.sum())
        full = dirty is None or not self.chain or (
            self._rows_since_base + len(dirty) > self.compact_factor * max(touched, 1))
        ids = np.flatnonzero(store.touched).astype(np.int64) if full else np.unique(np.asarray(dirty, np.int64))
        views = store.read(ids)
        kind = "base" if full else "segment"
        name = f"{kind}-{int(round_index):09d}.npy"
        entry = {"kind": kind, "round": int(round_index), "file": name, "rows": int(len(ids))}
        self.chain = [entry] if full else self.chain + [entry]
        self._rows_since_base = 0 if full else self._rows_since_base + len(ids)
        chain = [dict(e) for e in self.chain]
        if jax.process_count() > 1:
            # Committing an orbax step synchronises processes with device collectives;
            # from a background thread it could interleave with a round's collectives
            # differently on each process. Multi-process jobs commit on the main thread.
            self._write_then(name, ids, views, full, then, chain)
        else:
            self._pending.append(self._pool.submit(self._write_then, name, ids, views, full, then, chain))
        return chain

    def _check_failures(self) -> None:
        for fut in [f for f in self._pending if f.done()]:
            self._pending.remove(fut)
            if fut.exception() is not None:
                raise StoreWriteError(f"writing the client store under {self.directory} failed: {fut.exception()}") \
                    from fut.exception()

    def _write_then(self, name, ids, views, full, then, chain) -> None:
        self._write(name, ids, views, full)
        if then is not None:
            then(chain)

    def _write(self, name: str, ids: np.ndarray, leaves: list[np.ndarray], full: bool) -> None:
        if not self.primary:  # in a multi-process job process 0 writes the shared files
            return
        t0 = time.thread_time()
        path = os.path.join(self.directory, name)
        crcs = np.array([_crc(ids)] + [_crc(a) for a in leaves], np.uint32)
        with open(path + ".tmp", "wb") as f:
            np.save(f, ids, allow_pickle=False)
            for a in leaves:
                np.save(f, np.ascontiguousarray(a), allow_pickle=False)
            np.save(f, crcs, allow_pickle=False)
        os.replace(path + ".tmp", path)
        self.writer_cpu_seconds += time.thread_time() - t0

    def wait(self) -> None:
        """Block until every queued write (and its ``then``) is done; raise if one failed."""
        pending, self._pending = self._pending, []
        for fut in pending:
            if fut.exception() is not None:
                raise StoreWriteError(f"writing the client store under {self.directory} failed: {fut.exception()}") \
                    from fut.exception()

    # -------------------------------------------------------------- restore
    def load(self, chain: list[dict[str, Any]], store: Any) -> None:
        """Rebuild ``store`` (a :class:`~fedkd_jax.store.ClientStore`) from ``chain``, verifying CRCs.

        The store is reset to the seed-defined start, then the base (if any) and
        the segments are written in order.
        """
        if not chain or chain[0]["kind"] not in ("base", "init"):
            raise IntegrityError("client-store chain does not start with a base")
        leaves_like = jax.tree.leaves(store.template)
        entries = []
        for entry in (chain[1:] if chain[0]["kind"] == "init" else chain):
            path = os.path.join(self.directory, entry["file"])
            if not os.path.exists(path):
                raise IntegrityError(f"client-store file {entry['file']} is missing")
            try:
                with open(path, "rb") as f:
                    ids = np.load(f, allow_pickle=False)
                    arrays = [np.load(f, allow_pickle=False) for _ in leaves_like]
                    stored = np.load(f, allow_pickle=False)
            except (ValueError, EOFError, OSError) as e:
                raise IntegrityError(f"client-store file {entry['file']} is unreadable ({e})") from e
            crcs = np.array([_crc(ids)] + [_crc(a) for a in arrays], np.uint32)
            if not np.array_equal(crcs, stored) or len(ids) != entry["rows"]:
                raise IntegrityError(f"client-store file {entry['file']} fails its checksum")
            if len(ids) and (ids.min() < 0 or ids.max() >= self.num_clients):
                raise IntegrityError(f"client-store file {entry['file']} names clients outside the population")
            for a, t in zip(arrays, leaves_like):
                if a.shape[1:] != tuple(t.shape) or a.dtype != t.dtype:
                    raise ValueError(f"client-store array {a.shape} {a.dtype} does not match {t.shape} {t.dtype}")
            entries.append((ids, arrays))
        store.reset()  # only once every file has verified: a failure leaves the store as it was
        for ids, arrays in entries:
            store.write(ids, arrays)
        self.chain = [dict(e) for e in chain]
        self._rows_since_base = sum(e["rows"] for e in chain if e["kind"] == "segment")  # as save() counts

    def prune(self, keep_files: set[str]) -> None:
        """Delete store data files that no retained checkpoint needs (call on the writer thread)."""
        if not self.primary:
            return
        keep = set(keep_files) | {e["file"] for e in self.chain if e["file"]}
        for name in os.listdir(self.directory):
            if (name.endswith(".npy") and name not in keep) or name.endswith(".npy.tmp"):
                try:
                    os.remove(os.path.join(self.directory, name))
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        self.wait()
        self._pool.shutdown(wait=True)
