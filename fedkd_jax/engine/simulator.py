"""The round builder: one ``jax.jit`` program per dispatch of federated rounds.

Shape key: ``N`` population size, ``C`` cohort size, ``Cp`` cohort padded to a
multiple of ``devices * group_size``, ``M`` largest client, ``U`` clients in
the dispatch's union of cohorts, ``R`` rounds per dispatch.

A dispatch: the host samples the cohorts of ``R`` rounds
(:mod:`fedkd_jax.engine.cohort`), looks up their rows, and gathers the union
of their per-client states from the client store (:mod:`fedkd_jax.store`).
Then one compiled program runs, for each round (``lax.scan``)::

    key(seed, round) -> straggler draw
      -> shard_map over the 'clients' mesh axis, per device:
           lax.scan over its Cp/devices clients in groups of ``group_size``
           (vmap inside a group): gather the client's rows from the pool
           and its state from the union, run ``client_update``, compress,
           accumulate weight * update, weight and weight * metrics
         -> one psum of the flattened sums (the only collective)
      -> mean update -> ``server_update`` (skipped when no client contributed)
      -> optional downlink compression of the global update
      -> write the cohort's new states into the union.

The host then scatters the union back into the store. The population never
lives inside the simulation state, and only the cohort's rows are gathered.

Why groups and a scan rather than one vmap over the cohort: on CPU a client's
weights then stay in cache for all its local steps, and XLA:CPU runs batched
dots of tiny per-client matrices slower than plain ones. ``group_size`` is a
tuned setting (1 is best on CPU; larger groups feed accelerators).
"""

from __future__ import annotations

from functools import cached_property, partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fedkd_jax._devices import limit_blas_threads
from fedkd_jax.algorithms.base import ClientData, FederatedAlgorithm
from fedkd_jax.algorithms.local import tree_where
from fedkd_jax.aggregation import Aggregator, ClientIn, ServerIn, chain, compress, mean
from fedkd_jax.compression import Compressor
from fedkd_jax.data import FederatedData
from fedkd_jax.engine.client_init import fill_fresh, init_program, initial_states
from fedkd_jax.engine.cohort import (
    Plan,
    key_bits,
    make_plan,
    padded_cohort,
    poisson_capacity,
    straggler_count,
    straggler_flags,
    union_size,
)
from fedkd_jax.engine.mesh import CLIENTS, client_mesh
from fedkd_jax.engine.placement import put_replicated, put_sharded
from fedkd_jax.engine.pool import Compacted, HostPool, gather_rows
from fedkd_jax.engine.state import (  # noqa: F401 - re-exported
    _AGGREGATE,
    _COMPRESS,
    _DOWNLINK,
    _SERVER,
    _SERVER_INIT,
    PoolData,
    SimState,
    client_init_key,
    client_key,
    round_key,
)
from fedkd_jax.errors import ConfigError
from fedkd_jax.privacy.dp import refresh_noise_seed
from fedkd_jax.store import ClientStore, make_store
from fedkd_jax.tree_util import tree_bytes

STRAGGLER_MODES = ("fixed", "bernoulli")


@jax.jit
def _first_round(metrics):
    return jax.tree.map(lambda a: a[0], metrics)


class Simulator:
    """Compiles and runs federated rounds of one algorithm on one population.

    Args:
      algorithm: a :class:`FederatedAlgorithm`.
      data: the population (its row tables stay on the host; place the pooled
        rows with :meth:`put_data`).
      cohort_size: ``C`` clients per round, sampled without replacement.
      mesh: a 1-D mesh with axis ``clients`` (default: all devices).
      group_size: clients vmapped together inside a device's scan.
      compressor: optional compression of every client's uploaded update; the
        server aggregates the decompressed updates and ``bytes_up`` counts the
        compressed payloads.
      downlink: optional compression of the server's global update on its way
        down (FedKD, Wu et al. 2022). The server's model becomes the previous
        model plus the *decompressed* update, i.e. exactly what every client
        holding the previous global model reconstructs; the metric
        ``bytes_down_client`` is the size of that compressed delta (the run log
        charges each sampled client the deltas it missed or the whole model,
        :mod:`fedkd_jax.runner.downlink`).
      straggler_fraction: share of each cohort that straggles (see
        :func:`~fedkd_jax.engine.cohort.straggler_flags`); only for algorithms
        with ``supports_stragglers``.
      straggler_mode: ``fixed`` (exact count, FedProx) or ``bernoulli``.
      weighting: ``examples`` averages updates with the algorithms' weights
        (example counts, McMahan et al. 2017); ``uniform`` gives every
        contributing client weight 1 (FedKD's reference code).
      aggregator: the chain between a client's update and the server's step
        (:mod:`fedkd_jax.aggregation`); default: ``compressor`` (if any), then
        the ``weighting`` mean. Give it to add privacy or secure aggregation.
      sampling: ``fixed`` (``C`` without replacement) or ``poisson`` (each client
        with probability ``C / N``; the cohort is padded to a fixed capacity).
      store: where per-client states live: ``device``, ``host``, ``disk`` or a
        :class:`~fedkd_jax.store.ClientStore` (stateless algorithms need none).
      store_dir: directory of the ``disk`` store.
      max_examples: pad every client to this many rows (default: the largest
        client); a batched sweep pads all its runs to one width.
      pool: where the pooled rows live: ``device`` (replicated), ``host`` or ``disk``
        (memory-mapped; rows not already in a pool file are written to a temporary
        one under ``pool_dir``), see :mod:`fedkd_jax.engine.pool`.
      build: ``hp -> (algorithm, aggregator, downlink, (straggler_fraction, straggler_count))``
        from traced hyperparameters, for batched sweeps (:mod:`fedkd_jax.sweeps`);
        the count is the host's :func:`~fedkd_jax.engine.cohort.straggler_count`
        of the run, traced as an integer.
      groups: ``[N]`` architecture group of each client (:mod:`fedkd_jax.hetero`):
        stratified cohorts, and group ``g``'s clients run ``algorithm.group_updates[g]``
        as their own batch inside the same program (every group's client update
        returns the same upload structure, so one all-reduce sums them all).
    """

    def __init__(
        self,
        algorithm: FederatedAlgorithm,
        data: FederatedData,
        *,
        cohort_size: int,
        mesh: jax.sharding.Mesh | None = None,
        group_size: int = 1,
        compressor: Compressor | None = None,
        downlink: Compressor | None = None,
        straggler_fraction: float = 0.0,
        straggler_mode: str = "fixed",
        weighting: str = "examples",
        aggregator: Aggregator | None = None,
        sampling: str = "fixed",
        store: str | ClientStore = "device",
        store_dir: str | None = None,
        max_examples: int | None = None,
        build: Callable[[Any], tuple] | None = None,
        pool: str = "device",
        groups: np.ndarray | None = None,
        pool_dir: str | None = None,
    ):
        n = data.num_clients
        if pool not in ("device", "host", "disk"):
            raise ConfigError("data.pool", f"must be device, host or disk (auto is resolved by the builder); "
                                           f"got {pool!r}")
        self.pool_kind = pool
        self._pool_file = None
        if pool == "disk":  # rows not yet in a pool file: into one of this simulator's own
            from fedkd_jax.store.pool_file import to_disk

            data, self._pool_file = to_disk(data, pool_dir)
        if not 1 <= cohort_size <= n:
            raise ConfigError("run.cohort_size", f"must be in [1, {n}] (the population size); got {cohort_size}")
        if group_size < 1:
            raise ConfigError("run.group_size", f"must be a positive integer; got {group_size}")
        if not 0.0 <= straggler_fraction <= 1.0:
            raise ConfigError("client.straggler_fraction", f"must be in [0, 1]; got {straggler_fraction}")
        if straggler_mode not in STRAGGLER_MODES:
            raise ConfigError("client.straggler_mode", f"unknown value {straggler_mode!r}; allowed: {', '.join(STRAGGLER_MODES)}")
        if straggler_fraction > 0 and not algorithm.supports_stragglers:
            raise ConfigError("client.straggler_fraction",
                              f"{algorithm.name} does not simulate stragglers; use fedavg or fedprox, or 0")
        self.algorithm = algorithm
        self.data = data
        self._last_round: tuple[jax.Array, int] | None = None  # (round array returned, its value)
        self.mesh = mesh if mesh is not None else client_mesh()
        if self.mesh.devices.size > 1 and jax.default_backend() == "cpu":
            limit_blas_threads()
        self.num_clients = n
        self.cohort_size = cohort_size
        self.group_size = group_size
        if aggregator is None:
            aggregator = chain(*([compress(compressor)] if compressor is not None else []), mean(weighting))
        self.aggregator = aggregator
        self.downlink = compress(downlink) if isinstance(downlink, Compressor) else downlink
        # transforms that need the whole cohort's ids (secure aggregation's pairwise masks)
        self._needs_cohort = any(getattr(t.encode, "needs_cohort", False) for t in aggregator.transforms)
        self.straggler_fraction = float(straggler_fraction)
        self.straggler_count = straggler_count(self.straggler_fraction, cohort_size)
        self.straggler_mode = straggler_mode
        if sampling not in ("fixed", "poisson"):
            raise ConfigError("privacy.sampling", f"unknown value {sampling!r}; allowed: fixed, poisson")
        self.sampling = sampling
        self.capacity = poisson_capacity(n, cohort_size) if sampling == "poisson" else cohort_size
        self.num_devices = int(self.mesh.shape[CLIENTS])
        self.padded_cohort = padded_cohort(self.capacity, self.num_devices, group_size)
        self.layout = None
        if groups is not None:
            self.layout = self._group_layout(groups, algorithm, sampling)
            self.padded_cohort = self.layout.padded
        self.max_examples = max(int(max_examples or 0), data.max_examples)
        self.build = build
        self.stateful = algorithm.init_client is not None
        self.client_template = (jax.eval_shape(algorithm.init_client, jax.random.key(0)) if self.stateful else ())
        self.store: ClientStore | None = None
        if self.stateful:
            self.store = store if isinstance(store, ClientStore) else make_store(
                store, self.client_template, n, mesh=self.mesh, directory=store_dir)
        self._replicated = NamedSharding(self.mesh, P())
        self._by_client = NamedSharding(self.mesh, P(None, CLIENTS))
        self._server_data = put_replicated(algorithm.server_data, self._replicated)

        self._abstract = abstract = jax.eval_shape(self.init, 0)
        if algorithm.download_bytes is not None:
            self.bytes_down_per_client = int(algorithm.download_bytes)
        else:
            self.bytes_down_per_client = tree_bytes(jax.eval_shape(algorithm.broadcast, abstract.server))
        self._program = jax.jit(self._rounds, static_argnums=(0,))
        self._init_block = init_program(algorithm.init_client) if self.stateful else None
        self._init_jit = jax.jit(self._init_state)

    def _own_slots(self, alg: FederatedAlgorithm) -> bool:
        """Architecture groups whose client states hold a slot per group (:func:`fedkd_jax.hetero.grouped`):
        group ``g``'s clients then gather, train and write back only slot ``g``."""
        return self.layout is not None and self.stateful and bool(alg.group_updates)

    def _group_layout(self, groups, algorithm: FederatedAlgorithm, sampling: str):
        from fedkd_jax.hetero.groups import group_layout

        groups = np.asarray(groups)
        if groups.shape != (self.num_clients,):
            raise ConfigError("model.groups", f"needs one group per client ({self.num_clients}); got {groups.shape}")
        if sampling != "fixed":
            raise ConfigError("privacy.sampling", "architecture groups sample stratified fixed-size cohorts; "
                                                  "poisson sampling is not supported with model.groups")
        if self.straggler_fraction > 0:
            raise ConfigError("client.straggler_fraction", "stragglers are not simulated with model.groups; use 0")
        layout = group_layout(groups, self.cohort_size, self.num_devices, self.group_size)
        if algorithm.group_updates and len(algorithm.group_updates) != layout.num_groups:
            raise ConfigError("model.groups", f"{algorithm.name} was built for {len(algorithm.group_updates)} "
                                              f"groups; the population has {layout.num_groups}")
        return layout

    # ----------------------------------------------------------------- setup
    def init(self, seed: int | jax.Array) -> SimState:
        """Initial state: server from ``(seed)``; clients start lazily from ``(seed, client)``.

        A concrete seed gives the state placed on the mesh as the round program returns
        it, so the first and later dispatches share one compiled program."""
        if isinstance(seed, jax.core.Tracer):  # inside a caller's trace (a sweep's vmap): as is
            return self._init_state(seed)
        # one compiled program (cached on disk with the compile cache) instead of an eager
        # dispatch per initialiser op; the same ops as the traced path, so the same values
        return self.put_state(self._init_jit(jnp.asarray(seed, jnp.uint32)))

    def _init_state(self, seed: jax.Array) -> SimState:
        base = jax.random.key(seed)
        server = self.algorithm.init(jax.random.fold_in(base, _SERVER_INIT))
        params = self.algorithm.model_params(server)
        return SimState(jnp.zeros((), jnp.int32), server, base, self.aggregator.init(params))

    def init_clients(self, key: jax.Array, ids: jax.Array) -> Any:
        """The initial states ``[len(ids), ...]`` of clients ``ids`` of the run keyed ``key``."""
        return jax.vmap(lambda i: self.algorithm.init_client(client_init_key(key, i)))(ids)

    def put_data(self, data: FederatedData | None = None) -> PoolData | HostPool:
        """Place the pooled rows on the mesh, replicated (each device gathers its clients' rows);
        with ``pool="host"`` or ``"disk"`` they stay on the host (or in their file) and each
        dispatch places what it reads (:mod:`fedkd_jax.engine.pool`)."""
        data = self.data if data is None else data
        if self.pool_kind in ("host", "disk"):
            if self.pool_kind == "disk":
                from fedkd_jax.store.pool_file import random_access

                random_access(data.x)
                random_access(data.y)
            return HostPool(data.x, data.y)
        return put_replicated(PoolData(data.x, data.y), self._replicated)

    def _placed(self, pool: PoolData | HostPool | Compacted, plan: Plan) -> tuple[PoolData, Plan]:
        """The pool the round reads: a host pool's rows that ``plan`` reads, gathered (unless
        ``pool`` is already a dispatch's :class:`Compacted` rows, with ``plan`` pointing into
        them) and placed, with the plan's rows pointing into them."""
        if isinstance(pool, HostPool):
            pool, plan = gather_rows(pool, plan)
        if isinstance(pool, Compacted):
            return put_replicated(PoolData(pool.x, pool.y), self._replicated), plan
        return pool, plan

    def put_state(self, state: SimState) -> SimState:
        return put_replicated(state, self._replicated)

    def reset_store(self) -> None:
        """Forget every client's stored state (start a new run on this simulator)."""
        if self.store is not None:
            self.store.reset()

    @cached_property
    def bytes_up_per_client(self) -> int:
        """Bytes of one client's uncompressed update (traced once, when first asked:
        the round itself counts them from its own trace)."""
        return tree_bytes(self._abstract_output(self._abstract).update)

    def _abstract_output(self, abstract: SimState):
        cd = ClientData(
            jax.ShapeDtypeStruct((self.max_examples, self.data.num_features), jnp.float32),
            jax.ShapeDtypeStruct((self.max_examples,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32),
        )
        bc = jax.eval_shape(self.algorithm.broadcast, abstract.server)
        if self.algorithm.clients_see_server_data:
            bc = (bc, self._server_data)
        return jax.eval_shape(self.algorithm.client_update, bc, self.client_template, cd, abstract.key)

    # ----------------------------------------------------------------- round
    def _clients(self, alg, agg, bcast, rkey, round_index, ids, rows, counts, pos, stragglers, union, pool, sdata,
                 agg_state):
        """Per-device body of the shard_map: this device's slice of the cohort.

        ``ids``, ``rows``, ``counts``, ``pos`` and ``stragglers`` arrive sharded
        (each device sees its own clients); the union of states and the pool
        arrive replicated. The round needs no collective besides the final
        all-reduce.
        """
        g = self.group_size
        # Each client trains its own copy of the broadcast: mark it as varying over
        # the mesh axis, or gradients w.r.t. it would be summed across devices.
        if self.build is None:
            bcast = jax.tree.map(lambda a: jax.lax.pcast(a, CLIENTS, to="varying"), bcast)
        n_local = ids.shape[0]
        own_slots = self._own_slots(alg)
        if own_slots:  # each group reads only its own slot of its clients' states (below)
            cstates = jnp.zeros((n_local,), jnp.int32)
        else:
            cstates = jax.tree.map(lambda a: jnp.take(a, pos, axis=0, mode="clip"), union)

        chain = agg.transforms
        all_ids = jax.lax.all_gather(ids, CLIENTS, tiled=True) if self._needs_cohort else ids
        offset = jax.lax.axis_index(CLIENTS) * n_local
        # what a transform derives from the whole cohort (secure aggregation's masking
        # graph): once per round and device, not once per client
        setups = [t.encode.cohort_setup(rkey, all_ids) if getattr(t.encode, "cohort_setup", None) else None
                  for t in chain]

        def one(update, cid, crow, count, strag, cstate, position):
            cd = ClientData(pool.x[crow], pool.y[crow], count, strag)
            ckey = client_key(rkey, cid)
            out = update(bcast, cstate, cd, ckey)
            # A client contributes when it is real and its weight is positive; a
            # dropped client (e.g. a FedAvg straggler) uploads nothing.
            real = count > 0
            w = out.weight * real
            aw = (out.weight if out.aux_weight is None else out.aux_weight) * real
            nbytes = tree_bytes(out.update) if out.upload_bytes is None else out.upload_bytes
            payload, stats = {"update": out.update, "aux": out.aux}, {}
            aux_done = False
            for i, t in enumerate(chain):
                if not t.before_aux and not aux_done and alg.aux_from_update is not None:
                    payload["aux"] = alg.aux_from_update(bcast, payload["update"], sdata)
                aux_done = aux_done or not t.before_aux
                if t.encode is None:
                    continue
                cin = ClientIn(jax.random.fold_in(ckey, _COMPRESS + i), round_index, agg_state[t.name], w, aw,
                               position, all_ids, (), cid, rkey, setups[i])
                payload, co = t.encode(payload, cin)
                w, aw = co.weight, co.aux_weight
                nbytes = nbytes if co.payload_bytes is None else co.payload_bytes
                stats.update(co.stats)
            if not aux_done and alg.aux_from_update is not None:
                payload["aux"] = alg.aux_from_update(bcast, payload["update"], sdata)
            sent = real & (w > 0)
            sentf = sent.astype(jnp.float32)
            payload = jax.tree.map(lambda a: jnp.where(sent, a, jnp.zeros_like(a)), payload)
            stats = {k: v * sentf for k, v in stats.items()}
            metrics = {k: v * (w * sentf) for k, v in out.metrics.items()}
            sums = (payload, w * sentf, aw * sentf, sentf, stats, metrics)
            nbytes = jnp.where(sent, jnp.round(jnp.asarray(nbytes, jnp.float32)), 0).astype(jnp.int32)
            return sums, (out.state, nbytes, sent)

        positions = offset + jnp.arange(n_local)
        everything = (ids, rows, counts, stragglers, cstates, positions)

        def group_sum(sums):
            return sums if g == 1 else jax.tree.map(lambda a: jnp.sum(a, axis=0), sums)

        def segment(update, lo, hi, slot=None):
            """Clients ``lo .. hi - 1`` of this device, all running ``update`` (on their state's
            ``slot`` only, when given)."""
            per_client = partial(one, update) if g == 1 else jax.vmap(partial(one, update))
            n = hi - lo
            def grouped_rows(a):  # [n, ...] -> [n / g, g, ...] when clients are vmapped in groups of g
                return a.reshape((n // g, g) + a.shape[1:]) if g > 1 else a

            xs = jax.tree.map(lambda a: grouped_rows(a[lo:hi]), everything)
            if slot is not None:  # this group's slot of its clients' states, gathered for them alone
                own = jax.tree.map(lambda a: grouped_rows(jnp.take(a, pos[lo:hi], axis=0, mode="clip")), union[slot])
                xs = xs[:4] + (own,) + xs[5:]
            first = jax.tree.map(lambda a: a[0], xs)
            shape = jax.eval_shape(lambda a: group_sum(per_client(*a)[0]), first)
            if self.build is None:
                zeros = jax.tree.map(lambda s: jax.lax.pcast(jnp.zeros(s.shape, s.dtype), CLIENTS, to="varying"),
                                     shape)
            else:
                zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)

            def body(acc, x):
                sums, per = per_client(*x)
                # integer payloads (secure aggregation) wrap modulo 2^bits, as the protocol's ring
                acc = jax.tree.map(jnp.add, acc, group_sum(sums))
                return acc, per

            acc, out = jax.lax.scan(body, zeros, xs)
            if g > 1:
                out = jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), out)
            return acc, out

        if self.layout is None:
            acc, per_client_out = segment(alg.client_update, 0, n_local)
        else:  # architecture groups: each group's slots run its own client update, as its own batch
            updates = alg.group_updates or (alg.client_update,) * self.layout.num_groups
            parts = [segment(u, lo, hi, slot=gi if own_slots else None)
                     for gi, (u, (lo, hi)) in enumerate(zip(updates, self.layout.segments()))]
            acc = jax.tree.map(lambda *a: sum(a[1:], a[0]), *[p[0] for p in parts])
            if own_slots:  # per group, its slot's new states (the union is written back slot by slot)
                per_client_out = (tuple(p[1][0] for p in parts),
                                  jnp.concatenate([p[1][1] for p in parts]), jnp.concatenate([p[1][2] for p in parts]))
            else:
                per_client_out = jax.tree.map(lambda *a: jnp.concatenate(a), *[p[1] for p in parts])
        leaves, treedef = jax.tree.flatten(acc)
        floats = [x for x in leaves if not jnp.issubdtype(x.dtype, jnp.integer)]
        ints = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.integer)]
        flat, unravel = ravel_pytree(floats)
        # The round's cross-device collective: one all-reduce (a second one for
        # integer payloads when secure aggregation is on).
        floats = iter(unravel(jax.lax.psum(flat, CLIENTS)))
        ints = iter(jax.lax.psum(ints, CLIENTS)) if ints else iter(())
        leaves = [next(ints) if jnp.issubdtype(x.dtype, jnp.integer) else next(floats) for x in leaves]
        return jax.tree.unflatten(treedef, leaves), per_client_out

    def _round(self, state: SimState, union, ids, rows, counts, pos, pool: PoolData, sdata, hp=None):
        alg, agg, downlink, (strag_frac, strag_count) = self._parts(hp)
        rkey = round_key(state.key, state.round)
        if self.straggler_fraction > 0:
            stragglers = straggler_flags(rkey, self.cohort_size, self.padded_cohort, strag_frac,
                                         self.straggler_mode, strag_count)
        else:
            stragglers = jnp.zeros((self.padded_cohort,), jnp.int32)
        bcast = alg.broadcast(state.server)
        if alg.clients_see_server_data:  # data every client holds (FedMD's public set)
            bcast = (bcast, sdata)

        sharded = jax.shard_map(
            partial(self._clients, alg, agg),
            mesh=self.mesh,
            # Batched sweeps vmap this over a 'runs' mesh axis; the varying-axes type
            # check does not follow values through that batching, so it is off there
            # (each device holds whole runs: no gradient crosses devices either way).
            check_vma=self.build is None,
            in_specs=(P(), P(), P(), P(CLIENTS), P(CLIENTS), P(CLIENTS), P(CLIENTS), P(CLIENTS), P(), P(), P(), P()),
            out_specs=(P(), P(CLIENTS)),
        )
        (payload, w_sum, aux_w_sum, contributing, stats, met_sum), (new_states, client_bytes, sent) = sharded(
            bcast, rkey, state.round, ids, rows, counts, pos, stragglers, union, pool, sdata, state.agg
        )
        # A round in which no client contributed changes nothing on the server
        # (model, optimizer and aggregation state) and reports NaN client metrics.
        any_client = w_sum > 0
        agg_state = dict(state.agg)
        metrics = {}
        for i, t in reversed(list(enumerate(agg.transforms))):
            if t.finalize is None:
                continue
            sin = ServerIn(jax.random.fold_in(jax.random.fold_in(rkey, _AGGREGATE), i), state.round,
                           state.agg[t.name], w_sum, aux_w_sum, contributing, stats, ids, sent, rkey)
            payload, agg_state[t.name], m = t.finalize(payload, sin)
            metrics.update({f"{t.name}_{k}": v for k, v in m.items()})
        # a transform may abort the round (secure aggregation below its survivor threshold):
        # then it is an empty round, reported as such
        aborted = [metrics[f"{t.name}_aborted"] > 0 for t in agg.transforms if f"{t.name}_aborted" in metrics]
        if aborted:
            any_client = any_client & ~jnp.any(jnp.stack(aborted))
            contributing = jnp.where(any_client, contributing, 0.0)
        mean_update, mean_aux = payload["update"], payload["aux"]
        skey = jax.random.fold_in(rkey, _SERVER)
        server, server_metrics = alg.server_update(state.server, mean_update, mean_aux, skey, sdata)
        if downlink is not None:
            old = alg.model_params(state.server)
            delta = jax.tree.map(jnp.subtract, alg.model_params(server), old)
            cin = ClientIn(jax.random.fold_in(rkey, _DOWNLINK), state.round, (), jnp.float32(1), jnp.float32(1),
                           jnp.int32(0), ids, (), jnp.int32(-1))
            down, co = downlink.encode({"update": delta, "aux": ()}, cin)
            server = alg.set_model_params(server, jax.tree.map(jnp.add, old, down["update"]))
            metrics["bytes_down_client"] = jnp.where(any_client, jnp.round(co.payload_bytes), 0).astype(jnp.int32)
        server = tree_where(any_client, server, state.server)
        agg_state = tree_where(any_client, agg_state, state.agg)
        if self._own_slots(alg):  # group g's positions write slot g of their clients' states
            d = self.num_devices
            per = pos.reshape(d, -1)
            union = tuple(jax.tree.map(lambda a, b, p=per[:, lo:hi].reshape(-1): a.at[p].set(b, mode="drop"), u, new)
                          for u, new, (lo, hi) in zip(union, new_states, self.layout.segments()))
        else:
            union = jax.tree.map(lambda a, b: a.at[pos].set(b, mode="drop"), union, new_states)
        nan = jnp.float32(jnp.nan)
        denom = jnp.where(any_client, w_sum, 1.0)
        always = lambda k: k == "bytes_down_client" or k.endswith("_aborted")  # noqa: E731 - reported in every round
        metrics = {k: v if always(k) else jnp.where(any_client, v, nan) for k, v in metrics.items()}
        metrics.update({("train_" + k if k == "loss" else "client_" + k): jnp.where(any_client, v / denom, nan)
                        for k, v in met_sum.items()})
        metrics.update({"server_" + k: jnp.where(any_client, v, nan) for k, v in server_metrics.items()})
        metrics["weight_sum"] = w_sum
        metrics["clients_contributing"] = contributing.astype(jnp.int32)
        metrics["bytes_up_clients"] = client_bytes  # [Cp] int32, exact (0 for padding and dropped clients)
        return SimState(state.round + 1, server, state.key, agg_state), union, metrics

    def _parts(self, hp):
        """The algorithm, chain, downlink and (straggler share, straggler count) of a round:
        the static ones, or (batched sweeps) those ``self.build`` makes from traced
        hyperparameters ``hp``."""
        if hp is None:
            return self.algorithm, self.aggregator, self.downlink, (self.straggler_fraction, self.straggler_count)
        alg, agg, downlink, strag = self.build(hp)
        return alg, agg, (compress(downlink) if isinstance(downlink, Compressor) else downlink), strag

    def _rounds(self, num_rounds: int, state: SimState, pool: PoolData, ids, rows, counts, pos, union, sdata,
                hp=None):
        def body(carry, xs):
            st, un = carry
            st, un, m = self._round(st, un, *xs, pool, sdata, hp)
            return (st, un), m

        (state, union), metrics = jax.lax.scan(body, (state, union), (ids, rows, counts, pos), length=num_rounds)
        return state, union, metrics

    # ------------------------------------------------------------------ API
    def plan(self, key: jax.Array | tuple[int, ...], start: int, num_rounds: int) -> Plan:
        """The host-side plan (cohorts, rows, union) of ``num_rounds`` rounds from ``start``."""
        return make_plan(self.data, key, start, num_rounds, self.cohort_size, self.padded_cohort,
                         stateful=self.stateful, sampling=self.sampling, capacity=self.capacity,
                         width=self.max_examples, layout=self.layout)

    def initial_states(self, key: jax.Array, ids: np.ndarray) -> list[np.ndarray]:
        """Host copies (one array per leaf, ``[len(ids), ...]``) of the seed-defined
        initial states of clients ``ids`` (blocks on one device: one compile per run)."""
        return initial_states(self._init_block, self.client_template, key, ids)

    def complete(self, key: jax.Array, ids: np.ndarray, states: Any, fresh: np.ndarray) -> Any:
        """Gathered ``states`` of clients ``ids`` with the ``fresh`` (never stored)
        ones set to their initial state, placed on the mesh (replicated)."""
        ids, fresh = np.asarray(ids), np.asarray(fresh, bool)
        if fresh.any():
            init = self.initial_states(key, ids[fresh])
            leaves = jax.tree.leaves(states)
            if all(isinstance(a, np.ndarray) for a in leaves):
                for a, rows in zip(leaves, init):
                    a[fresh] = rows
            else:  # device store: fill on the devices
                full = [np.zeros(a.shape, a.dtype) for a in leaves]
                for f, rows in zip(full, init):
                    f[fresh] = rows
                treedef = jax.tree.structure(states)
                states = fill_fresh(states, put_replicated(fresh, self._replicated),
                                     put_replicated(jax.tree.unflatten(treedef, full), self._replicated))
        return put_replicated(states, self._replicated)

    def gather(self, plan: Plan, key: jax.Array) -> Any:
        """The plan's union of client states, complete and placed on the mesh."""
        if not self.stateful:
            return ()
        return self.complete(key, plan.union, *self.store.gather(plan.union))

    def execute(self, state: SimState, pool: PoolData | HostPool | Compacted, plan: Plan, gathered: Any = None):
        """Run the plan's rounds in one dispatch; write the new client states to the store.

        ``gathered``: the plan's union of states from :meth:`gather` (gathered now
        when ``None``). ``pool``: the placed pool, a host pool, or the dispatch's rows
        already gathered from one (:func:`~fedkd_jax.engine.pool.gather_rows`, with
        ``plan`` as it returned it). Blocks until done: XLA:CPU's in-process collectives can
        deadlock when several multi-device executions are queued at once (seen
        with jaxlib 0.10 on 2 cores).

        Returns:
          ``(state, metrics)``, each metric stacked ``[R]``.
        """
        r = plan.ids.shape[0]
        if self.stateful:
            self.store.bind(key_bits(state.key), plan.start)
        union = self.gather(plan, state.key) if gathered is None else gathered
        state = state.replace(agg=refresh_noise_seed(state.agg))  # privacy.secure_noise: fresh OS entropy
        pool, plan = self._placed(pool, plan)
        state, union, metrics = jax.block_until_ready(self._program(r, state, pool, *self._args(plan, union)))
        if self.stateful:
            self.store.scatter(plan.union, union)
            self.store.round = plan.start + r
        return state, metrics

    def _args(self, plan: Plan, union):
        host = (plan.ids, plan.rows, plan.counts, plan.pos)
        if jax.process_count() == 1:  # one batched transfer
            ids, rows, counts, pos = jax.device_put(host, self._by_client)
        else:
            ids, rows, counts, pos = (put_sharded(a, self._by_client) for a in host)
        return ids, rows, counts, pos, union, self._server_data

    def run(self, state: SimState, pool: PoolData, num_rounds: int):
        """``num_rounds`` rounds in one dispatch (``lax.scan``); metrics stacked ``[R]``."""
        if isinstance(state.round, int):
            start = state.round
        elif self._last_round is not None and state.round is self._last_round[0]:
            start = self._last_round[1]  # the state this simulator just returned: no device sync
        else:
            start = int(jax.device_get(state.round))
        state, metrics = self.execute(state, pool, self.plan(state.key, start, int(num_rounds)))
        self._last_round = (state.round, start + int(num_rounds))
        return state, metrics

    def step(self, state: SimState, pool: PoolData) -> tuple[SimState, dict[str, jax.Array]]:
        """One round (compiled once, then reused)."""
        state, metrics = self.run(state, pool, 1)
        return state, _first_round(metrics)  # one dispatch, not one eager gather per metric

    def client_states(self, key: jax.Array, ids: np.ndarray | None = None) -> Any:
        """Current states ``[len(ids), ...]`` of clients ``ids`` (default all); untouched
        clients come out at their seed-defined initial state (``key``: the run's key)."""
        ids = np.arange(self.num_clients) if ids is None else np.asarray(ids)
        return self.complete(key, ids, *self.store.gather(ids))

    def eval_data(self, ids: np.ndarray | None = None, *, pool: PoolData | None = None):
        """Evaluation inputs (global test set, local tests of clients ``ids``) on the mesh;
        ``pool``: the pool already placed by :meth:`put_data` (placed again if not given)."""
        from fedkd_jax.engine.evaluation import make_eval_data

        return make_eval_data(self.data, self.put_data() if pool is None else pool, self._replicated, ids=ids)

    @property
    def replicated_sharding(self) -> jax.sharding.Sharding:
        """The sharding that replicates an array on every device of the mesh."""
        return self._replicated

    def round_bytes(self) -> tuple[int, int]:
        """``(bytes_up, bytes_down)`` of one full round without compression or dropped
        clients. The round's metrics carry the exact per-client ``bytes_up_clients``
        (and ``bytes_down_client`` with downlink compression)."""
        return self.cohort_size * self.bytes_up_per_client, self.cohort_size * self.bytes_down_per_client

    def union_size(self, num_rounds: int) -> int:
        return union_size(num_rounds, self.capacity, self.num_clients) if self.stateful else 0

    def lower(self, state: SimState, pool: PoolData, num_rounds: int = 1):
        """The lowered dispatch program (for inspecting HLO or compile time)."""
        plan = self.plan(state.key, 0, num_rounds)
        pool, plan = self._placed(pool, plan)
        union = jax.tree.map(lambda t: jax.ShapeDtypeStruct((len(plan.union),) + t.shape, t.dtype, sharding=self._replicated),
                             self.client_template)
        return self._program.lower(num_rounds, state, pool, *self._args(plan, union))
