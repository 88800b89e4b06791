"""Placing host arrays on the mesh, in one process or across several.

With ``jax.distributed`` every process holds the same host arrays (each runs
the same deterministic host code) but can only place data on its own
devices; :func:`jax.make_array_from_callback` builds the global array from
each process's addressable shards. In a single process it is equivalent to
``jax.device_put``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding


def _place(x: Any, sharding: Sharding) -> jax.Array:
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        if x.sharding == sharding or jax.process_count() == 1:
            return jax.device_put(x, sharding)
        data = _place(np.asarray(jax.random.key_data(x)), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if jax.process_count() == 1 or x.is_fully_addressable:
            if jax.process_count() == 1:
                return jax.device_put(x, sharding)
            x = np.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    a = np.asarray(x)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def put_replicated(tree: Any, sharding: Sharding) -> Any:
    """Every leaf of ``tree`` replicated with ``sharding`` (a ``P()`` sharding)."""
    return jax.tree.map(lambda x: _place(x, sharding), tree)


def put_sharded(x: Any, sharding: Sharding) -> jax.Array:
    """A host array split over the mesh as ``sharding`` says."""
    return _place(x, sharding)


def fetch(x: Any) -> np.ndarray:
    """A host copy of a (possibly multi-process) global array."""
    if isinstance(x, np.ndarray) or not isinstance(x, jax.Array):
        return np.asarray(x)
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
        return np.asarray(x.addressable_shards[0].data)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
