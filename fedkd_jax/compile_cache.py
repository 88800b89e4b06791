"""JAX's persistent compilation cache, on by default for the CLI and ``fk.run`` / ``fk.sweep``.

A second run of the same shapes (a rerun, a sweep point run alone, a test)
loads its compiled round from disk instead of compiling it again. Entry
points call :func:`configure_compile_cache` before anything compiles;
``import fedkd_jax`` configures nothing.

* Where: ``$FEDKD_COMPILE_CACHE`` if it names a directory, else
  ``$XDG_CACHE_HOME/fedkd_jax/jax-compile-cache`` (``~/.cache/...``). A cache
  the user already chose for JAX (``JAX_COMPILATION_CACHE_DIR`` or
  ``jax.config``) is kept as it is.
* Off: ``FEDKD_COMPILE_CACHE=off`` (or ``0``, ``false``, ``no``).
* Clear: delete the directory; it is rebuilt on demand.
* Safe across versions: JAX's cache key includes the jax / jaxlib version, the
  backend and the compile options, so another version misses instead of
  loading a stale program.
* Safe across concurrent processes and bounded: with a size limit JAX takes a
  file lock (the ``filelock`` package) for every read and write, and evicts
  the least recently used programs beyond :data:`MAX_BYTES`.
"""

from __future__ import annotations

import os
import warnings

import jax

MAX_BYTES = 2 * 1024**3
MIN_COMPILE_SECS = 0.0  # every program: loading a small one from disk beats compiling it again
OFF = ("off", "0", "false", "no")


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fedkd_jax", "jax-compile-cache")


def configure_compile_cache() -> str | None:
    """Turn on the persistent compilation cache (see the module docstring).

    Returns:
      The cache directory in use, or ``None`` when it is off or cannot be written
      (then it warns once and runs without it).
    """
    setting = os.environ.get("FEDKD_COMPILE_CACHE", "").strip()
    if setting.lower() in OFF:
        return None
    chosen = os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir
    if chosen:  # the user's own JAX cache wins
        return chosen
    path = os.path.abspath(os.path.expanduser(setting or default_dir()))
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".probe-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        warnings.warn(f"FEDKD_COMPILE_CACHE: cannot write {path!r} ({e.strerror}); compiling without a "
                      "persistent cache", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    try:
        import filelock  # noqa: F401 - JAX's cache locks with it once a size limit is set
    except ImportError:  # pragma: no cover - a dependency; without it the cache stays unbounded
        return path
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
