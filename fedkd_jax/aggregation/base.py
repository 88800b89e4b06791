"""The aggregation chain: what happens between a client's update and the server's step.

Shape key: ``C`` clients contributing to a round.

Like ``optax.chain``, an aggregator is a list of small transforms, each an
``init`` / ``encode`` / ``finalize`` triple with its own state (a pytree in
the simulation state, updated by the server each round)::

    client (inside the compiled round, per client, in chain order):
        update ─► encode_1 ─► encode_2 ─► ... ─► payload        e.g. compress, clip, weigh, fixed point, mask
    all-reduce: the payloads are summed (floats as floats, integers modulo 2^bits)
    server (in reverse chain order):
        sum ─► finalize_k ─► ... ─► finalize_1 ─► mean update   e.g. unmask, decode, add noise, divide

The payload is a dict ``{"update": ..., "aux": ...}``: ``aux`` holds values
the server derives from each upload (FedDF's ensemble logits), computed
after the transforms marked ``before_aux`` (compression: the server sees the
decompressed update). Later transforms see both, so a privacy mechanism
covers everything the server learns about a client.

A transform reads ``ClientIn`` / ``ServerIn`` and may add per-client
``stats`` (scalars summed over contributing clients, e.g. how many were
clipped) that its ``finalize`` receives summed. A new mechanism is one file
defining a factory that returns a :class:`Transform`, plus a registry line.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax


class ClientIn(NamedTuple):
    """What an ``encode`` sees besides the payload.

    Attributes:
      key: the client's key for this transform (distinct per transform).
      round: int32 round index.
      state: the transform's state (as of the round's start).
      weight: the client's aggregation weight (0: it does not contribute).
      aux_weight: its weight in the ``aux`` average.
      position: the client's position in the padded cohort.
      ids: ``[Cp]`` ids of the whole cohort (``N`` for padding), e.g. for pairwise masks.
      contributes: ``[Cp]`` bool, which cohort positions upload this round.
      client_id: this client's id.
      round_key: the round's key, the same for every client (e.g. for seeds
        two clients must agree on, as a key agreement would give them).
      setup: what ``encode.cohort_setup(round_key, ids)`` returned, computed once
        per round for the whole cohort (e.g. secure aggregation's masking graph),
        or ``None`` when the encode has no such attribute.
    """

    key: jax.Array
    round: jax.Array
    state: Any
    weight: jax.Array
    aux_weight: jax.Array
    position: jax.Array
    ids: jax.Array
    contributes: jax.Array
    client_id: jax.Array
    round_key: jax.Array | None = None
    setup: Any = None


class ClientOut(NamedTuple):
    """What an ``encode`` returns besides the payload.

    Attributes:
      weight, aux_weight: the weights summed alongside (a transform may set them,
        e.g. DP's uniform weighting).
      payload_bytes: bytes this client now uploads, or ``None`` to keep the
        previous figure.
      stats: scalars summed over contributing clients and handed to ``finalize``.
    """

    weight: jax.Array
    aux_weight: jax.Array
    payload_bytes: jax.Array | None = None
    stats: dict[str, jax.Array] = {}


class ServerIn(NamedTuple):
    """What a ``finalize`` sees besides the summed payload.

    Attributes:
      key: the server's key for this transform.
      round: int32 round index.
      state: the transform's state.
      weight_sum, aux_weight_sum: summed weights of the contributing clients.
      contributing: number of contributing clients.
      stats: every transform's per-client stats, summed.
      ids: ``[Cp]`` cohort ids; contributes: ``[Cp]`` bool.
      round_key: the round's key (as in ``ClientIn``).
    """

    key: jax.Array
    round: jax.Array
    state: Any
    weight_sum: jax.Array
    aux_weight_sum: jax.Array
    contributing: jax.Array
    stats: dict[str, jax.Array]
    ids: jax.Array
    contributes: jax.Array
    round_key: jax.Array | None = None


class Transform(NamedTuple):
    """One step of the chain.

    Attributes:
      name: registry name (also the key of its state and metrics).
      init: ``(update_template) -> state``.
      encode: ``(payload, ClientIn) -> (payload, ClientOut)`` or ``None``.
      finalize: ``(payload_sum, ServerIn) -> (payload_sum, state, metrics)`` or ``None``.
      before_aux: run before the server's ``aux`` is derived (compression).
      integer_payload: the payload leaves it produces are integers summed modulo 2^bits.
    """

    name: str
    init: Callable[[Any], Any]
    encode: Callable | None = None
    finalize: Callable | None = None
    before_aux: bool = False
    integer_payload: bool = False


def no_state(_template: Any) -> tuple:
    return ()


class Aggregator(NamedTuple):
    """An ordered chain of transforms (see the module docstring)."""

    transforms: tuple[Transform, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.transforms)

    def init(self, update_template: Any) -> dict[str, Any]:
        return {t.name: t.init(update_template) for t in self.transforms}

    @property
    def integer_payload(self) -> bool:
        return any(t.integer_payload for t in self.transforms)


def chain(*transforms: Transform) -> Aggregator:
    names = [t.name for t in transforms]
    if len(set(names)) != len(names):
        raise ValueError(f"a chain holds each transform once; got {names}")
    return Aggregator(tuple(transforms))
