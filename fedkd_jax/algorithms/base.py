"""The algorithm interface the round builder composes.

An algorithm is a factory returning a :class:`FederatedAlgorithm`: a
NamedTuple of pure functions (like optax's ``GradientTransformation`` or
fedjax's ``FederatedAlgorithm``). Hyperparameters live in the closure. The
engine never branches on which algorithm it runs: it samples the cohort,
calls ``client_update`` for every cohort client (scanned, sharded), optionally
compresses each ``ClientOutput.update``, averages updates (and ``aux``) with
``ClientOutput.weight`` in one all-reduce, calls ``server_update``, and writes
per-client state back.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from fedkd_jax.models import Model, Params

ServerState = Any
ClientState = Any  # persistent per-client state; () when the algorithm has none
Broadcast = Any  # what the server sends each cohort client


# ``ClientData.straggler`` codes, set by the engine from the cohort's draw.
FULL_WORK, STRAGGLER, LEGACY_STRAGGLER = 0, 1, 2


class ClientData(NamedTuple):
    """One client's padded local training data and this round's conditions.

    Attributes:
      x: ``[M, D]`` features; y: ``[M]`` labels; count: scalar, real rows.
      straggler: int32 scalar: ``FULL_WORK`` (0); ``STRAGGLER`` (1), a FedProx
        straggler doing a uniform random amount of work strictly below its full
        local work (whole epochs when ``E >= 2``); ``LEGACY_STRAGGLER`` (2), the older draw, up to full work.
    """

    x: jax.Array
    y: jax.Array
    count: jax.Array
    straggler: Any = FULL_WORK


class ClientOutput(NamedTuple):
    """What one client returns from a round.

    Attributes:
      update: pytree averaged over the cohort with ``weight`` (what is uploaded).
      weight: scalar aggregation weight (example count for FedAvg).
      state: the client's new persistent state (``()`` if none).
      metrics: scalars, averaged over the cohort with ``weight``.
      upload_bytes: scalar bytes this client transmits, when not simply the
        size of ``update`` (or of its compressed payload): ``None``.
      aux: pytree averaged like ``update`` but neither uploaded, compressed
        nor counted: values the server would compute itself from what it
        received (e.g. FedDF's ensemble logits on the server's proxy set,
        which a real server gets by running each uploaded model).
      aux_weight: weight of this client in the ``aux`` average (``None``: the
        same as ``weight``). FedDF averages its ensemble uniformly over the
        contributing clients, not by example count.
    """

    update: Any
    weight: jax.Array
    state: ClientState
    metrics: dict[str, jax.Array]
    upload_bytes: jax.Array | None = None
    aux: Any = ()
    aux_weight: jax.Array | None = None


class FederatedAlgorithm(NamedTuple):
    """Pure functions defining one federated algorithm.

    Attributes:
      name: algorithm name.
      model: the global (shared) model; evaluation applies it to ``model_params``.
      init: ``key -> ServerState``.
      init_client: ``key -> ClientState`` for one client, or ``None`` if stateless.
      broadcast: ``ServerState -> Broadcast`` (what each client downloads).
      client_update: ``(Broadcast, ClientState, ClientData, key) -> ClientOutput``.
      server_update: ``(ServerState, mean_update, mean_aux, key, server_data) -> (ServerState, metrics)``;
        means are weighted by ``ClientOutput.weight`` over the cohort.
      model_params: ``ServerState -> Params`` of the global model.
      download_bytes: bytes each cohort client downloads, when not simply the
        size of ``broadcast(state)`` (``None``).
      personal_model: model of per-client personalised parameters (e.g. FedKD's
        private teachers), evaluated on each client's local test split.
      personal_params: ``ClientState -> Params`` of that model.
      aux_from_update: ``(Broadcast, update, server_data) -> aux``, called by the engine on
        the update *as the server receives it* (after compression). Use it for
        values the server derives from uploads, e.g. FedDF's ensemble logits.
      with_model_params: ``(ServerState, Params) -> ServerState`` replacing the
        global model's parameters (used by downlink compression: the server
        keeps the model its clients can reconstruct). Default: ``state._replace(params=...)``.
      supports_stragglers: whether ``client_update`` honours ``ClientData.straggler``.
      server_data: arrays only the server holds (e.g. FedDF's proxy set), placed
        on the devices once and passed to ``server_update`` and
        ``aux_from_update``: data, not state, so checkpoints never copy it.
      group_updates: architecture groups (:mod:`fedkd_jax.hetero`): group ``g``'s
        ``client_update`` (same signature; every group returns the same upload
        structure). Empty: every client runs ``client_update``.
      clients_see_server_data: ``client_update`` receives ``(broadcast, server_data)``:
        data every client already holds (FedMD's public set), not downloaded.
      groups: per group, a view of the algorithm for that group's clients
        (its own ``model``, ``personal_model`` and ``personal_params`` over the
        shared client state), used by per-group evaluation.
    """

    name: str
    model: Model
    init: Callable[[jax.Array], ServerState]
    init_client: Callable[[jax.Array], ClientState] | None
    broadcast: Callable[[ServerState], Broadcast]
    client_update: Callable[[Broadcast, ClientState, ClientData, jax.Array], ClientOutput]
    server_update: Callable[[ServerState, Any, Any, jax.Array, Any], tuple[ServerState, dict]]
    model_params: Callable[[ServerState], Params]
    download_bytes: int | None = None
    personal_model: Model | None = None
    personal_params: Callable[[ClientState], Params] | None = None
    aux_from_update: Callable[[Broadcast, Any, Any], Any] | None = None
    with_model_params: Callable[[ServerState, Params], ServerState] | None = None
    supports_stragglers: bool = False
    server_data: Any = ()
    group_updates: tuple = ()
    groups: tuple = ()
    clients_see_server_data: bool = False

    def set_model_params(self, state: ServerState, params: Params) -> ServerState:
        if self.with_model_params is not None:
            return self.with_model_params(state, params)
        return state._replace(params=params)
