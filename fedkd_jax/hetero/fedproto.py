"""FedProto: clients exchange class prototypes, not models.

Tan et al. 2022, "FedProto: Federated Prototype Learning across Heterogeneous
Clients" (AAAI), Algorithm 1; reference code yuetan031/FedProto.

Every client keeps its own model (its group's architecture) and optimizer
state. In a round, a sampled client trains with cross-entropy plus
``lambda`` times the squared distance between each example's representation
and the global prototype of its class (mean over the representation's
coordinates, as the reference code's ``nn.MSELoss``; classes without a
global prototype yet are left out). After training it computes its local
prototypes, the mean representation of each class over its data, and
uploads them with their counts. The server's prototype of class ``k`` is the
count-weighted mean of the clients' prototypes of ``k`` (classes no client
of the cohort holds keep their previous prototype).

Representations. With one architecture, or architectures whose feature
widths agree, the representation is the model's penultimate feature (the
input of its last layer), as in the paper. Architectures of different
feature widths get a shared prototype width ``P``: each client's model then
ends in a linear projection of its features to ``P`` followed by a new
linear classifier on the projection (the zoo model's own last layer is not
used). Both are part of the client's model and trained by the same loss, so
the cross-entropy keeps the projected space discriminative while the
prototype term aligns it across clients (HtFLlib's heterogeneous FedProto
does the same with a per-model head of a common feature width).

Inference is reported both ways: the classifier's argmax, and the nearest
global prototype to the representation (the paper's accuracy).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from fedkd_jax.algorithms.base import ClientData, ClientOutput, FederatedAlgorithm
from fedkd_jax.algorithms.local import scan_batches
from fedkd_jax.errors import ConfigError, concrete
from fedkd_jax.hetero.fd import LocalModel, per_class_means, per_label_sums
from fedkd_jax.hetero.grouped import grouped
from fedkd_jax.losses.classification import cross_entropy, masked_mean
from fedkd_jax.models import Model


class ProtoState(NamedTuple):
    """Server state: ``protos [K, P]`` global class prototypes; ``valid [K]`` 1 where a class has one."""

    protos: jax.Array
    valid: jax.Array


def with_projection(model: Model, dim: int, num_classes: int) -> Model:
    """``model`` with its features projected linearly to ``dim`` and a new linear classifier on them.

    Params: ``{"body": model params, "proj": {"kernel" [F, P], "bias"}, "head": {"kernel" [P, K], "bias"}}``;
    ``apply`` returns ``(logits [B, K], projected features [B, P])``.
    """
    f = model.feature_dim

    def init(key):
        kb, kp, kh = jax.random.split(key, 3)
        return {"body": model.init(kb),
                "proj": {"kernel": jax.random.normal(kp, (f, dim)) * jnp.sqrt(1.0 / f), "bias": jnp.zeros((dim,))},
                "head": {"kernel": jax.random.normal(kh, (dim, num_classes)) * jnp.sqrt(1.0 / dim),
                         "bias": jnp.zeros((num_classes,))}}

    def apply(params, x):
        _, feat = model.apply(params["body"], x)
        z = feat @ params["proj"]["kernel"] + params["proj"]["bias"]
        return z @ params["head"]["kernel"] + params["head"]["bias"], z

    n = model.num_params + f * dim + dim + dim * num_classes + num_classes
    return Model(init, apply, n, dim, f"{model.name}+proj{dim}", model.in_features)


def nearest_prototype(features: jax.Array, protos: jax.Array, valid: jax.Array) -> jax.Array:
    """``[B]`` class of the nearest valid prototype to each row of ``features [B, P]``."""
    d = jnp.sum((features[:, None, :] - protos[None]) ** 2, axis=-1)
    return jnp.argmin(jnp.where(valid[None] > 0, d, jnp.inf), axis=-1)


def prototype_models(models: Sequence[Model], num_classes: int, proto_dim: int | None) -> tuple[list[Model], int]:
    """The clients' models and the prototype width ``P`` (see the module docstring)."""
    widths = {m.feature_dim for m in models}
    if proto_dim is None:
        if len(widths) > 1:
            raise ConfigError("model.proto_dim", f"the groups' feature widths differ ({sorted(widths)}); set a "
                                                 "shared prototype width, e.g. model.proto_dim=64")
        return list(models), widths.pop()
    if not (isinstance(proto_dim, int) and proto_dim > 0):
        raise ConfigError("model.proto_dim", f"must be a positive integer; got {proto_dim!r}")
    return [with_projection(m, proto_dim, num_classes) for m in models], int(proto_dim)


def fedproto(
    models: Sequence[Model],
    optimizer: optax.GradientTransformation,
    *,
    num_classes: int,
    batch_size: int,
    local_epochs: int = 1,
    local_steps: int | None = None,
    proto_lambda: float = 1.0,
    proto_dim: int | None = None,
) -> FederatedAlgorithm:
    """Build FedProto over architecture groups (``models[g]`` is group ``g``'s model)."""
    if concrete(proto_lambda) and not proto_lambda >= 0:
        raise ConfigError("distill.proto_lambda", f"must be >= 0; got {proto_lambda}")
    k = int(num_classes)
    models, p_dim = prototype_models(models, k, proto_dim)

    def init(_key):
        return ProtoState(jnp.zeros((k, p_dim), jnp.float32), jnp.zeros((k,), jnp.float32))

    def server_update(state: ProtoState, mean, _aux, _key, _sdata):
        protos, valid = per_class_means(state.protos, state.valid, mean["proto_sums"], mean["counts"])
        return ProtoState(protos, valid), {"classes_covered": jnp.sum(valid)}

    def for_model(model: Model) -> FederatedAlgorithm:
        def init_client(key):
            p = model.init(key)
            return LocalModel(p, optimizer.init(p))

        def loss_fn(params, xb, yb, where, protos, valid):
            logits, z = model.apply(params, xb)
            ce, m = cross_entropy(logits, yb, where=where)
            dist = jnp.mean((z - protos[yb]) ** 2, axis=-1)
            pl = masked_mean(dist, where & (valid[yb] > 0))
            return ce + proto_lambda * pl, {**m, "proto_loss": pl}

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def client_update(server: ProtoState, cs: LocalModel, data: ClientData, key) -> ClientOutput:
            def step(carry, xb, yb, where):
                p, opt = carry
                (_, m), g = grad_fn(p, xb, yb, where, server.protos, server.valid)
                u, opt = optimizer.update(g, opt, p)
                return (optax.apply_updates(p, u), opt), m

            (p, opt), metrics = scan_batches(step, (cs.params, cs.opt_state), data.x, data.y, data.count, key,
                                             batch_size=batch_size, epochs=local_epochs, steps=local_steps)
            # local prototypes of the trained model over the client's real rows (Algorithm 1, line 12)
            _, z = model.apply(p, data.x)
            real = jnp.arange(data.x.shape[0]) < data.count
            sums, counts = per_label_sums(z, data.y, real, k)
            up = {"proto_sums": sums, "counts": counts}
            return ClientOutput(up, (data.count > 0).astype(jnp.float32), LocalModel(p, opt), metrics)

        return FederatedAlgorithm(
            name="fedproto", model=model, init=init, init_client=init_client, broadcast=lambda s: s,
            client_update=client_update, server_update=server_update, model_params=lambda s: None,
            personal_model=model, personal_params=lambda cs: cs.params,
        )

    return grouped([for_model(m) for m in models], name="fedproto")
