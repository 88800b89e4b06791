"""A run's evaluation: the global model, and personal models at population scale.

The global model is evaluated on the global test set and on the local tests
of the evaluated clients (``run.eval_clients``: all, or a fixed seeded sample).
Personal models are evaluated on a fixed seeded sub-sample of those
(``run.eval_personal_clients``, 1,000 by default: their mean and percentiles
need no more, and the first evaluation initialises each sampled teacher).

Personal models (FedKD's private teachers) are per-client state, so a large
population cannot be evaluated by gathering every one of them. Two facts keep
the cost proportional to what changed since the run started:

* A client that never trained holds its seed-defined initial model, a pure
  function of ``(seed, client)``: its accuracy never changes. It is computed
  once, initialised and evaluated in one compiled step on the device (no
  store read, no host copy), in fixed blocks, and kept for later evaluations
  (recomputed identically after a resume).
* Only clients the store holds (``touched``) are gathered, in blocks of at
  most ``personal_block``, so memory is bounded by one block.

Blocks are padded to a power of two (a handful of compiled shapes per run).

Clients without a local test split are never gathered.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from fedkd_jax.engine import Simulator, eval_clients, make_evaluator, make_personal_evaluator, summarize_clients
from fedkd_jax.engine.evaluation import EvalData, personal_accuracy
from fedkd_jax.engine.placement import put_replicated


def _blocks(ids: np.ndarray, size: int) -> list[np.ndarray]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def _padded(ids: np.ndarray, block: int) -> np.ndarray:
    """``ids`` padded (with its first id, whose extra results are dropped) to a power of
    two of at least 32 and at most ``block``: a handful of compiled shapes per run."""
    size = min(block, max(32, 1 << (len(ids) - 1).bit_length()))
    return np.concatenate([ids, np.full(size - len(ids), ids[0], ids.dtype)])


class PersonalEvaluation:
    """Accuracy of each tested client's personal model on its local test split."""

    def __init__(self, sim: Simulator, ids: np.ndarray, base: EvalData, *, block: int = 1024, host_pool=None,
                 algorithm=None):
        """``algorithm``: whose personal model to evaluate (default the simulator's; an
        architecture group's view of it, :mod:`fedkd_jax.hetero`)."""
        self.sim, self.block, self.base, self.host_pool = sim, int(block), base, host_pool
        data = sim.data
        self.ids = np.asarray(ids)[data.test_counts[np.asarray(ids)] > 0]
        self.initial = np.full(len(self.ids), np.nan)  # accuracy of the initial model, once computed
        self.known = np.zeros(len(self.ids), bool)
        alg = self.algorithm = sim.algorithm if algorithm is None else algorithm
        ignore = tuple(data.accuracy_ignore)
        self.evaluate = make_personal_evaluator(alg.personal_model.apply, ignore=ignore)
        apply = alg.personal_model.apply

        @jax.jit
        def initial_accuracy(key, ids, ev):
            return personal_accuracy(apply, ev, alg.personal_params(sim.init_clients(key, ids)), ignore=ignore)

        self.initial_accuracy = initial_accuracy

    def _ev(self, ids: np.ndarray) -> EvalData:
        """The local tests of ``ids``, sharing the placed pool and global test set (a host
        pool: the block's own test rows, placed)."""
        if self.host_pool is not None:
            placed = self.sim.eval_data(ids, pool=self.host_pool)
            return self.base._replace(pool_x=placed.pool_x, pool_y=placed.pool_y, test_rows=placed.test_rows,
                                      test_counts=placed.test_counts)
        rows = self.sim.data.row_table(ids, test=True)
        counts = self.sim.data.test_counts[ids].astype(np.int32)
        t = put_replicated((rows, counts), self.sim.replicated_sharding)
        return self.base._replace(test_rows=t[0], test_counts=t[1])

    def __call__(self, state: Any) -> np.ndarray:
        from fedkd_jax.engine import fetch

        sim = self.sim
        touched = sim.store.touched[self.ids] if sim.store is not None else np.ones(len(self.ids), bool)
        need = np.flatnonzero(~touched & ~self.known)
        for pos in _blocks(need, self.block):
            ids = _padded(self.ids[pos], self.block)
            self.initial[pos] = fetch(self.initial_accuracy(state.key, ids, self._ev(ids)))[: len(pos)]
        self.known[need] = True
        acc = self.initial.copy()
        for pos in _blocks(np.flatnonzero(touched), self.block):
            ids = _padded(self.ids[pos], self.block)
            params = self.algorithm.personal_params(sim.client_states(state.key, ids))
            acc[pos] = fetch(self.evaluate(params, self._ev(ids)))[: len(pos)]
        return acc


def make_evaluate(sim: Simulator, ev_ids: np.ndarray, *, personal_block: int = 1024, pool: Any = None,
                  personal_clients: int | None = None, seed: int = 0,
                  group_names: list[str] | None = None) -> Callable[[Any], dict[str, Any]]:
    """``(state) -> dict`` of global metrics, the per-client accuracy summary and,
    for algorithms with personal models (FedKD teachers), their summary, on the
    clients ``ev_ids`` (see the module docstring). Personal models are evaluated
    on a fixed seeded sub-sample of ``personal_clients`` of them (``None``: all).
    ``pool``: the run's placed pool (placed again if not given)."""
    from fedkd_jax.engine import fetch

    algorithm = sim.algorithm
    ev_data = sim.eval_data(ev_ids, pool=pool)
    if algorithm.groups:  # architecture groups: per-group personal models (and the global model, if any)
        from fedkd_jax.hetero.evaluate import make_group_evaluate
        from fedkd_jax.engine.pool import HostPool

        return make_group_evaluate(sim, ev_ids, ev_data, personal_block=personal_block, seed=seed,
                                   personal_clients=personal_clients, names=group_names, pool=pool,
                                   host_pool=pool if isinstance(pool, HostPool) else None)
    global_eval = make_evaluator(algorithm.model.apply, ignore=tuple(sim.data.accuracy_ignore))
    personal = None
    if algorithm.personal_model is not None:
        ids = np.asarray(ev_ids)[eval_clients(len(ev_ids), personal_clients, seed)]  # nested in ev_ids
        from fedkd_jax.engine.pool import HostPool

        personal = PersonalEvaluation(sim, ids, ev_data, block=personal_block,
                                      host_pool=pool if isinstance(pool, HostPool) else None)
        personal = personal if len(personal.ids) else None

    def evaluate(state) -> dict[str, Any]:
        ev = {k: fetch(v) for k, v in global_eval(algorithm.model_params(state.server), ev_data).items()}
        out = {k: float(v) for k, v in ev.items() if np.ndim(v) == 0}
        out.update(summarize_clients(ev["client_accuracy"]))
        if personal is not None:
            out.update(summarize_clients(personal(state), prefix="teacher_acc"))
        return out

    return evaluate
