"""Prepare the next dispatch on a background thread while the current one computes.

Cohorts are a function of ``(seed, round)``, so the next dispatch's plan
(cohorts, row tables, union of clients) and its client states can be read
from a host or disk store ahead of time. The catch is staleness: a client in
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


class Prefetcher:
    """One look-ahead dispatch for ``sim`` (a :class:`~fedkd_jax.engine.Simulator`)."""

    def __init__(self, sim, key_bits: tuple[int, ...]):
        self.sim = sim
        self.bits = key_bits
        # Device stores gather with a device program: keep that on the main thread.
        self.host_store = sim.store is not None and sim.store.kind in ("host", "disk")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedkd-prefetch")
        self._next: tuple[int, int, Future] | None = None

    def _prepare(self, start: int, num_rounds: int) -> tuple[Plan, Any, np.ndarray | None]:
        plan = self.sim.plan(self.bits, start, num_rounds)
        if self.host_store:
            states, fresh = self.sim.store.gather(plan.union)
            return plan, states, fresh
        return plan, None, None

    def request(self, start: int, num_rounds: int) -> None:
        """Start preparing the dispatch of ``num_rounds`` rounds from ``start``."""
        self._next = (start, num_rounds, self._pool.submit(self._prepare, start, num_rounds))

    def take(self, start: int, num_rounds: int, just_written: np.ndarray | None, key: jax.Array) -> tuple[Plan, Any]:
        """The plan and placed client states for this dispatch.

        ``just_written``: union of the dispatch that finished since the request
        (its clients' prefetched states are re-read). ``key``: the run's key
        (clients never stored start from their seed-defined state).
        """
        if self._next is not None and self._next[:2] == (start, num_rounds):
            plan, states, fresh = self._next[2].result()
        else:
            plan, states, fresh = self._prepare(start, num_rounds)
        self._next = None
        if self.sim.store is None:
            return plan, ()
        if states is None:
            return plan, self.sim.gather(plan, key)
        if just_written is not None and len(just_written):
            stale = np.flatnonzero(np.isin(plan.union, just_written) & (plan.union < self.sim.num_clients))
            if len(stale):
                again, again_fresh = self.sim.store.gather(plan.union[stale])
                for leaf, new in zip(jax.tree.leaves(states), jax.tree.leaves(again)):
                    leaf[stale] = new
                fresh = fresh.copy()
                fresh[stale] = again_fresh
        return plan, self.sim.complete(key, plan.union, states, fresh)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
