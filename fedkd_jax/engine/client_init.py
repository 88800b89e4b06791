"""Seed-defined initial client states, computed lazily in fixed-size blocks.

A client's initial persistent state (e.g. FedKD's private teacher) is a
function of ``(seed, client)``, so stores hold only clients that have
trained; the others are initialised when first sampled, in blocks of
:data:`INIT_BLOCK` (one compile per run, shared by a sweep's simulators).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedkd_jax.engine.state import client_init_key

INIT_BLOCK = 32  # clients initialised per call (a fixed shape: one compile per run)
_INIT_PROGRAMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@jax.jit
def fill_fresh(states: Any, fresh: jax.Array, init: Any) -> Any:
    """``states`` with the rows flagged ``fresh`` replaced by ``init``'s (on the devices)."""
    def pick(a, b):
        return jnp.where(fresh.reshape((-1,) + (1,) * (a.ndim - 1)), b, a)

    return jax.tree.map(pick, states, init)


def init_program(init_client: Callable) -> Callable:
    """``(key, ids) -> states`` jitted once per ``init_client`` (shared by simulators of a sweep)."""
    if init_client not in _INIT_PROGRAMS:
        _INIT_PROGRAMS[init_client] = jax.jit(
            lambda key, ids: jax.vmap(lambda i: init_client(client_init_key(key, i)))(ids))
    return _INIT_PROGRAMS[init_client]


def initial_states(program: Callable, template: Any, key: jax.Array, ids: np.ndarray) -> list[np.ndarray]:
    """Host copies (one array per leaf, ``[len(ids), ...]``) of the initial states of
    clients ``ids``, from ``program`` (:func:`init_program`) in blocks on one device."""
    ids = np.asarray(ids, np.int32)
    b = INIT_BLOCK
    # one placement for the key wherever it comes from, so the initialiser compiles once
    if isinstance(key, jax.Array) and not key.is_fully_addressable:  # a multi-process global key
        key = key.addressable_data(0)
    key = jax.device_put(key, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    out = []
    for i in range(0, len(ids), b):
        block = np.zeros(b, np.int32)
        block[: len(ids[i:i + b])] = ids[i:i + b]
        out.append([np.asarray(a) for a in jax.tree.leaves(jax.device_get(program(key, block)))])
    if not out:
        return [np.zeros((0,) + tuple(t.shape), t.dtype) for t in jax.tree.leaves(template)]
    return [np.concatenate(parts)[: len(ids)] for parts in zip(*out)]
