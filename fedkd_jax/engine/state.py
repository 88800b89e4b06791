"""The simulation state, the pooled rows on the devices, and the key schedule.

Every random choice derives from the run's base key by folding in tags and
indices: the server's initialisation, each client's initial state, each
round, each client within a round. Nothing advances a key, so a run is the
same whatever the device count, store or number of processes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import struct

# Tags folded into the seed key so each use of randomness gets its own stream.
_SERVER_INIT, _CLIENT_INIT, _ROUND = 0, 1, 2
_CLIENTS_TAG, _SERVER, _DOWNLINK, _AGGREGATE = 1, 2, 4, 5
_COMPRESS = 0x5EED  # folded into a client's key for its compressor's randomness


@struct.dataclass
class SimState:
    """Everything a round reads and writes besides the per-client store.

    Attributes:
      round: int32 scalar, rounds completed.
      server: the algorithm's server state (global params, optimizer state...).
      key: the run's base PRNG key (from the seed); never advanced: round and
        client keys are derived by folding in their indices.
      agg: the aggregation chain's state, a dict by transform name (e.g. the
        adaptive clip norm).
    """

    round: jax.Array
    server: Any
    key: jax.Array
    agg: Any = ()


class PoolData(NamedTuple):
    """The pooled rows on the devices (replicated): ``x [R, D]``, ``y [R]``."""

    x: jax.Array
    y: jax.Array


def round_key(base: jax.Array, round_index: jax.Array) -> jax.Array:
    """The key of round ``round_index``."""
    return jax.random.fold_in(jax.random.fold_in(base, _ROUND), round_index)


def client_key(rkey: jax.Array, client_id: jax.Array) -> jax.Array:
    """The key of client ``client_id`` in the round keyed ``rkey``."""
    return jax.random.fold_in(jax.random.fold_in(rkey, _CLIENTS_TAG), client_id)


def client_init_key(base: jax.Array, client_id: jax.Array) -> jax.Array:
    """The key that initialises client ``client_id``'s persistent state."""
    return jax.random.fold_in(jax.random.fold_in(base, _CLIENT_INIT), client_id)
