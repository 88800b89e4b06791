"""Where the pooled examples live: on every device (the default), on the host or on disk.

A round reads its cohort's rows from the pooled examples (``x [R, D]``). On
the devices the whole pool is replicated, which is what a small dataset
wants. A pool far larger than what any dispatch reads (Stack Overflow's
135.8 million sentences) stays in host memory instead (``host``), or in a
memory-mapped pool file (``disk``, :mod:`fedkd_jax.store.pool_file`, token
ids in a narrow integer type): both are a :class:`HostPool`. Before each dispatch
the host gathers the distinct rows its cohorts read into a compact pool of
fixed capacity (``R x Cp x M`` rows for ``R`` rounds of ``Cp`` clients of at
most ``M`` rows, or the whole pool if smaller, so one compiled program per
dispatch length) and rewrites
the plan's row indices into it. The round itself is the same program, and
the results are bit-identical to the device pool's (a test checks it). The
gather (:func:`gather_rows`, which also casts the rows to float32 / int32)
runs on the prefetcher's thread during the previous dispatch
(:mod:`fedkd_jax.runner.prefetch`); the main thread only places the rows.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fedkd_jax.engine.cohort import Plan

POOLS = ("auto", "device", "host", "disk")
SWEEP_POOL = ("a sweep keeps the pooled examples on the devices (its runs share them); set data.pool=device, "
              "or run the points one by one with data.pool=host or disk")


class HostPool(NamedTuple):
    """The pooled rows in host memory (numpy arrays) or on disk (read-only memory maps)."""

    x: np.ndarray
    y: np.ndarray


class Compacted(NamedTuple):
    """One dispatch's rows gathered from a :class:`HostPool`, as the round reads them:
    ``x [K, D]`` float32, ``y [K]`` (or ``[K, L]``) int32, ``K`` the dispatch's capacity."""

    x: np.ndarray
    y: np.ndarray


def compact_rows(rows: np.ndarray, counts: np.ndarray, capacity: int | None = None):
    """The distinct real rows of ``rows [..., M]`` (row ``j`` of an entry is real when
    ``j < counts[...]``) and ``rows`` rewritten as positions among them (0 where not real).

    Returns:
      ``(used [K], remapped)``: ``used`` sorted, padded with its first row (or 0) to
      ``capacity`` when given.
    """
    rows = np.asarray(rows)
    real = np.arange(rows.shape[-1]) < np.asarray(counts)[..., None]
    used = np.unique(rows[real])
    remapped = np.where(real, np.searchsorted(used, rows), 0).astype(np.int32)
    if capacity is not None:
        if len(used) > capacity:  # cannot happen for a plan's own rows: a guard for callers
            raise ValueError(f"{len(used)} distinct rows exceed the capacity {capacity}")
        used = np.concatenate([used, np.full(capacity - len(used), used[0] if len(used) else 0, used.dtype)])
    return used, remapped


def gather_rows(pool: HostPool, plan: Plan) -> tuple[Compacted, Plan]:
    """The rows ``plan`` reads, gathered from ``pool`` and cast, and the plan's rows
    pointing into them (numpy only: safe on a background thread)."""
    # fixed capacity (one program per dispatch length): what R rounds of Cp clients of M rows can
    # read, and never more than the pool holds
    capacity = min(int(np.prod(plan.rows.shape)), len(pool.x))
    used, rows = compact_rows(plan.rows, plan.counts, capacity=capacity)
    rows_x, rows_y = pool.x[used], pool.y[used]  # sorted ids: a memory map reads them in file order
    return Compacted(np.asarray(rows_x, np.float32), np.asarray(rows_y, np.int32)), plan._replace(rows=rows)


def host_fits(pool_bytes: int, budget_gb: float | None) -> bool:
    """Whether a pool of ``pool_bytes`` (float32 / int32) fits in half the memory budget."""
    from fedkd_jax.store.base import default_budget_gb

    return pool_bytes <= (budget_gb if budget_gb is not None else default_budget_gb()) * 2**30 / 2


def choose_pool(kind: str, *, pool_bytes: int, num_devices: int, budget_gb: float | None,
                on_disk: bool = False) -> str:
    """Resolve ``auto`` against the memory budget (default: half the machine's memory), as
    ``run.client_store=auto`` does: the device pool when its replicas take at most a quarter
    of the budget; else the host when the pool fits in half of it; else disk. A pool already
    memory-mapped (``on_disk``: the builder wrote it) stays on disk."""
    if kind != "auto":
        return kind
    from fedkd_jax.store.base import default_budget_gb

    if on_disk:
        return "disk"
    budget = (budget_gb if budget_gb is not None else default_budget_gb()) * 2**30
    if pool_bytes * max(num_devices, 1) <= budget / 4:
        return "device"
    return "host" if host_fits(pool_bytes, budget_gb) else "disk"
