"""Shared pieces of the file readers: errors that name the file, lazy optional
imports, path resolution and the per-client collector that builds a :class:`Dataset`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Iterable

import numpy as np

from fedkd_jax.data.datasets import Dataset
from fedkd_jax.errors import DataError

FIELD = "data.path"


def bad(path: str, message: str) -> DataError:
    """A :class:`DataError` on ``data.path`` naming the file and what was expected."""
    return DataError(FIELD, f"{path!r}: {message}")


def first_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:160]}"


def need_package(module: str, pip_name: str, fmt: str) -> Any:
    """Import an optional dependency, or say which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(FIELD, f"reading {fmt} needs the '{pip_name}' package: pip install 'fedkd_jax[formats]' "
                               f"(or pip install {pip_name})") from None


def need_path(path: str | None, dataset: str, expected: str) -> str:
    if not path:
        raise DataError(FIELD, f"dataset '{dataset}' needs data.path={expected}")
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise DataError(FIELD, f"no such file or directory: {path!r} (dataset '{dataset}' expects {expected})")
    if not os.access(path, os.R_OK):
        raise DataError(FIELD, f"{path!r} cannot be read (permission denied)")
    return path


def sibling(path: str, old: str, new: str) -> str | None:
    """``path`` with the last ``old`` of its file name replaced by ``new``, if that file exists
    (``fed_emnist_train.h5`` -> ``fed_emnist_test.h5``)."""
    d, name = os.path.split(path)
    i = name.rfind(old)
    if i < 0:
        return None
    other = os.path.join(d, name[:i] + new + name[i + len(old):])
    return other if other != path and os.path.isfile(other) else None


class Collector:
    """Rows gathered client by client, then stacked into one :class:`Dataset`.

    Clients are numbered in sorted order of their names, whatever order the file
    lists them in, so the same files always give the same ids.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._x: list[np.ndarray] = []
        self._y: list[np.ndarray] = []
        self._client: list[str] = []
        self._count: list[int] = []
        self._test: list[bool] = []

    def add(self, client: str, x: np.ndarray, y: np.ndarray, *, test: bool = False) -> None:
        if len(x) != len(y):
            raise bad(self.path, f"client {client!r}: {len(x)} examples of features but {len(y)} labels")
        if not len(x):
            return
        self._x.append(np.asarray(x, np.float32))
        self._y.append(np.asarray(y, np.int32))
        self._client.append(str(client))
        self._count.append(len(x))
        self._test.append(test)

    @property
    def has_test(self) -> bool:
        return any(self._test)

    def __len__(self) -> int:
        return sum(self._count)

    def dataset(self, name: str, num_classes: int, *, image_shape: tuple[int, ...] | None = None,
                task: str = "classification", special_tokens: dict[str, int] | None = None) -> Dataset:
        if not self._x:
            raise bad(self.path, "holds no examples")
        names = sorted(set(self._client))
        index = {c: i for i, c in enumerate(names)}
        counts = np.asarray(self._count, np.int64)
        ids = np.repeat(np.asarray([index[c] for c in self._client], np.int64), counts)
        is_test = np.repeat(np.asarray(self._test, bool), counts) if self.has_test else None
        x = np.concatenate(self._x)
        y = np.concatenate(self._y)
        return Dataset(name, x, y, int(num_classes), image_shape, ids, task=task, is_test=is_test,
                       special_tokens=special_tokens)


def listing(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return "[" + ", ".join(repr(n) for n in names[:limit]) + more + "]"
