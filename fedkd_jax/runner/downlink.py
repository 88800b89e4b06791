"""What each sampled client really downloads when the server sends compressed deltas.

With downlink compression (FedKD, Wu et al. 2022) the server's model moves by
a compressed delta ``D_t`` each round, ``x_{t+1} = x_t + D_t``. The reference
code sends ``D_t`` to every client every round, because every client takes
part every round. With a sampled cohort, a client sampled in round ``t`` must
hold ``x_t`` before it trains, and what that costs depends on what it holds:

* a client that has never taken part downloads the whole model (as FedAvg's
  accounting charges every sampled client);
* a client that last took part in round ``h`` holds ``x_h`` and downloads the
  deltas it missed, ``D_h .. D_{t-1}``, or the whole model, whichever is
  smaller.

:class:`DownlinkLedger` keeps, per client, the round whose model it holds, and
the running sum of delta sizes, on the host. The per-round figure the engine
reported before (one compressed delta per sampled client, ``C * |D_t|``) is
what the reference pays with every client in every round; the run log keeps
it as ``bytes_down_per_round`` beside the real ``bytes_down``.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from fedkd_jax.engine.cohort import sample_cohort


class DownlinkLedger:
    """Downlink bytes per round of a population whose server sends compressed deltas.

    Args:
      num_clients: ``N``.
      model_bytes: bytes of the whole model a client downloads when that is cheaper
        (or when it holds no model yet).
    """

    def __init__(self, num_clients: int, model_bytes: int):
        self.model_bytes = int(model_bytes)
        self.held = np.full(int(num_clients), -1, np.int64)  # round whose model each client holds; -1: none
        self._cum = np.zeros(64, np.int64)  # _cum[t] = |D_0| + ... + |D_{t-1}|
        self.rounds = 0

    def charge(self, round_index: int, cohort: np.ndarray, delta_bytes: int) -> int:
        """Bytes the clients ``cohort`` of round ``round_index`` download to hold the round's
        model; then record that they hold it and that the round's delta is ``delta_bytes``.

        Rounds are charged in order, from 0.
        """
        t = int(round_index)
        if t != self.rounds:
            raise ValueError(f"downlink ledger: round {t} charged after {self.rounds} rounds")
        cohort = np.asarray(cohort, np.int64)
        h = self.held[cohort]
        missed = self._cum[t] - self._cum[np.maximum(h, 0)]
        cost = np.where(h < 0, self.model_bytes, np.minimum(missed, self.model_bytes))
        self.held[cohort] = t
        if t + 1 >= len(self._cum):
            self._cum = np.concatenate([self._cum, np.zeros(len(self._cum), np.int64)])
        self._cum[t + 1] = self._cum[t] + int(delta_bytes)
        self.rounds = t + 1
        return int(cost.sum())


class RunDownlink:
    """A run's ledger: its cohorts come from the run key as the host sampler draws them."""

    def __init__(self, sim: Any, bits: tuple[int, ...]):
        self.sim, self.bits = sim, bits
        self.ledger = DownlinkLedger(sim.num_clients, sim.bytes_down_per_client)

    def cohort(self, round_index: int) -> np.ndarray:
        s = self.sim
        return sample_cohort(self.bits, round_index, s.num_clients, s.cohort_size, s.sampling)

    def charge(self, round_index: int, delta_bytes: int) -> tuple[int, int]:
        """``(bytes_down, bytes_down_per_round)`` of round ``round_index``: what the
        sampled clients need, and one compressed delta per sampled client."""
        cohort = self.cohort(round_index)
        return self.ledger.charge(round_index, cohort, delta_bytes), len(cohort) * int(delta_bytes)

    def replay(self, rows: Iterable[dict[str, Any]]) -> None:
        """Rebuild the ledger from a run's logged rows (a resumed run).

        Rows written before ``bytes_down_delta`` was logged held the per-round figure
        in ``bytes_down``; their delta is recovered from it."""
        for row in rows:
            t = int(row["round"]) - 1
            delta = row.get("bytes_down_delta")
            if delta is None:
                delta = int(row.get("bytes_down") or 0) // max(len(self.cohort(t)), 1)
            self.charge(t, int(delta))
