"""FedAvg and its server-optimizer variants.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS); server optimizers from Reddi et al. 2021,
"Adaptive Federated Optimization" (ICLR).

Each cohort client starts from the global parameters, runs local training on
its data, and uploads its delta; the server averages deltas weighted by
example counts and applies ``server_optimizer`` to the negated mean delta.

Straggler simulation (FedProx's comparison, Li et al. 2020, Sec. 5.2): the
engine marks exactly ``C - round(C * (1 - fraction))`` clients of each cohort
as stragglers (``ClientData.straggler``; the count of FedProx's reference
code, :func:`fedkd_jax.engine.cohort.straggler_count`). As in that code, with
``E >= 2`` local epochs a straggler trains a uniform random number of *whole
epochs* in ``1 .. E - 1``. With one epoch (where the reference code's
``randint(1, 1)`` has no value) or in ``local_steps`` mode, it takes a uniform
random number of real steps in ``1 .. full - 1``; a client whose full work is
a single step then does none. FedAvg drops stragglers (weight 0, nothing
uploaded); FedProx (``fedkd_jax.algorithms.fedprox``) keeps their partial work,
but a straggler left with zero steps contributes nothing: no count, no zero
delta in the mean, no upload bytes. The older per-client coin flip with up to
full work is ``straggler_mode="bernoulli"`` in the engine.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedkd_jax.algorithms.base import FULL_WORK, LEGACY_STRAGGLER, STRAGGLER, ClientData, ClientOutput, FederatedAlgorithm
from fedkd_jax.algorithms.local import local_train, real_steps
from fedkd_jax.errors import ConfigError, concrete
from fedkd_jax.losses import cross_entropy
from fedkd_jax.models import Model, Params

_STRAGGLER = 0x57A6  # folded into the client key for the straggler draw


class FedAvgState(NamedTuple):
    """Server state: global parameters and the server optimizer's state."""

    params: Params
    opt_state: optax.OptState


def straggler_steps(key: jax.Array, code: jax.Array, full: jax.Array, *, epochs: int = 1) -> jax.Array:
    """Real local steps a client may take this round, given its ``ClientData.straggler`` code.

    ``FULL_WORK``: ``full``. ``STRAGGLER``: with ``epochs >= 2`` (static; ``full``
    is then ``epochs`` times the client's steps per epoch), ``e`` whole epochs,
    ``e`` uniform in ``1 .. epochs - 1`` (FedProx's reference code); with one
    epoch, uniform in ``1 .. full - 1`` steps (0 when ``full < 2``: no partial
    amount exists). ``LEGACY_STRAGGLER``: uniform in ``1 .. full``.
    """
    k = jax.random.fold_in(key, _STRAGGLER)
    if epochs >= 2:
        below = jax.random.randint(k, (), 1, epochs) * (full // epochs)
    else:
        below = jnp.where(full >= 2, jax.random.randint(k, (), 1, jnp.maximum(full, 2)), 0)
    legacy = jnp.minimum(jax.random.randint(k, (), 1, jnp.maximum(full, 1) + 1), full)
    code = jnp.asarray(code)
    return jnp.where(code == STRAGGLER, below, jnp.where(code == LEGACY_STRAGGLER, legacy, full))


def server_sgd_update(server_optimizer: optax.GradientTransformation):
    """``server_update`` of FedAvg-style algorithms: optimizer step on ``-mean_delta``."""

    def server_update(state: FedAvgState, mean_delta, mean_aux, key: jax.Array, server_data=()):
        del mean_aux, key, server_data
        grads = jax.tree.map(lambda d: -d, mean_delta)
        updates, opt_state = server_optimizer.update(grads, state.opt_state, state.params)
        return FedAvgState(optax.apply_updates(state.params, updates), opt_state), {}

    return server_update


def local_sgd_algorithm(
    name: str,
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    local_epochs: int = 1,
    local_steps: int | None = None,
    proximal_mu: float = 0.0,
    drop_stragglers: bool = True,
) -> FederatedAlgorithm:
    """Shared body of FedAvg and FedProx (see the module docstrings)."""
    if concrete(proximal_mu) and proximal_mu < 0:
        raise ConfigError("fedprox.mu", f"must be >= 0; got {proximal_mu}")

    def init(key: jax.Array) -> FedAvgState:
        params = model.init(key)
        return FedAvgState(params, server_optimizer.init(params))

    def client_update(params: Params, client_state, data: ClientData, key: jax.Array) -> ClientOutput:
        def loss_fn(p, x, y, where):
            logits, _ = model.apply(p, x)
            loss, m = cross_entropy(logits, y, where=where)
            if not concrete(proximal_mu) or proximal_mu > 0:
                sq = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)))
                loss = loss + 0.5 * proximal_mu * sq
            return loss, m

        weight = data.count.astype(jnp.float32)
        full = real_steps(data.count, data.x.shape[0], batch_size, epochs=local_epochs, steps=local_steps)
        cap = straggler_steps(key, data.straggler, full, epochs=local_epochs if local_steps is None else 1)
        if drop_stragglers:
            weight = jnp.where(jnp.asarray(data.straggler) != FULL_WORK, 0.0, weight)
        weight = jnp.where(cap > 0, weight, 0.0)  # no step taken: nothing to contribute or upload
        new_params, metrics = local_train(
            loss_fn, params, client_optimizer, data.x, data.y, data.count, key,
            batch_size=batch_size, epochs=local_epochs, steps=local_steps, max_real_steps=cap,
        )
        delta = jax.tree.map(lambda a, b: a - b, new_params, params)
        return ClientOutput(delta, weight, client_state, metrics)

    return FederatedAlgorithm(
        name=name,
        model=model,
        init=init,
        init_client=None,
        broadcast=lambda state: state.params,
        client_update=client_update,
        server_update=server_sgd_update(server_optimizer),
        model_params=lambda state: state.params,
        supports_stragglers=True,
    )


def fedavg(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    local_epochs: int = 1,
    local_steps: int | None = None,
) -> FederatedAlgorithm:
    """Build FedAvg (or FedAvgM / FedAdam / FedYogi via ``server_optimizer``).

    Args:
      model: the shared model.
      client_optimizer: local optax optimizer, re-initialised every round.
      server_optimizer: optax optimizer applied to ``-mean_delta``
        (``optax.sgd(1.0)`` is plain FedAvg).
      batch_size: local batch size ``B``.
      local_epochs: local epochs ``E`` (ignored when ``local_steps`` is set).
      local_steps: fixed number of local steps instead of epochs.

    Stragglers (the engine's ``straggler_fraction``) are dropped.
    """
    return local_sgd_algorithm(
        "fedavg", model, client_optimizer, server_optimizer,
        batch_size=batch_size, local_epochs=local_epochs, local_steps=local_steps, drop_stragglers=True,
    )
