"""FD: federated distillation of per-label mean logits, across any architectures.

Jeong et al. 2018, "Communication-Efficient On-Device Machine Learning:
Federated Distillation and Augmentation under Non-IID Private Data"
(NeurIPS workshop; arXiv:1811.11479), Algorithm 1.

Every client keeps its own model (any architecture of the zoo; its group's)
and optimizer state. In a round, a sampled client trains on its data with
cross-entropy plus ``beta`` times a distillation term towards the global
mean logit vector of each example's label, and accumulates, over the same
forward passes, the sum of its logits per label and the count per label.
It uploads those ``K x K + K`` numbers, whatever its architecture. The
server turns the cohort's sums into global per-label means (labels no
client of the cohort holds keep their previous vector).

Where the paper is silent or assumes full participation:

* The distillation target is the global mean itself. Algorithm 1 removes the
  device's own contribution (``(F - F_i) / (M - 1)``), which presumes every
  device uploads every round; with a sampled cohort the client's own part is
  in the global mean only when it was sampled last round, so it is not
  removed here.
* The distillation term is the temperature-scaled KL of Hinton et al. (the
  paper's ``phi`` is a cross-entropy against the averaged logits, which
  differs from the KL by the target's entropy, a constant in the client's
  parameters); it is masked for labels that have no global vector yet.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from fedkd_jax.algorithms.base import ClientData, ClientOutput, FederatedAlgorithm
from fedkd_jax.algorithms.local import scan_batches
from fedkd_jax.errors import ConfigError, concrete
from fedkd_jax.hetero.grouped import grouped
from fedkd_jax.losses.classification import cross_entropy, masked_mean
from fedkd_jax.losses.distillation import kl_rows
from fedkd_jax.models import Model


class FDState(NamedTuple):
    """Server state: ``logits [K, K]`` global mean logit vector per label; ``valid [K]`` 1
    where a label has one."""

    logits: jax.Array
    valid: jax.Array


class LocalModel(NamedTuple):
    """A client's own model and its optimizer state (persist across rounds)."""

    params: dict
    opt_state: optax.OptState


def per_class_means(old: jax.Array, valid: jax.Array, sums: jax.Array, counts: jax.Array):
    """The server's per-class vectors from the cohort's (mean) ``sums [K, V]`` and ``counts [K]``:
    ``sums / counts`` where a class was seen, else ``old``; ``valid`` marks classes ever seen."""
    have = counts > 0
    new = jnp.where(have[:, None], sums / jnp.where(have, counts, 1.0)[:, None], old)
    return new, jnp.maximum(valid, have.astype(jnp.float32))


def per_label_sums(logits: jax.Array, labels: jax.Array, where: jax.Array, num_classes: int):
    """``(sums [K, V], counts [K])``: per label, the sum of the rows of ``values`` and their number."""
    onehot = jax.nn.one_hot(labels, num_classes) * where[:, None]
    return onehot.T @ logits, jnp.sum(onehot, axis=0)


def fd(
    models: Sequence[Model],
    optimizer: optax.GradientTransformation,
    *,
    num_classes: int,
    batch_size: int,
    local_epochs: int = 1,
    local_steps: int | None = None,
    temperature: float = 1.0,
    beta: float = 1.0,
) -> FederatedAlgorithm:
    """Build FD over architecture groups (``models[g]`` is group ``g``'s model).

    Args:
      optimizer: each client's local optimizer; its state persists with the model.
      temperature: softmax temperature of the distillation term.
      beta: weight of the distillation term (the paper's ``beta``).
    """
    if concrete(temperature) and not temperature > 0:
        raise ConfigError("distill.temperature", f"must be > 0; got {temperature}")
    if concrete(beta) and not beta >= 0:
        raise ConfigError("distill.beta", f"must be >= 0; got {beta}")
    k = int(num_classes)

    def init(_key):
        return FDState(jnp.zeros((k, k), jnp.float32), jnp.zeros((k,), jnp.float32))

    def server_update(state: FDState, mean, _aux, _key, _sdata):
        logits, valid = per_class_means(state.logits, state.valid, mean["logit_sums"], mean["counts"])
        return FDState(logits, valid), {"labels_covered": jnp.sum(valid)}

    def for_model(model: Model) -> FederatedAlgorithm:
        def init_client(key):
            p = model.init(key)
            return LocalModel(p, optimizer.init(p))

        def loss_fn(params, xb, yb, where, target, valid):
            logits, _ = model.apply(params, xb)
            ce, m = cross_entropy(logits, yb, where=where)
            t = target[yb]
            kd_where = where & (valid[yb] > 0)
            kd = masked_mean(kl_rows(t, logits, temperature), kd_where) * temperature**2
            return ce + beta * kd, ({**m, "distill": kd}, jax.lax.stop_gradient(logits))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def client_update(server: FDState, cs: LocalModel, data: ClientData, key) -> ClientOutput:
            def step(carry, xb, yb, where):
                p, opt, sums, counts = carry
                (_, (m, logits)), g = grad_fn(p, xb, yb, where, server.logits, server.valid)
                u, opt = optimizer.update(g, opt, p)
                s, c = per_label_sums(logits, yb, where, k)
                return (optax.apply_updates(p, u), opt, sums + s, counts + c), m

            zero = (data.count * 0).astype(jnp.float32)
            carry = (cs.params, cs.opt_state, jnp.zeros((k, k)) + zero, jnp.zeros((k,)) + zero)
            (p, opt, sums, counts), metrics = scan_batches(
                step, carry, data.x, data.y, data.count, key,
                batch_size=batch_size, epochs=local_epochs, steps=local_steps)
            up = {"logit_sums": sums, "counts": counts}
            return ClientOutput(up, (data.count > 0).astype(jnp.float32), LocalModel(p, opt), metrics)

        return FederatedAlgorithm(
            name="fd", model=model, init=init, init_client=init_client, broadcast=lambda s: s,
            client_update=client_update, server_update=server_update, model_params=lambda s: None,
            personal_model=model, personal_params=lambda cs: cs.params,
        )

    return grouped([for_model(m) for m in models], name="fd")
