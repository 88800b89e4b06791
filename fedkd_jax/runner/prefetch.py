"""Prepare the next dispatch on a background thread while the current one computes.

Cohorts are a function of ``(seed, round)``, so the next dispatch's plan
(cohorts, row tables, union of clients), its client states from a host or
disk store and, with ``data.pool=host`` or ``disk``, the pooled rows its
cohorts read (:func:`~fedkd_jax.engine.pool.gather_rows`) can all be
prepared ahead of time; the main thread then only places them on the
devices. The pooled rows never change, so they cannot be stale; client
states can: a client in
both the current and the next dispatch is read before the current dispatch
writes its new state back. :meth:`Prefetcher.take` therefore re-reads exactly
those clients after the write-back, so a prefetched state is never stale.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from fedkd_jax.engine.cohort import Plan
from fedkd_jax.engine.pool import HostPool, gather_rows


class Prefetcher:
    """One look-ahead dispatch for ``sim`` (a :class:`~fedkd_jax.engine.Simulator`);
    ``pool``: the run's pool from ``sim.put_data()`` (a host pool's rows are gathered here)."""

    def __init__(self, sim, key_bits: tuple[int, ...], pool=None):
        self.sim = sim
        self.bits = key_bits
        self.given = pool
        self.host_pool = pool if isinstance(pool, HostPool) else None
        # Device stores gather with a device program: keep that on the main thread.
        self.host_store = sim.store is not None and sim.store.kind in ("host", "disk")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedkd-prefetch")
        self._next: tuple[int, int, Future] | None = None

    def _prepare(self, start: int, num_rounds: int) -> tuple[Plan, Any, np.ndarray | None, Any]:
        plan = self.sim.plan(self.bits, start, num_rounds)
        rows = None
        if self.host_pool is not None:
            rows, plan = gather_rows(self.host_pool, plan)
        if self.host_store:
            states, fresh = self.sim.store.gather(plan.union)
            return plan, states, fresh, rows
        return plan, None, None, rows

    def request(self, start: int, num_rounds: int) -> None:
        """Start preparing the dispatch of ``num_rounds`` rounds from ``start``."""
        self._next = (start, num_rounds, self._pool.submit(self._prepare, start, num_rounds))

    def take(self, start: int, num_rounds: int, just_written: np.ndarray | None, key: jax.Array
             ) -> tuple[Plan, Any, Any]:
        """The plan, the placed client states and the pool for this dispatch.

        ``just_written``: union of the dispatch that finished since the request
        (its clients' prefetched states are re-read). ``key``: the run's key
        (clients never stored start from their seed-defined state).

        Returns:
          ``(plan, states, pool)``: ``pool`` is the dispatch's gathered rows
          (:class:`~fedkd_jax.engine.pool.Compacted`, ``plan`` pointing into them)
          for a host or disk pool, else the pool given at construction.
        """
        if self._next is not None and self._next[:2] == (start, num_rounds):
            plan, states, fresh, rows = self._next[2].result()
        else:
            plan, states, fresh, rows = self._prepare(start, num_rounds)
        self._next = None
        return plan, self._states(plan, states, fresh, just_written, key), self.given if rows is None else rows

    def _states(self, plan: Plan, states: Any, fresh: np.ndarray | None, just_written: np.ndarray | None,
                key: jax.Array) -> Any:
        if self.sim.store is None:
            return ()
        if states is None:
            return self.sim.gather(plan, key)
        if just_written is not None and len(just_written):
            stale = np.flatnonzero(np.isin(plan.union, just_written) & (plan.union < self.sim.num_clients))
            if len(stale):
                again, again_fresh = self.sim.store.gather(plan.union[stale])
                for leaf, new in zip(jax.tree.leaves(states), jax.tree.leaves(again)):
                    leaf[stale] = new
                fresh = fresh.copy()
                fresh[stale] = again_fresh
        return self.sim.complete(key, plan.union, states, fresh)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
