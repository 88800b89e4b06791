"""The pooled examples in memory-mapped ``.npy`` files (``data.pool=disk``).

Shape key: ``R`` pooled rows, ``D`` features (``L`` tokens of a sequence).

A pool file is a directory ``<pool_dir>/<key>/`` holding ``x.npy [R, D]`` and
``y.npy [R]`` (next-token data: ``[R, L]``), optionally the dataset's
``client_ids.npy`` and ``is_test.npy``, and ``meta.json``. It is written
under a temporary name and renamed when complete, so a reader never maps
half a pool, and two processes writing the same key both end up with one
whole copy. Rows are written with ``os.pwrite`` in chunks: a pool larger
than memory never has to be in memory, and writing it adds nothing to the
writer's resident set.

Token ids are stored in the narrowest integer type that holds the
vocabulary (``uint16`` for Stack Overflow's 10,004 ids, ``uint8`` for
Shakespeare's characters), targets in the narrowest signed one (padding is
``-1``): Stack Overflow's 135.8 million sentences take 10.9 GB instead of
21.7 GB. Features of other tasks stay ``float32``. A dispatch casts only the
rows it gathers to what the round expects (``x`` float32, ``y`` int32;
:func:`fedkd_jax.engine.pool.gather_rows`).

``.npy`` through ``np.lib.format.open_memmap`` rather than zarr or
tensorstore, as for the disk client store (:mod:`fedkd_jax.store.host`): a
dispatch reads a few thousand rows at sorted row ids, one fancy index on a
mapped array, with no codec or extra dependency, and any tool reads the files.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from fedkd_jax.errors import ConfigError
from fedkd_jax.paths import check_writable_dir

FORMAT = 1  # bump when the layout changes: older pool files are then not reused


def default_dir() -> str:
    """``data.pool_dir`` when unset: ``$FEDKD_POOL_DIR``, else ``$XDG_CACHE_HOME/fedkd_jax/pools``
    (``~/.cache/...``), beside the compilation cache: a cache shared by the user's runs, so a
    dataset's files are decoded once, and a run that fails its checks leaves its ``--out`` untouched."""
    if os.environ.get("FEDKD_POOL_DIR"):
        return os.path.expanduser(os.environ["FEDKD_POOL_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fedkd_jax", "pools")
_INTS = (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.int64)


def narrow_int(lo: int, hi: int) -> np.dtype:
    """The smallest integer dtype holding every value in ``[lo, hi]``."""
    for t in _INTS:
        info = np.iinfo(t)
        if info.min <= lo and hi <= info.max:
            return np.dtype(t)
    raise ValueError(f"no integer dtype holds [{lo}, {hi}]")


def pool_dtypes(task: str, num_classes: int) -> tuple[np.dtype, np.dtype]:
    """``(x dtype, y dtype)`` of a pool file: token ids and targets (``-1``: padding) as
    narrow integers for next-token data; float32 features and narrow labels otherwise."""
    if task == "next_token":
        return narrow_int(0, num_classes - 1), narrow_int(-1, num_classes - 1)
    return np.dtype(np.float32), narrow_int(0, num_classes - 1)


def is_mapped(a: Any) -> bool:
    """Whether ``a`` is a memory-mapped array (a pool already on disk)."""
    return isinstance(a, np.memmap)


def _pwrite_all(fd: int, a: np.ndarray, position: int) -> None:
    """Write ``a``'s bytes at ``position`` (a single write may stop short, e.g. at 2 GB on Linux)."""
    view = memoryview(a.reshape(-1)).cast("B")
    while len(view):
        n = os.pwrite(fd, view, position)
        view, position = view[n:], position + n


class PoolWriter:
    """Writes a pool file chunk by chunk; :meth:`finish` publishes it under ``key``.

    Args:
      directory: the pool directory (created if missing).
      key: the pool file's name in it.
      rows: ``R``.
      x_shape, y_shape: the shape of one row of ``x`` and of ``y`` (``()`` for labels).
      x_dtype, y_dtype: the stored dtypes (see :func:`pool_dtypes`).
      field: the config key named in errors.
    """

    def __init__(self, directory: str, key: str, *, rows: int, x_shape: tuple[int, ...], x_dtype,
                 y_shape: tuple[int, ...], y_dtype, field: str = "data.pool_dir"):
        self.field = field
        check_writable_dir(field, directory)
        self.directory = os.path.abspath(directory)
        try:
            os.makedirs(self.directory, exist_ok=True)
            self.tmp = tempfile.mkdtemp(dir=self.directory, prefix=f".{key}.tmp-")
        except OSError as e:
            raise ConfigError(field, f"cannot create a pool file in {directory!r}: {e.strerror}") from None
        self.path = os.path.join(self.directory, key)
        self.rows = int(rows)
        self._files = {}
        for name, shape, dtype in (("x", x_shape, x_dtype), ("y", y_shape, y_dtype)):
            full = (self.rows,) + tuple(shape)
            m = self._guard(lambda: np.lib.format.open_memmap(  # noqa: B023 - called at once
                os.path.join(self.tmp, f"{name}.npy"), mode="w+", dtype=dtype, shape=full))
            offset, dt, row_bytes = int(m.offset), m.dtype, int(np.prod(shape, dtype=np.int64)) * m.dtype.itemsize
            del m  # the header is written and the file sized (sparse); rows go in with pwrite
            fd = os.open(os.path.join(self.tmp, f"{name}.npy"), os.O_WRONLY)
            self._files[name] = (fd, offset, dt, tuple(shape), row_bytes)

    def _guard(self, fn):
        try:
            return fn()
        except OSError as e:
            self.abort()
            raise ConfigError(self.field, f"cannot write the pool file in {self.directory!r}: "
                                          f"{e.strerror or e}") from None

    def write(self, start: int, x: np.ndarray, y: np.ndarray) -> None:
        """Rows ``start .. start + len(x)`` (cast to the stored dtypes; integers must fit)."""
        for name, a in (("x", x), ("y", y)):
            fd, offset, dt, shape, row_bytes = self._files[name]
            a = np.asarray(a)
            if a.shape[1:] != shape or start + len(a) > self.rows:
                raise ValueError(f"{name} rows {start}..{start + len(a)} of shape {a.shape[1:]} do not fit "
                                 f"[{self.rows}, {shape}]")
            if dt.kind in "iu" and a.size:
                info = np.iinfo(dt)
                lo, hi = a.min(), a.max()
                if lo < info.min or hi > info.max:
                    raise ValueError(f"{name} holds values in [{lo}, {hi}], outside {dt.name}")
            self._guard(lambda: _pwrite_all(fd, np.ascontiguousarray(a, dt),  # noqa: B023
                                            offset + int(start) * row_bytes))

    def add(self, name: str, array: np.ndarray) -> None:
        """Another array of the pool file (e.g. the dataset's client ids), saved whole."""
        self._guard(lambda: np.save(os.path.join(self.tmp, f"{name}.npy"), np.asarray(array)))

    def finish(self, meta: dict[str, Any] | None = None) -> str:
        """Publish the pool file; returns its path (an equal copy another process
        published first is kept and this one dropped)."""
        for fd, *_ in self._files.values():
            os.close(fd)
        self._files = {}
        meta = {"format": FORMAT, "rows": self.rows, **(meta or {})}
        with open(os.path.join(self.tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide a shared pool_dir's files from others
        try:
            os.rename(self.tmp, self.path)
        except OSError:
            if not os.path.isfile(os.path.join(self.path, "meta.json")):
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        for fd, *_ in self._files.values():
            os.close(fd)
        self._files = {}
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None and self._files:
            self.abort()
        return False


def write_pool(directory: str, key: str, x: np.ndarray, y: np.ndarray, *, task: str, num_classes: int,
               extra: dict[str, np.ndarray] | None = None, meta: dict[str, Any] | None = None,
               chunk_bytes: int = 64 << 20, field: str = "data.pool_dir") -> str:
    """Copy in-memory ``x``, ``y`` into a pool file (narrow dtypes, in chunks of about
    ``chunk_bytes``); its path."""
    xd, yd = pool_dtypes(task, num_classes)
    row = (int(np.prod(x.shape[1:], dtype=np.int64)) + int(np.prod(y.shape[1:], dtype=np.int64))) * 4
    chunk_rows = max(1, chunk_bytes // max(row, 1))
    with PoolWriter(directory, key, rows=len(x), x_shape=x.shape[1:], x_dtype=xd, y_shape=y.shape[1:],
                    y_dtype=yd, field=field) as w:
        for s in range(0, len(x), chunk_rows):
            w.write(s, x[s:s + chunk_rows], y[s:s + chunk_rows])
        for name, a in (extra or {}).items():
            w.add(name, a)
        host = int(np.prod(x.shape, dtype=np.int64)) * 4 + int(np.prod(y.shape, dtype=np.int64)) * 4
        return w.finish({"task": task, "num_classes": int(num_classes), "host_bytes": host, **(meta or {})})


def open_pool(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """``({name: array}, meta)`` of a complete pool file (every array memory-mapped
    read-only), or ``None`` when there is none at ``path`` or it is of another format."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT:
        return None
    arrays = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".npy"):
            stem = name[:-4]
            arrays[stem] = np.load(os.path.join(path, name), mmap_mode="r")
    return (arrays, meta) if "x" in arrays and "y" in arrays else None


def random_access(a: np.ndarray) -> None:
    """Tell the kernel that memory-mapped ``a`` is read at scattered rows (a dispatch reads a few
    kilobytes per client), so it reads no megabytes ahead around each one; not for a whole
    sequential pass (e.g. validating the rows), which readahead speeds up."""
    m = getattr(a, "_mmap", None)
    if m is not None and hasattr(mmap, "MADV_RANDOM"):
        try:
            m.madvise(mmap.MADV_RANDOM)
        except OSError:  # pragma: no cover - a platform without it
            pass


def pool_bytes(path: str) -> int:
    """Bytes the pool file's arrays take on disk."""
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".npy"))


def to_disk(data, directory: str | None, *, field: str = "data.pool_dir"):
    """``data`` (a :class:`~fedkd_jax.data.FederatedData`) with its pool in a pool file of its
    own, in a temporary directory under ``directory`` (default: the system's) that is
    removed with the returned handle (at the latest when the process exits).

    Returns:
      ``(data, handle)``: keep ``handle`` while the pool is in use (``None``: already on disk).
    """
    if is_mapped(data.x) and is_mapped(data.y):
        return data, None
    if directory is not None:
        check_writable_dir(field, directory)
        os.makedirs(directory, exist_ok=True)
    handle = tempfile.TemporaryDirectory(prefix="fedkd-pool-", dir=directory)
    path = write_pool(handle.name, "pool", data.x, data.y, task=data.task, num_classes=data.num_classes, field=field)
    arrays, _ = open_pool(path)
    return data.replace(x=arrays["x"], y=arrays["y"]), handle


# ------------------------------------------------------------- dataset cache
def source_key(options: dict[str, Any], path: str | None) -> str:
    """The name of a dataset's pool file: a hash of the read ``options`` and of every
    source file's path, size and modification time (a changed file is read again)."""
    import hashlib

    files = []
    if path:
        path = os.path.abspath(os.path.expanduser(path))
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names)]
        elif os.path.exists(path):
            files = [path]
    stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    blob = json.dumps({"format": FORMAT, "options": options, "path": path, "files": stats}, sort_keys=True,
                      default=str)
    return f"{options.get('name', 'data')}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}"


def save_dataset(directory: str, key: str, ds, *, field: str = "data.pool_dir"):
    """Write ``ds`` (a :class:`~fedkd_jax.data.datasets.Dataset`) as pool file ``key`` and
    return it read back from there (:func:`open_dataset`): its rows memory-mapped."""
    extra = {k: np.asarray(getattr(ds, k)) for k in ("client_ids", "is_test") if getattr(ds, k) is not None}
    extra = {k: a.astype(str) if a.dtype == object else a for k, a in extra.items()}  # .npy without pickle
    meta = {"name": ds.name, "image_shape": list(ds.image_shape) if ds.image_shape else None,
            "special_tokens": ds.special_tokens}
    write_pool(directory, key, np.asarray(ds.x), np.asarray(ds.y), task=ds.task,
                      num_classes=ds.num_classes, extra=extra, meta=meta, field=field)
    return open_dataset(directory, key)


def open_dataset(directory: str, key: str):
    """The dataset of pool file ``key`` (rows memory-mapped), or ``None`` if there is none."""
    from fedkd_jax.data.datasets import Dataset

    found = open_pool(os.path.join(directory, key))
    if found is None or "name" not in found[1]:
        return None
    a, meta = found
    shape = tuple(meta["image_shape"]) if meta.get("image_shape") else None
    return Dataset(meta["name"], a["x"], a["y"], int(meta["num_classes"]), shape, a.get("client_ids"),
                   task=meta["task"], is_test=a.get("is_test"), special_tokens=meta.get("special_tokens"))


def dataset_bytes(directory: str, key: str) -> int | None:
    """Bytes the pool file ``key`` would take in host memory as float32 / int32 (``None``: no such file)."""
    found = open_pool(os.path.join(directory, key))
    return None if found is None else int(found[1].get("host_bytes", 0))
