"""Where the pooled examples live: on every device (the default) or on the host.

A round reads its cohort's rows from the pooled examples (``x [R, D]``). On
the devices the whole pool is replicated, which is what a small dataset
wants. A pool far larger than what any dispatch reads (Stack Overflow's
135.8 million sentences) stays in host memory instead, or in a memory-mapped
file (``x`` may be an ``np.memmap``): :class:`HostPool`. Before each dispatch
the host gathers the distinct rows its cohorts read into a compact pool of
fixed capacity (``R x Cp x M`` rows for ``R`` rounds of ``Cp`` clients of at
most ``M`` rows, or the whole pool if smaller, so one compiled program per
dispatch length) and rewrites
the plan's row indices into it. The round itself is the same program, and
the results are bit-identical to the device pool's (a test checks it).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

POOLS = ("auto", "device", "host")


class HostPool(NamedTuple):
    """The pooled rows in host memory (numpy arrays or memory maps)."""

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


def choose_pool(kind: str, *, pool_bytes: int, num_devices: int, budget_gb: float | None) -> str:
    """Resolve ``auto``: the device pool unless its replicas would take more than a
    quarter of the memory budget (default: half the machine's memory)."""
    if kind != "auto":
        return kind
    from fedkd_jax.store.base import default_budget_gb

    budget = (budget_gb if budget_gb is not None else default_budget_gb()) * 2**30
    return "device" if pool_bytes * max(num_devices, 1) <= budget / 4 else "host"
