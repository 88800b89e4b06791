"""Cohorts, sampled on the host ahead of the device, and the plan of a dispatch.

Shape key: ``R`` rounds in one dispatch, ``C`` cohort, ``Cp`` cohort padded to
a multiple of ``devices * group_size``, ``M`` largest client, ``U`` clients in
the union of the dispatch's cohorts (padded to a fixed size so a dispatch
compiles once).

Cohort ``r`` is a pure function of the run's key and ``r``: a numpy
generator seeded with the key's bits, the round and a tag draws ``C`` of ``N``
without replacement (Floyd's algorithm in numpy for ``C << N``: O(C), so a
million-client population samples in microseconds). Knowing cohorts ahead is
what lets the run loop gather the next dispatch's client states while the
current one computes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedkd_jax.algorithms.base import FULL_WORK, LEGACY_STRAGGLER, STRAGGLER

_COHORT_TAG = 0xC0407
_STRAGGLERS = 3


def key_bits(key: jax.Array) -> tuple[int, ...]:
    """The run key's raw bits, as host integers (the host sampler's seed)."""
    return tuple(int(v) for v in np.asarray(jax.random.key_data(key)).ravel())


def sample_cohort(key: jax.Array | tuple[int, ...], round_index: int, num_clients: int, cohort_size: int,
                  sampling: str = "fixed") -> np.ndarray:
    """Distinct client ids of round ``round_index``.

    ``fixed``: ``C`` of ``N`` uniformly without replacement. ``poisson``: each
    client independently with probability ``q = C / N`` (the cohort's size is
    ``Binomial(N, q)``; given it, the members are uniform), as DP's Poisson
    subsampling assumes.
    """
    bits = key if isinstance(key, tuple) else key_bits(key)
    rng = np.random.default_rng([*bits, int(round_index), _COHORT_TAG])
    if sampling == "poisson":
        k = int(rng.binomial(num_clients, cohort_size / num_clients))
        return np.sort(rng.choice(num_clients, k, replace=False))
    if cohort_size == num_clients:
        return rng.permutation(num_clients)
    return rng.choice(num_clients, cohort_size, replace=False)


def poisson_capacity(num_clients: int, cohort_size: int) -> int:
    """Positions reserved for a Poisson cohort of expected size ``C``: ``C + 7 sigma + 1``
    (exceeded with probability below 1e-11), at most ``N``."""
    q = cohort_size / num_clients
    return min(num_clients, int(math.ceil(cohort_size + 7 * math.sqrt(num_clients * q * (1 - q)) + 1)))


def straggler_count(fraction: float, cohort_size: int) -> int:
    """Stragglers in a cohort of ``C``: ``C - round(C * (1 - fraction))``.

    The one definition of the count, on the host: FedProx's reference code
    (litian96/FedProx, ``flearn/trainers/fedprox.py``) keeps
    ``round(C * (1 - drop_percent))`` active clients with Python's float64
    arithmetic and round-half-to-even, and so does this. ``round(fraction * C)``
    differs at 242 of the (fraction, C) pairs on a 0.01 x 1..200 grid (ties such
    as ``(0.02, 25)``: 1 straggler here, 0 there), and float32 arithmetic on a
    traced fraction differs again (``(0.59, 50)``: 30 here, 29 from
    ``jnp.round(float32(0.59) * 50)``; ``(0.3, 45)``: 14 here, 13 from this
    formula in float32). So the program never derives the count itself: single
    runs and every run of a batched sweep pass this integer in.
    """
    c = int(cohort_size)
    return c - round(c * (1.0 - float(fraction)))


def straggler_flags(rkey: jax.Array, cohort_size: int, padded: int, fraction: Any, mode: str,
                    count: Any = None) -> jax.Array:
    """``[padded]`` int32 ``ClientData.straggler`` codes for the cohort's positions (in the program).

    ``fixed`` (FedProx, Li et al. 2020): exactly ``count`` of the ``C`` real
    positions, uniformly at random, are ``STRAGGLER``; ``count`` (an integer,
    possibly traced) comes from :func:`straggler_count` on the host, which is
    also its default for a Python ``fraction``.
    ``bernoulli`` (the older draw): each position independently with
    probability ``fraction``, coded ``LEGACY_STRAGGLER``. Padding positions are
    never stragglers.
    """
    key = jax.random.fold_in(rkey, _STRAGGLERS)
    u = jax.random.uniform(key, (cohort_size,))
    if mode == "fixed":
        if count is None:
            if not isinstance(fraction, (int, float)):
                raise TypeError("a traced straggler fraction needs its count from straggler_count() on the host")
            count = straggler_count(fraction, cohort_size)
        k = jnp.asarray(count).astype(jnp.int32)
        rank = jnp.argsort(jnp.argsort(u))
        flags = jnp.where(rank < k, STRAGGLER, FULL_WORK)
    else:
        flags = jnp.where(u < fraction, LEGACY_STRAGGLER, FULL_WORK)
    return jnp.concatenate([flags, jnp.zeros((padded - cohort_size,), flags.dtype)]).astype(jnp.int32)


class Plan(NamedTuple):
    """What a dispatch of ``R`` rounds needs from the host (numpy).

    Attributes:
      start: first round of the dispatch.
      ids: ``[R, Cp]`` int32 cohort ids, ``N`` for padding positions.
      rows: ``[R, Cp, M]`` int32 pool rows of each client's training split.
      counts: ``[R, Cp]`` int32 real rows (0 for padding).
      pos: ``[R, Cp]`` int32 position of each client in ``union`` (``U`` for padding).
      union: ``[U]`` int64 distinct ids of the dispatch's clients, ``N``-padded.
    """

    start: int
    ids: np.ndarray
    rows: np.ndarray
    counts: np.ndarray
    pos: np.ndarray
    union: np.ndarray


def union_size(num_rounds: int, cohort_size: int, num_clients: int) -> int:
    return min(num_rounds * cohort_size, num_clients)


def make_plan(data, key_or_bits, start: int, num_rounds: int, cohort_size: int, padded: int, *,
              stateful: bool, sampling: str = "fixed", capacity: int | None = None,
              width: int | None = None, layout=None) -> Plan:
    """The host-side plan of rounds ``start .. start + num_rounds - 1``.

    ``data`` is a :class:`~fedkd_jax.data.FederatedData` (its row tables stay on the host).
    ``layout``: a :class:`~fedkd_jax.hetero.GroupLayout` (architecture groups: stratified
    cohorts, each group in its own slots of every device's block).
    """
    n = data.num_clients
    bits = key_or_bits if isinstance(key_or_bits, tuple) else key_bits(key_or_bits)
    ids = np.full((num_rounds, padded), n, np.int64)
    cap = capacity or cohort_size
    for r in range(num_rounds):
        if layout is not None:
            from fedkd_jax.hetero.groups import group_cohort, place_cohort

            ids[r] = place_cohort(group_cohort(bits, start + r, layout, _COHORT_TAG), layout, n)
            continue
        c = sample_cohort(bits, start + r, n, cohort_size, sampling)
        if len(c) > cap:
            raise RuntimeError(f"round {start + r}: a Poisson cohort of {len(c)} exceeds the {cap} reserved positions")
        ids[r, : len(c)] = c
    rows = data.row_table(ids.reshape(-1), width=width).reshape(num_rounds, padded, -1)
    counts = np.where(ids < n, data.counts[np.minimum(ids, n - 1)], 0).astype(np.int32)
    u = union_size(num_rounds, cap, n) if stateful else 0
    if stateful:
        real = np.unique(ids[ids < n])
        union = np.full(u, n, np.int64)
        union[: len(real)] = real
        pos = np.where(ids < n, np.searchsorted(real, np.minimum(ids, n - 1)), u)
    else:
        union = np.zeros(0, np.int64)
        pos = np.zeros_like(ids)
    return Plan(int(start), ids.astype(np.int32), rows, counts, pos.astype(np.int32), union)


def padded_cohort(cohort_size: int, num_devices: int, group_size: int) -> int:
    block = num_devices * group_size
    return math.ceil(cohort_size / block) * block
