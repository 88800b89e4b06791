"""Runs of one static configuration through one compiled program (a runs axis).

Shape key: ``K`` runs in a wave, ``R`` rounds per dispatch, ``Cp`` padded
cohort, ``M`` widest client over the runs, ``U`` union of a dispatch's clients.

Each run keeps its own :class:`~fedkd_jax.engine.Simulator` for the host
side (its data partition, cohorts, client store, evaluation). The compiled
program is the first run's round, ``vmap``-ed over a leading runs axis of
the state, the cohort plan, the client states, the server data and the
traced hyperparameters (:mod:`fedkd_jax.sweeps.grid`); the runs axis is
sharded over a ``runs`` mesh axis (``vmap(..., spmd_axis_name="runs")``), so
on a CPU each core trains its own run and no collective crosses runs.

Runs go through in *waves* of one run per device: a wave is one dispatch,
and every wave of a group reuses the same compiled program. One run per
device is also what XLA:CPU runs fastest (batched tiny matmuls are slower
than plain ones, see the README's "Groups"), and it avoids a deadlock seen
with jaxlib 0.10 when two devices each run a *batched* LAPACK ``eigh`` (the
SVD compressor) at once. The waves bound memory too: only one wave's client
states are on the devices at a time.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedkd_jax.errors import ConfigError
from fedkd_jax.engine import Simulator
from fedkd_jax.engine.cohort import Plan
from fedkd_jax.engine.mesh import CLIENTS
from fedkd_jax.engine.pool import SWEEP_POOL
from fedkd_jax.privacy.dp import refresh_noise_seed

RUNS = "runs"


def sweep_mesh(num_runs: int, devices: Sequence[jax.Device] | None = None, runs_per_device: int = 1) -> Mesh:
    """A ``(runs, clients)`` mesh: all devices on the runs axis when there are enough
    runs (``runs_per_device`` runs batched on each position of the runs axis)."""
    devs = list(devices if devices is not None else jax.devices())
    d = len(devs)
    positions = math.ceil(num_runs / runs_per_device)
    r = d if positions >= d else max(k for k in range(1, d + 1) if d % k == 0 and k <= positions)
    return Mesh(np.array(devs).reshape(r, d // r), (RUNS, CLIENTS))


def auto_runs_per_device(num_runs: int, devices: int, per_run_bytes: int, budget_bytes: int | None) -> int:
    """``run.runs_per_device=auto``: 1 on CPU (each core trains one run; batched tiny
    matmuls are slower there), else as many of the group's runs as fit in half the
    device's memory (``per_run_bytes`` estimated by the caller), so an accelerator
    sees the runs as one wide program and the runs axis is chunked only when memory
    requires it."""
    if jax.default_backend() == "cpu":
        return 1
    want = max(1, math.ceil(num_runs / devices))
    if budget_bytes:
        want = min(want, max(1, int(0.5 * budget_bytes // max(per_run_bytes, 1))))
    return want


def per_run_bytes(sim: Simulator, state: Any) -> int:
    """A rough device footprint of one run in a wave: its state, its dispatch's client
    states and cohort rows, and the cohort's updates in flight (x4 for temporaries)."""
    nbytes = lambda t: sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(t))  # noqa: E731
    state_b = nbytes(state.server)
    union_b = sim.union_size(1) * nbytes(sim.client_template) if sim.stateful else 0
    rows_b = sim.padded_cohort * sim.max_examples * int(np.prod(sim.data.x.shape[1:])) * 4
    return 4 * (state_b + union_b + rows_b + sim.group_size * state_b)


def device_memory_bytes() -> int | None:
    """The first device's memory limit, where the backend reports one (GPU/TPU)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    return stats.get("bytes_limit")


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


class BatchedRuns:
    """Dispatches rounds of ``sims`` (one per run, same static config) as one program.

    Args:
      sims: the runs' simulators, built on ``mesh`` with equal shapes and a
        ``build`` function for traced hyperparameters.
      hparams: per run, its traced settings (``{config key: value}``).
      mesh: the ``(runs, clients)`` mesh; ``K`` is padded to a multiple of its runs axis.
    """

    def __init__(self, sims: Sequence[Simulator], hparams: Sequence[dict[str, float]], mesh: Mesh,
                 programs: dict | None = None):
        self.sims = list(sims)
        self.mesh = mesh
        self.k = len(sims)
        r = mesh.shape[RUNS]
        self.padded = math.ceil(self.k / r) * r
        pad = [self.k - 1] * (self.padded - self.k)  # repeat the last run; its results are dropped
        self.order = list(range(self.k)) + pad
        self.hp = {key: np.asarray([hparams[i][key] for i in self.order], np.float32) for key in hparams[0]}
        self.stateful = self.sims[0].stateful
        sdata = [self.sims[i].algorithm.server_data for i in self.order]
        self.by_run = NamedSharding(mesh, P(RUNS))
        self.by_run_client = NamedSharding(mesh, P(RUNS, None, CLIENTS))
        self.replicated = NamedSharding(mesh, P())
        self.sdata = jax.device_put(_stack(sdata), self.by_run) if jax.tree.leaves(sdata[0]) else ()
        self._sdata_axes = 0 if jax.tree.leaves(self.sdata) else None
        self._programs: dict[int, Any] = {} if programs is None else programs  # shared by a group's waves
        self.pool = self.sims[0].put_data()
        from fedkd_jax.engine.pool import HostPool

        if isinstance(self.pool, HostPool):
            raise ConfigError("data.pool", SWEEP_POOL)

    @property
    def compiled_programs(self) -> int:
        """Round programs compiled for this batch (one per distinct dispatch length)."""
        return sum(p._cache_size() for p in self._programs.values())  # noqa: SLF001

    def program(self, num_rounds: int):
        if num_rounds not in self._programs:
            s0 = self.sims[0]
            f = jax.vmap(partial(s0._rounds, num_rounds),  # noqa: SLF001 - the engine's own round
                         in_axes=(0, None, 0, 0, 0, 0, 0, self._sdata_axes, 0), spmd_axis_name=RUNS)
            self._programs[num_rounds] = jax.jit(f)
        return self._programs[num_rounds]

    def place_state(self, states: Sequence[Any]) -> Any:
        """Stack per-run host states ``[K, ...]`` (padded) and shard them over the runs axis."""
        host = [jax.device_get(states[i]) for i in self.order]
        keys = [h.key for h in host]
        stacked = _stack([h.replace(key=jax.random.key_data(k)) for h, k in zip(host, keys)])
        impl = jax.random.key_impl(keys[0])
        placed = jax.device_put(stacked, self.by_run)
        return placed.replace(key=jax.random.wrap_key_data(placed.key, impl=impl))

    def unstack(self, state: Any) -> list[Any]:
        host = jax.device_get(state.replace(key=jax.random.key_data(state.key)))
        impl = jax.random.key_impl(state.key)
        out = []
        for i in range(self.k):
            one = jax.tree.map(lambda a: a[i], host)
            out.append(one.replace(key=jax.random.wrap_key_data(jnp.asarray(one.key), impl=impl)))
        return out

    def dispatch(self, state: Any, keys: Sequence[jax.Array], start: int, num_rounds: int):
        """Rounds ``start .. start + num_rounds - 1`` of every run.

        ``state``: the stacked, placed state; ``keys``: each run's base key (host).
        Returns ``(state, metrics)`` with metrics ``[K, R, ...]`` (host, padding dropped).
        """
        plans: list[Plan] = [self.sims[i].plan(keys[i], start, num_rounds) for i in range(self.k)]
        plans += [plans[-1]] * (self.padded - self.k)
        stack = lambda name: np.stack([getattr(p, name) for p in plans])  # noqa: E731
        ids, rows, counts, pos = (jax.device_put(stack(n), self.by_run_client) for n in ("ids", "rows", "counts", "pos"))
        if self.stateful:
            unions = []
            for i in self.order:
                sim, plan = self.sims[i], plans[i]
                states, fresh = sim.store.gather(plan.union)
                states = jax.tree.map(lambda a: np.array(jax.device_get(a)), states)  # writable host copies
                leaves = jax.tree.leaves(states)
                if fresh.any():
                    for leaf, init in zip(leaves, sim.initial_states(keys[i], plan.union[fresh])):
                        leaf[fresh] = init
                unions.append(states)
            union = jax.device_put(_stack(unions), self.by_run)
            for i in range(self.k):
                self.sims[i].store.bind(_bits(keys[i]), start)
        else:
            union = ()
        hp = jax.device_put(self.hp, self.by_run)
        state = state.replace(agg=refresh_noise_seed(state.agg))  # privacy.secure_noise: fresh OS entropy
        out_state, out_union, metrics = jax.block_until_ready(
            self.program(num_rounds)(state, self.pool, ids, rows, counts, pos, union, self.sdata, hp))
        # the same placement as the inputs, so the next dispatch hits the compiled program's cache
        out_state = jax.device_put(out_state, self.by_run)
        if self.stateful:
            host_union = jax.device_get(out_union)
            for i in range(self.k):
                self.sims[i].store.scatter(plans[i].union, jax.tree.map(lambda a: a[i], host_union))
                self.sims[i].store.round = start + num_rounds
        m = jax.device_get(metrics)
        return out_state, [{k: np.asarray(v[i]) for k, v in m.items()} for i in range(self.k)]


def _bits(key) -> tuple[int, ...]:
    from fedkd_jax.engine.cohort import key_bits

    return key_bits(key)
