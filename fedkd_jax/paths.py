"""Checks of every path a user names, run before anything is loaded or compiled.

Each failure is a :class:`~fedkd_jax.errors.ConfigError` (or ``DataError``)
naming the option (``--out``, ``--config``, ``data.path`` ...) and what is
wrong, so the CLI prints one line and exits 2 with saved work untouched.
"""

from __future__ import annotations

import os
import tempfile
import zipfile

from fedkd_jax.errors import ConfigError, DataError


def check_input_file(field: str, path: str, *, what: str = "file") -> None:
    """``path`` exists, is a regular file and can be read."""
    if not path:
        raise ConfigError(field, f"needs a {what} path")
    if not os.path.exists(path):
        raise ConfigError(field, f"no such file: {path!r}")
    if os.path.isdir(path):
        raise ConfigError(field, f"{path!r} is a directory; expected a {what}")
    if not os.access(path, os.R_OK):
        raise ConfigError(field, f"{path!r} cannot be read (permission denied)")


def check_npz(field: str, path: str) -> None:
    """``path`` is a readable NumPy ``.npz`` archive (a zip file), not some other format."""
    check_input_file(field, path, what=".npz file")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(6)
        kind = "a single-array .npy file" if head == b"\x93NUMPY" else "not a NumPy archive"
        raise DataError(field, f"{path!r} is {kind}; expected a .npz file written by numpy.savez "
                               "with arrays x and y")


def _can_write_in(directory: str) -> bool:
    """Whether a file can be created in ``directory`` (permission bits alone lie for
    root and for read-only or virtual file systems, so try it)."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_writable_dir(field: str, path: str) -> None:
    """``path`` is a directory we can write into, or can be created as one.

    Refuses a path naming an existing file (or with a file among its parents)
    and a location without write permission.
    """
    if not path:
        raise ConfigError(field, "needs a directory path")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(field, f"{path!r} is a file, not a directory; choose another path")
        if not _can_write_in(path):
            raise ConfigError(field, f"directory {path!r} is not writable")
        return
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        raise ConfigError(field, f"cannot create {path!r}: {base!r} is a file, not a directory")
    if not _can_write_in(base):
        raise ConfigError(field, f"cannot create {path!r}: {base!r} is not writable")


def check_run_dir(field: str, path: str) -> None:
    """``path`` is an existing run directory holding ``config.json``."""
    if not os.path.exists(path):
        raise ConfigError(field, f"no such directory: {path!r}")
    if not os.path.isdir(path):
        raise ConfigError(field, f"{path!r} is a file, not a run directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(field, f"{path!r} holds no config.json; it is not a fedkd run directory")
    check_writable_dir(field, path)
