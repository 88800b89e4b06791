"""Host-memory and disk (memory-mapped) client stores.

Both keep one ``[N, ...]`` array per leaf of a client's state. The host store
allocates them with ``np.zeros``, which the OS backs with zero pages on first
write only, so untouched clients cost no resident memory. The disk store
memory-maps one file per leaf, created sparse (``ftruncate``), so untouched
clients cost no disk blocks either; the OS page cache does the buffering.

numpy ``memmap`` was chosen over zarr and tensorstore: a round reads and
writes whole rows of a few thousand clients at random ids, which is one
fancy-index on a mapped array, with no chunk codec or extra dependency in
the hot path, and the files are plain arrays any tool can read. The files are
the live store, not the checkpoint: crash safety comes from the incremental
checkpoint segments (:mod:`fedkd_jax.runner.client_store`), and a resume
rebuilds the store from them.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import jax
import numpy as np

from fedkd_jax.errors import ConfigError
from fedkd_jax.paths import check_writable_dir
from fedkd_jax.store.base import ClientStore


def _lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros backed by an anonymous mapping that the OS fills page by page on first write.

    Transparent huge pages are turned off for it: with them, the first write
    of one client's row zero-fills a whole 2 MB page, and a store of 10^5
    teachers that a run samples sparsely would cost gigabytes of resident
    memory and seconds of page clearing per dispatch (measured: 1.6 s per
    100-client scatter, 2.9 GB peak RSS, against 41 MB of touched rows).
    """
    nbytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError:  # pragma: no cover - kernels without THP
            pass
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def host_array(x: Any) -> np.ndarray:
    """A host numpy view/copy of ``x`` (numpy, or a replicated or local jax array)."""
    if isinstance(x, np.ndarray):
        return x
    shards = getattr(x, "addressable_shards", None)
    if shards and getattr(x, "is_fully_replicated", False):
        return np.asarray(shards[0].data)
    return np.asarray(jax.device_get(x))


class HostStore(ClientStore):
    """Per-client states in host memory (numpy), lazily backed by the OS."""

    kind = "host"

    def __init__(self, template: Any, num_clients: int):
        super().__init__(template, num_clients)
        self._leaves, self._treedef = jax.tree.flatten(template)
        self.arrays = self._allocate()

    def _allocate(self) -> list[np.ndarray]:
        return [_lazy_zeros((self.num_clients,) + tuple(t.shape), t.dtype) for t in self._leaves]

    def gather(self, ids: np.ndarray) -> tuple[Any, np.ndarray]:
        ids = np.asarray(ids, np.int64)
        safe = np.minimum(ids, self.num_clients - 1)
        fresh = (ids >= self.num_clients) | ~self.touched[safe]
        stored = np.flatnonzero(~fresh)
        rows = []
        for a in self.arrays:  # read only stored rows: untouched ones are initialised, never read
            r = np.zeros((len(ids),) + a.shape[1:], a.dtype)
            r[stored] = a[ids[stored]]
            rows.append(r)
        return jax.tree.unflatten(self._treedef, rows), fresh

    def scatter(self, ids: np.ndarray, states: Any) -> None:
        ids = np.asarray(ids, np.int64)
        ok = ids < self.num_clients
        for a, leaf in zip(self.arrays, jax.tree.leaves(states)):
            a[ids[ok]] = host_array(leaf)[ok]
        self._mark(ids[ok])

    def read(self, ids: np.ndarray) -> list[np.ndarray]:
        ids = np.asarray(ids, np.int64)
        return [np.ascontiguousarray(a[ids]) for a in self.arrays]

    def write(self, ids: np.ndarray, leaves: list[np.ndarray]) -> None:
        ids = np.asarray(ids, np.int64)
        for a, rows in zip(self.arrays, leaves):
            a[ids] = rows
        self._mark(ids)
        self._dirty = np.zeros(0, np.int64)  # restored rows are already in a checkpoint

    def reset(self) -> None:
        super().reset()
        self.arrays = self._allocate()


class DiskStore(HostStore):
    """Per-client states in memory-mapped files under ``directory`` (sparse)."""

    kind = "disk"

    def __init__(self, template: Any, num_clients: int, directory: str):
        check_writable_dir("run.store_dir", directory)
        self.directory = os.path.abspath(directory)
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise ConfigError("run.store_dir", f"cannot create {directory!r}: {e.strerror}") from None
        super().__init__(template, num_clients)

    def _path(self, i: int) -> str:
        return os.path.join(self.directory, f"leaf-{i:03d}.bin")

    def _allocate(self) -> list[np.ndarray]:
        arrays = []
        for i, t in enumerate(self._leaves):
            shape = (self.num_clients,) + tuple(t.shape)
            nbytes = int(np.prod(shape)) * np.dtype(t.dtype).itemsize
            with open(self._path(i), "wb") as f:  # truncate: a fresh, sparse file
                f.truncate(nbytes)
            m = np.memmap(self._path(i), dtype=t.dtype, mode="r+", shape=shape)
            if hasattr(mmap, "MADV_RANDOM"):
                # rows are read at random ids: readahead would fill megabytes around each one
                try:
                    m._mmap.madvise(mmap.MADV_RANDOM)  # noqa: SLF001
                except (AttributeError, OSError):  # pragma: no cover
                    pass
            arrays.append(m)
        return arrays

    def reset(self) -> None:
        for a in getattr(self, "arrays", []):
            a._mmap.close()  # noqa: SLF001 - release the mapping before truncating its file
        super().reset()

    def disk_bytes(self) -> int:
        """Blocks actually allocated on disk (the files are sparse)."""
        return int(sum(os.stat(self._path(i)).st_blocks * 512 for i in range(len(self._leaves))))

    def close(self) -> None:
        for a in self.arrays:
            a.flush()
