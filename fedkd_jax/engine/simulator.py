"""The round builder: one ``jax.jit`` program per federated round.

Shape key: ``N`` population size, ``C`` cohort size, ``Cp`` cohort padded to a
multiple of ``devices * group_size``, ``M`` padded examples per client.

A round, all inside one compiled program::

    key(seed, round) -> sample C of N clients without replacement
      -> shard_map over the 'clients' mesh axis, per device:
           lax.scan over its Cp/devices clients in groups of ``group_size``
           (vmap inside a group): gather the client's padded data from the
           replicated population, run ``client_update``, accumulate
           weight * update, weight and weight * metrics
         -> one psum of the flattened sums (the only collective)
      -> mean update -> ``server_update`` (skipped when no client contributed)
      -> optional downlink compression of the global update
      -> write client state back.

Why groups and a scan rather than one vmap over the cohort: on CPU a client's
weights then stay in cache for all its local steps, and XLA:CPU runs batched
dots of tiny per-client matrices slower than plain ones. ``group_size`` is a
tuned setting (1 is best on CPU; larger groups feed accelerators).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fedkd_jax._devices import limit_blas_threads
from fedkd_jax.algorithms.base import FULL_WORK, LEGACY_STRAGGLER, STRAGGLER, ClientData, FederatedAlgorithm
from fedkd_jax.algorithms.local import tree_where
from fedkd_jax.compression import Compressor
from fedkd_jax.data import FederatedData
from fedkd_jax.engine.mesh import CLIENTS, client_mesh
from fedkd_jax.errors import ConfigError
from fedkd_jax.tree_util import tree_bytes

# Tags folded into the seed key so each use of randomness gets its own stream.
_SERVER_INIT, _CLIENT_INIT, _ROUND = 0, 1, 2
_COHORT, _CLIENTS_TAG, _SERVER, _STRAGGLERS, _DOWNLINK = 0, 1, 2, 3, 4
_COMPRESS = 0x5EED  # folded into a client's key for its compressor's randomness
STRAGGLER_MODES = ("fixed", "bernoulli")
WEIGHTINGS = ("examples", "uniform")


@struct.dataclass
class SimState:
    """Everything a round reads and writes.

    Attributes:
      round: int32 scalar, rounds completed.
      server: the algorithm's server state (global params, optimizer state...).
      clients: per-client persistent state stacked on a leading ``[N]`` axis,
        or ``()`` for stateless algorithms.
      key: the run's base PRNG key (from the seed); never advanced: round and
        client keys are derived by folding in their indices.
    """

    round: jax.Array
    server: Any
    clients: Any
    key: jax.Array


def round_key(base: jax.Array, round_index: jax.Array) -> jax.Array:
    """The key of round ``round_index``."""
    return jax.random.fold_in(jax.random.fold_in(base, _ROUND), round_index)


def client_key(rkey: jax.Array, client_id: jax.Array) -> jax.Array:
    """The key of client ``client_id`` in the round keyed ``rkey``."""
    return jax.random.fold_in(jax.random.fold_in(rkey, _CLIENTS_TAG), client_id)


def straggler_flags(rkey: jax.Array, cohort_size: int, padded: int, fraction: float, mode: str) -> jax.Array:
    """``[padded]`` int32 ``ClientData.straggler`` codes for the cohort's positions.

    ``fixed`` (FedProx, Li et al. 2020): exactly ``round(fraction * C)`` of the
    ``C`` real positions, uniformly at random, are ``STRAGGLER``.
    ``bernoulli`` (the older draw): each position independently with
    probability ``fraction``, coded ``LEGACY_STRAGGLER``. Padding positions are
    never stragglers.
    """
    key = jax.random.fold_in(rkey, _STRAGGLERS)
    u = jax.random.uniform(key, (cohort_size,))
    if mode == "fixed":
        k = round(fraction * cohort_size)  # Python's round, as FedProx's reference code
        rank = jnp.argsort(jnp.argsort(u))
        flags = jnp.where(rank < k, STRAGGLER, FULL_WORK)
    else:
        flags = jnp.where(u < fraction, LEGACY_STRAGGLER, FULL_WORK)
    return jnp.concatenate([flags, jnp.zeros((padded - cohort_size,), flags.dtype)]).astype(jnp.int32)


def sample_cohort(rkey: jax.Array, num_clients: int, cohort_size: int) -> jax.Array:
    """``[C]`` distinct client ids, uniformly without replacement."""
    if cohort_size == num_clients:
        return jax.random.permutation(jax.random.fold_in(rkey, _COHORT), num_clients)
    return jax.random.choice(jax.random.fold_in(rkey, _COHORT), num_clients, (cohort_size,), replace=False)


class Simulator:
    """Compiles and runs federated rounds of one algorithm on one population.

    Args:
      algorithm: a :class:`FederatedAlgorithm`.
      data: the population (only shapes are read here; pass the arrays to
        :meth:`step` / :meth:`run`, ideally placed with :meth:`put_data`).
      cohort_size: ``C`` clients per round, sampled without replacement.
      mesh: a 1-D mesh with axis ``clients`` (default: all devices).
      group_size: clients vmapped together inside a device's scan.
      compressor: optional compression of every client's uploaded update; the
        server aggregates the decompressed updates and ``bytes_up`` counts the
        compressed payloads.
      downlink: optional compression of the server's global update on its way
        down (FedKD, Wu et al. 2022). The server's model becomes the previous
        model plus the *decompressed* update, i.e. exactly what every client
        holding the previous global model reconstructs, and ``bytes_down``
        counts the compressed payload per cohort client.
      straggler_fraction: share of each cohort that straggles (see
        :func:`straggler_flags`); only for algorithms with ``supports_stragglers``.
      straggler_mode: ``fixed`` (exact count, FedProx) or ``bernoulli``.
      weighting: ``examples`` averages updates with the algorithms' weights
        (example counts, McMahan et al. 2017); ``uniform`` gives every
        contributing client weight 1 (FedKD's reference code).
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
    ):
        n = data.num_clients
        if not 1 <= cohort_size <= n:
            raise ConfigError("run.cohort_size", f"must be in [1, {n}] (the population size); got {cohort_size}")
        if group_size < 1:
            raise ConfigError("run.group_size", f"must be a positive integer; got {group_size}")
        if not 0.0 <= straggler_fraction <= 1.0:
            raise ConfigError("client.straggler_fraction", f"must be in [0, 1]; got {straggler_fraction}")
        if straggler_mode not in STRAGGLER_MODES:
            raise ConfigError("client.straggler_mode", f"unknown value {straggler_mode!r}; allowed: {', '.join(STRAGGLER_MODES)}")
        if weighting not in WEIGHTINGS:
            raise ConfigError("client.weighting", f"unknown value {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
        if straggler_fraction > 0 and not algorithm.supports_stragglers:
            raise ConfigError("client.straggler_fraction",
                              f"{algorithm.name} does not simulate stragglers; use fedavg or fedprox, or 0")
        self.algorithm = algorithm
        self.mesh = mesh if mesh is not None else client_mesh()
        if self.mesh.devices.size > 1 and jax.default_backend() == "cpu":
            limit_blas_threads()
        self.num_clients = n
        self.cohort_size = cohort_size
        self.group_size = group_size
        self.compressor = compressor
        self.downlink = downlink
        self.straggler_fraction = float(straggler_fraction)
        self.straggler_mode = straggler_mode
        self.weighting = weighting
        self.num_devices = int(self.mesh.devices.size)
        block = self.num_devices * group_size
        self.padded_cohort = math.ceil(cohort_size / block) * block
        self._data_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), data)

        abstract = jax.eval_shape(self.init, 0)
        if algorithm.download_bytes is not None:
            self.bytes_down_per_client = int(algorithm.download_bytes)
        else:
            self.bytes_down_per_client = tree_bytes(jax.eval_shape(algorithm.broadcast, abstract.server))
        out = self._abstract_output(abstract)
        self.bytes_up_per_client = tree_bytes(out.update)
        self._replicated = NamedSharding(self.mesh, P())
        self._step = jax.jit(self._round)
        self._run = jax.jit(self._rounds, static_argnums=2)

    # ----------------------------------------------------------------- setup
    def init(self, seed: int | jax.Array) -> SimState:
        """Initial state: server from ``(seed)``, client ``i`` from ``(seed, i)``."""
        base = jax.random.key(seed)
        server = self.algorithm.init(jax.random.fold_in(base, _SERVER_INIT))
        clients: Any = ()
        if self.algorithm.init_client is not None:
            ck = jax.random.fold_in(base, _CLIENT_INIT)
            keys = jax.vmap(lambda i: jax.random.fold_in(ck, i))(jnp.arange(self.num_clients))
            clients = jax.vmap(self.algorithm.init_client)(keys)
        return SimState(jnp.zeros((), jnp.int32), server, clients, base)

    def put_data(self, data: FederatedData) -> FederatedData:
        """Place the population on the mesh, replicated (each device gathers its own clients)."""
        return jax.device_put(data, self._replicated)

    def put_state(self, state: SimState) -> SimState:
        return jax.device_put(state, self._replicated)

    def _abstract_output(self, abstract: SimState):
        d = self._data_shapes
        cd = ClientData(
            jax.ShapeDtypeStruct(d.x.shape[1:], d.x.dtype),
            jax.ShapeDtypeStruct(d.y.shape[1:], d.y.dtype),
            jax.ShapeDtypeStruct((), jnp.int32),
        )
        cs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), abstract.clients)
        bc = jax.eval_shape(self.algorithm.broadcast, abstract.server)
        return jax.eval_shape(self.algorithm.client_update, bc, cs, cd, abstract.key)

    # ----------------------------------------------------------------- round
    def _clients(self, bcast, rkey, round_index, ids, valid, stragglers, store, data: FederatedData):
        """Per-device body of the shard_map: this device's slice of the cohort.

        ``ids``, ``valid``, ``store`` and ``data`` arrive replicated; each device
        slices its own clients and gathers their data and state locally, so the
        round needs no collective besides the final all-reduce.
        """
        alg, g = self.algorithm, self.group_size
        # Each client trains its own copy of the broadcast: mark it as varying over
        # the mesh axis, or gradients w.r.t. it would be summed across devices.
        bcast = jax.tree.map(lambda a: jax.lax.pcast(a, CLIENTS, to="varying"), bcast)
        n_local = self.padded_cohort // self.num_devices
        start = jax.lax.axis_index(CLIENTS) * n_local
        ids = jax.lax.dynamic_slice_in_dim(ids, start, n_local)
        valid = jax.lax.dynamic_slice_in_dim(valid, start, n_local)
        stragglers = jax.lax.dynamic_slice_in_dim(stragglers, start, n_local)
        safe_ids = jnp.minimum(ids, self.num_clients - 1)
        cstates = jax.tree.map(lambda a: a[safe_ids], store)

        def one(cid, ok, strag, cstate):
            safe = jnp.minimum(cid, self.num_clients - 1)
            cd = ClientData(data.x[safe], data.y[safe], jnp.where(ok, data.counts[safe], 0), strag)
            ckey = client_key(rkey, cid)
            out = alg.client_update(bcast, cstate, cd, ckey)
            if self.weighting == "uniform":
                out = out._replace(weight=(out.weight > 0).astype(jnp.float32))
            nbytes = out.upload_bytes
            if self.compressor is not None:
                update, payload = self.compressor.compress(out.update, jax.random.fold_in(ckey, _COMPRESS), round_index)
                out = out._replace(update=update)
                nbytes = payload if nbytes is None else nbytes
            if alg.aux_from_update is not None:
                out = out._replace(aux=alg.aux_from_update(bcast, out.update))
            if nbytes is None:
                nbytes = self.bytes_up_per_client
            # A client contributes when it is real and its weight is positive; a
            # dropped client (e.g. a FedAvg straggler) uploads nothing.
            sent = ok & (out.weight > 0)
            aux_w = out.weight if out.aux_weight is None else out.aux_weight
            sentf = sent.astype(jnp.float32)
            return out._replace(weight=out.weight * sentf, aux_weight=aux_w * sentf,
                                upload_bytes=jnp.where(sent, jnp.round(jnp.asarray(nbytes, jnp.float32)), 0).astype(jnp.int32))

        per_client = one if g == 1 else jax.vmap(one)
        xs = jax.tree.map(lambda a: a.reshape((n_local // g, g) + a.shape[1:]) if g > 1 else a,
                          (ids, valid, stragglers, cstates))

        def weighted_sums(out):
            w, aw = out.weight, out.aux_weight
            if g == 1:
                wsum = lambda u: w * u  # noqa: E731
                asum = lambda u: aw * u  # noqa: E731
            else:
                wsum = lambda u: jnp.tensordot(w, u, axes=1)  # noqa: E731
                asum = lambda u: jnp.tensordot(aw, u, axes=1)  # noqa: E731
            upd = jax.tree.map(wsum, out.update)
            aux = jax.tree.map(asum, out.aux)
            met = {k: wsum(v) for k, v in out.metrics.items()}
            contributing = jnp.sum((w > 0).astype(jnp.float32))
            return upd, aux, jnp.sum(w), jnp.sum(aw), contributing, met

        first = jax.tree.map(lambda a: a[0], xs)
        shape = jax.eval_shape(lambda a: weighted_sums(per_client(*a)), first)
        zeros = jax.tree.map(lambda s: jax.lax.pcast(jnp.zeros(s.shape, s.dtype), CLIENTS, to="varying"), shape)

        def body(acc, x):
            out = per_client(*x)
            acc = jax.tree.map(jnp.add, acc, weighted_sums(out))
            # exact per-client byte counts (a float32 sum rounds past 2^24 bytes)
            return acc, (out.state, out.upload_bytes)

        acc, per_client_out = jax.lax.scan(body, zeros, xs)
        if g > 1:
            per_client_out = jax.tree.map(lambda a: a.reshape((n_local,) + a.shape[2:]), per_client_out)
        flat, unravel = ravel_pytree(acc)
        # The only cross-device collective of the round: one all-reduce.
        return unravel(jax.lax.psum(flat, CLIENTS)), per_client_out

    def _round(self, state: SimState, data: FederatedData):
        alg = self.algorithm
        rkey = round_key(state.key, state.round)
        cohort = sample_cohort(rkey, self.num_clients, self.cohort_size)
        pad = self.padded_cohort - self.cohort_size
        ids = jnp.concatenate([cohort, jnp.full((pad,), self.num_clients, cohort.dtype)])
        valid = jnp.arange(self.padded_cohort) < self.cohort_size
        if self.straggler_fraction > 0:
            stragglers = straggler_flags(rkey, self.cohort_size, self.padded_cohort, self.straggler_fraction,
                                         self.straggler_mode)
        else:
            stragglers = jnp.zeros((self.padded_cohort,), jnp.int32)
        bcast = alg.broadcast(state.server)

        sharded = jax.shard_map(
            self._clients,
            mesh=self.mesh,
            in_specs=(P(),) * 8,
            out_specs=(P(), P(CLIENTS)),
        )
        (upd_sum, aux_sum, w_sum, aux_w_sum, contributing, met_sum), (new_states, client_bytes) = sharded(
            bcast, rkey, state.round, ids, valid, stragglers, state.clients, data
        )
        # A round in which no client contributed changes nothing on the server
        # (model and optimizer state) and reports NaN client metrics.
        any_client = w_sum > 0
        denom = jnp.where(any_client, w_sum, 1.0)
        mean_update = jax.tree.map(lambda u: u / denom, upd_sum)
        mean_aux = jax.tree.map(lambda u: u / jnp.where(aux_w_sum > 0, aux_w_sum, 1.0), aux_sum)
        skey = jax.random.fold_in(rkey, _SERVER)
        server, server_metrics = alg.server_update(state.server, mean_update, mean_aux, skey)
        metrics = {}
        if self.downlink is not None:
            old = alg.model_params(state.server)
            delta = jax.tree.map(jnp.subtract, alg.model_params(server), old)
            sent, down = self.downlink.compress(delta, jax.random.fold_in(rkey, _DOWNLINK), state.round)
            server = alg.set_model_params(server, jax.tree.map(jnp.add, old, sent))
            metrics["bytes_down_client"] = jnp.where(any_client, jnp.round(down), 0).astype(jnp.int32)
        server = tree_where(any_client, server, state.server)
        clients = jax.tree.map(lambda a, b: a.at[ids].set(b, mode="drop"), state.clients, new_states)
        nan = jnp.float32(jnp.nan)
        metrics.update({("train_" + k if k == "loss" else "client_" + k): jnp.where(any_client, v / denom, nan)
                        for k, v in met_sum.items()})
        metrics.update({"server_" + k: jnp.where(any_client, v, nan) for k, v in server_metrics.items()})
        metrics["weight_sum"] = w_sum
        metrics["clients_contributing"] = contributing.astype(jnp.int32)
        metrics["bytes_up_clients"] = client_bytes  # [Cp] int32, exact (0 for padding and dropped clients)
        if self.algorithm.init_client is not None:
            metrics["cohort"] = cohort  # whose persistent state changed (incremental checkpoints)
        return SimState(state.round + 1, server, clients, state.key), metrics

    def _rounds(self, state: SimState, data: FederatedData, num_rounds: int):
        return jax.lax.scan(lambda s, _: self._round(s, data), state, None, length=num_rounds)

    # ------------------------------------------------------------------ API
    def step(self, state: SimState, data: FederatedData) -> tuple[SimState, dict[str, jax.Array]]:
        """One round (compiled once, then reused). Returns when the round is done.

        Blocking is deliberate: XLA:CPU's in-process collectives can deadlock
        when several multi-device executions are queued at once (seen with
        jaxlib 0.10 on 2 cores). Use :meth:`run` to amortise dispatch instead.
        """
        return jax.block_until_ready(self._step(state, data))

    def run(self, state: SimState, data: FederatedData, num_rounds: int):
        """``num_rounds`` rounds in one dispatch (``lax.scan``); metrics stacked ``[R]``."""
        return jax.block_until_ready(self._run(state, data, int(num_rounds)))

    def round_bytes(self) -> tuple[int, int]:
        """``(bytes_up, bytes_down)`` of one full round without compression or dropped
        clients. The round's metrics carry the exact per-client ``bytes_up_clients``
        (and ``bytes_down_client`` with downlink compression)."""
        return self.cohort_size * self.bytes_up_per_client, self.cohort_size * self.bytes_down_per_client

    def lower(self, state: SimState, data: FederatedData):
        """The lowered round (for inspecting HLO or compile time)."""
        return self._step.lower(state, data)
