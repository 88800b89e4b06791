"""Who is a member: the audit's target rows and shadow pools, chosen from a population.

A membership audit is only as true as its two target sets. Members must be
rows the audited model really trained on; non-members must be rows it never
saw, drawn from the *same distribution* as the members, or the attack
measures a distribution shift rather than membership (under label skew a
client's rows and the global test set differ in their labels, and any model
fits its own labels better). The shadow models of offline LiRA must never see
a target.

* **Shared model.** Members: training rows of the clients sampled in at
  least one of the rounds run (:func:`sampled_clients`, from the run's own
  cohort plan, not a re-implementation of sampling); rows of clients that
  were never sampled are not members. Non-members: the held-out rows (local
  test splits) of those same sampled clients, which follow the members'
  client mix; if the clients hold none (``data.test_fraction=0``), rows of
  the global test set, and the report says which was used.
* **Private model of one client** (FedKD's teacher). Members: that client's
  training rows; non-members: that client's own held-out rows, never the
  global test set. A client without held-out rows cannot be audited this
  way (:class:`NoHeldOutRows`).
* **Shadow pool.** Every row of the population (all clients' splits, the
  global test set) except the targets; for a private model, except every
  row of that client (members and held-out rows alike).

Rows are compared by content (their feature bytes), not by pool index: the
same example can sit at several pool indices (resampled IID clients, a
global test set built from the clients' local tests, a copied layout), and
a non-member that equals a trained row is a member in all but name.

Limitation: a sampled client whose update was dropped (a FedAvg straggler,
a secure-aggregation dropout) still counts as a member; this can only dilute
the measured leakage.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "NoHeldOutRows",
    "Targets",
    "Universe",
    "content_ids",
    "private_client",
    "private_targets",
    "sampled_clients",
    "shared_targets",
    "universe",
]


class NoHeldOutRows(ValueError):
    """A private model cannot be audited: its client holds no held-out rows."""


class Targets(NamedTuple):
    """Rows of one audit, as ``(x, y)`` pairs (numpy).

    Attributes:
      members, nonmembers: the scored rows.
      pool: reference rows for the shadow models, holding none of the targets
        (nor, for a private model, any other row of its client).
      nonmember_source: ``"held-out"`` (the clients' local test splits) or
        ``"global test"``.
    """

    members: tuple[np.ndarray, np.ndarray]
    nonmembers: tuple[np.ndarray, np.ndarray]
    pool: tuple[np.ndarray, np.ndarray]
    nonmember_source: str


def sampled_clients(sim, key, rounds: int, *, max_rows_per_plan: int = 1 << 22) -> np.ndarray:
    """Sorted ids of the clients sampled in at least one of rounds ``0 .. rounds - 1``.

    Cohorts are a pure function of the run's key and the round, so the run's
    own plan (``sim.plan``, :func:`fedkd_jax.engine.cohort.make_plan`) gives
    them back exactly, whatever chunks the run was dispatched in.

    Args:
      sim: the run's :class:`~fedkd_jax.engine.Simulator` (its cohort size and sampling).
      key: the run's base key, or its bits.
      rounds: rounds completed.
      max_rows_per_plan: bound on a plan's row table (rounds x cohort x largest client).
    """
    n = sim.data.num_clients
    plan0 = sim.plan(key, 0, 1) if rounds > 0 else None
    if plan0 is None:
        return np.zeros(0, np.int64)
    per_round = max(1, int(np.prod(plan0.rows.shape[1:])))
    chunk = max(1, min(rounds, max_rows_per_plan // per_round))
    seen = np.zeros(n, bool)
    for start in range(0, rounds, chunk):
        ids = sim.plan(key, start, min(chunk, rounds - start)).ids
        seen[ids[ids < n]] = True
    return np.flatnonzero(seen)


def content_ids(*arrays: np.ndarray) -> list[np.ndarray]:
    """One integer per distinct row content over all ``arrays`` (float32 rows compared byte for byte).

    Returns one ``[len(a)]`` int64 array per input; equal rows get equal ids.
    """
    flat = [np.asarray(a, np.float32).reshape(len(a), -1) for a in arrays]
    allx = np.ascontiguousarray(np.concatenate(flat))
    void = allx.view(np.dtype((np.void, allx.dtype.itemsize * allx.shape[1]))).ravel()
    _, inv = np.unique(void, return_inverse=True)
    return np.split(inv.ravel().astype(np.int64), np.cumsum([len(a) for a in flat])[:-1])


class Universe(NamedTuple):
    """Every row of a population with its content id: the pool rows first, then the global test rows
    (build it once with :func:`universe` and pass it to both target functions)."""

    x: np.ndarray
    y: np.ndarray
    cid: np.ndarray  # [R + G] content ids
    n_pool: int

    def rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.x[idx], self.y[idx]

    def global_index(self, g: np.ndarray) -> np.ndarray:
        return self.n_pool + np.asarray(g, np.int64)

    def distinct(self, idx: np.ndarray) -> np.ndarray:
        """``idx`` with one index kept per distinct content (the first), sorted."""
        idx = np.asarray(idx, np.int64)
        _, first = np.unique(self.cid[idx], return_index=True)
        return np.sort(idx[first])

    def without(self, idx: np.ndarray, excluded_cids: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        return idx[~np.isin(self.cid[idx], excluded_cids)]

    def pool_excluding(self, excluded_cids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = self.distinct(self.without(np.arange(len(self.cid)), excluded_cids))
        return self.rows(keep)


def universe(data) -> Universe:
    """The rows of ``data`` (a :class:`~fedkd_jax.data.FederatedData`) with their content ids."""
    x = np.concatenate([np.asarray(data.x, np.float32).reshape(len(data.x), -1),
                        np.asarray(data.global_x, np.float32).reshape(len(data.global_x), -1)])
    y = np.concatenate([np.asarray(data.y), np.asarray(data.global_y)]).astype(np.int32)
    cid = np.concatenate(content_ids(x))
    return Universe(x, y, cid, len(data.x))


def _rows_of(data, clients: np.ndarray, *, test: bool) -> np.ndarray:
    """Pool rows of the training (or held-out) splits of ``clients``."""
    rows, off = (data.test_rows, data.test_offsets) if test else (data.train_rows, data.train_offsets)
    chosen = np.zeros(data.num_clients, bool)
    chosen[np.asarray(clients, np.int64)] = True
    return np.asarray(rows)[np.repeat(chosen, np.diff(off))].astype(np.int64)


def _pick(rng: np.random.Generator, idx: np.ndarray, k: int) -> np.ndarray:
    return np.sort(rng.choice(idx, k, replace=False)) if k < len(idx) else idx


def shared_targets(data, sampled: np.ndarray, *, members: int, rng: np.random.Generator,
                   rows: Universe | None = None) -> Targets:
    """Targets of a model trained on every ``sampled`` client's rows (see the module docstring).

    ``members``: at most this many rows of each side (drawn uniformly); ``rows``:
    the population's :func:`universe`, when already built.

    Raises:
      ValueError: no client was sampled, or no row qualifies as a non-member.
    """
    u = universe(data) if rows is None else rows
    sampled = np.asarray(sampled, np.int64)
    if len(sampled) == 0:
        raise ValueError("no client was sampled in the rounds run: the model trained on nothing")
    trained = u.distinct(_rows_of(data, sampled, test=False))
    trained_cids = u.cid[trained]
    source = "held-out"
    non = u.distinct(u.without(_rows_of(data, sampled, test=True), trained_cids))
    if len(non) == 0:
        source = "global test"
        non = u.distinct(u.without(u.global_index(np.arange(len(data.global_y))), trained_cids))
    if len(non) == 0:
        raise ValueError("no row qualifies as a non-member: the sampled clients hold no held-out rows and every "
                         "global test row equals a trained row")
    mem, nm = _pick(rng, trained, min(members, len(trained))), _pick(rng, non, min(members, len(non)))
    pool = u.pool_excluding(np.concatenate([u.cid[mem], u.cid[nm]]))
    return Targets(u.rows(mem), u.rows(nm), pool, source)


def private_targets(data, client: int, *, members: int, rng: np.random.Generator,
                    rows: Universe | None = None) -> Targets:
    """Targets of a model trained only on client ``client``'s rows (see the module docstring).

    ``members``: at most this many rows of each side; ``rows``: as for :func:`shared_targets`.

    Raises:
      NoHeldOutRows: the client holds no held-out row that differs from its training rows.
    """
    u = universe(data) if rows is None else rows
    own = u.distinct(_rows_of(data, [client], test=False))
    held = u.distinct(u.without(_rows_of(data, [client], test=True), u.cid[own]))
    if len(held) == 0:
        raise NoHeldOutRows(f"client {client} has no held-out rows (its local test split is empty, e.g. "
                            "data.test_fraction=0), so its private model has no non-members from its own "
                            "distribution; rerun with data.test_fraction > 0 to audit it")
    mem, nm = _pick(rng, own, min(members, len(own))), _pick(rng, held, min(members, len(held)))
    every_row_of_client = np.concatenate([u.cid[own], u.cid[held]])
    return Targets(u.rows(mem), u.rows(nm), u.pool_excluding(every_row_of_client), "held-out")


def private_client(data, sampled: np.ndarray) -> int | None:
    """The client whose private model to audit: of the sampled clients with held-out rows, the one
    with the most held-out rows (then the most training rows, then the lowest id); ``None`` if none."""
    sampled = np.asarray(sampled, np.int64)
    if len(sampled) == 0:
        return None
    held, own = data.test_counts[sampled], data.counts[sampled]
    ok = held > 0
    if not ok.any():
        return None
    order = np.lexsort((sampled[ok], -own[ok], -held[ok]))
    return int(sampled[ok][order[0]])
