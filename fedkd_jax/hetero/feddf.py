"""FedDF across architectures: a prototype model per group, fused by ensemble distillation.

Lin et al. 2020, "Ensemble Distillation for Robust Model Fusion in Federated
Learning" (NeurIPS), Section 4 / Algorithm 3 ("heterogeneous" setting);
reference code epfml/federated-learning-public-code, ``codes/FedDF-code``.

The server keeps one *prototype* model per architecture group. A sampled
client downloads its group's prototype, trains it on its data (as in
FedAvg) and uploads the delta. The server then

1. averages each group's deltas (weighted by example counts) and applies
   its optimizer: FedAvg within the group;
2. distils *every* prototype towards the ensemble of *all* received models,
   of every architecture: the uniform mean of their logits on the unlabeled
   proxy set, with FedDF's loss, optimizer, schedule and early stopping
   (:func:`~fedkd_jax.algorithms.server_distill.distill_on_proxy`, as in the
   homogeneous :mod:`~fedkd_jax.algorithms.feddf`).

The uploads cross the groups in one fixed-shape payload: a slot per group's
parameters, where a client fills its own group's slot with its delta (zeros
elsewhere) and a 1 in that group's indicator; the engine's mean weighs both
by the client's example count, so one all-reduce sums every group's FedAvg
numerator and denominator. Each
client is charged only its own delta's bytes. The ensemble's logits are
computed from each client's trained model as the server would compute them
from the upload (this costs no upload).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedkd_jax.algorithms.base import ClientOutput, FederatedAlgorithm
from fedkd_jax.algorithms.fedavg import FedAvgState, local_sgd_algorithm
from fedkd_jax.algorithms.feddf import distill_optimizer, validation_score
from fedkd_jax.algorithms.server_distill import check_proxy, distill_on_proxy, split_validation
from fedkd_jax.errors import ConfigError
from fedkd_jax.hetero.grouped import grouped
from fedkd_jax.models import Model
from fedkd_jax.tree_util import tree_bytes


class HeteroDFState(NamedTuple):
    """Per group: the prototype's parameters and the server optimizer's state (tuples)."""

    params: tuple
    opt_state: tuple


def feddf_hetero(
    models: Sequence[Model],
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    proxy_x: Any,
    *,
    batch_size: int,
    proxy_y: Any = None,
    local_epochs: int = 1,
    local_steps: int | None = None,
    distill_steps: int = 50,
    distill_lr: float = 1e-3,
    distill_batch_size: int = 64,
    schedule: str = "cosine",
    val_fraction: float = 0.1,
    val_every: int = 10,
    patience: int = 2,
    temperature: float = 1.0,
) -> FederatedAlgorithm:
    """Build FedDF over architecture groups (``models[g]`` is group ``g``'s prototype)."""
    models = list(models)
    proxy = check_proxy(proxy_x, models[0], "feddf")
    if distill_steps < 1:
        raise ConfigError("distill.server_steps", f"must be a positive integer; got {distill_steps}")
    if not 0 <= val_fraction < 1:
        raise ConfigError("distill.val_fraction", f"must be in [0, 1); got {val_fraction}")
    train_rows, val_rows = split_validation(proxy.shape[0], val_fraction)
    labels = None if proxy_y is None else jnp.asarray(np.asarray(proxy_y)[val_rows], jnp.int32)
    bases = [local_sgd_algorithm("feddf", m, client_optimizer, server_optimizer, batch_size=batch_size,
                                 local_epochs=local_epochs, local_steps=local_steps) for m in models]
    distill_opt = distill_optimizer(distill_lr, distill_steps, schedule)
    shapes = [jax.eval_shape(m.init, jax.random.key(0)) for m in models]
    n = len(models)

    def init(key):
        states = [b.init(jax.random.fold_in(key, g)) for g, b in enumerate(bases)]
        return HeteroDFState(tuple(s.params for s in states), tuple(s.opt_state for s in states))

    def distill(g, params, target, key, sdata):
        model, px = models[g], sdata["proxy"]
        val_score = validation_score(model.apply, px, target, val_rows, labels, temperature)
        out, _, m = distill_on_proxy(model.apply, params, distill_opt.init(params), distill_opt, px[train_rows],
                                     target[train_rows], key, steps=distill_steps, batch_size=distill_batch_size,
                                     temperature=temperature, val_score=val_score, val_every=val_every,
                                     patience=patience)
        return out, m

    def server_update(state: HeteroDFState, mean, ensemble, key, sdata):
        params, opts, metrics = [], [], {}
        for g, b in enumerate(bases):
            wg = mean["w"][g]
            delta = jax.tree.map(lambda d: d / jnp.where(wg > 0, wg, 1.0), mean["deltas"][g])
            avg, _ = b.server_update(FedAvgState(state.params[g], state.opt_state[g]), delta, (),
                                     jax.random.fold_in(key, 2 * g))
            p = jax.tree.map(lambda a, o: jnp.where(wg > 0, a, o), avg.params, state.params[g])
            o = jax.tree.map(lambda a, o: jnp.where(wg > 0, a, o), avg.opt_state, state.opt_state[g])
            p, m = distill(g, p, ensemble, jax.random.fold_in(key, 2 * g + 1), sdata)
            params.append(p)
            opts.append(o)
            metrics.update({f"g{g}_{k}": v for k, v in m.items()})
        return HeteroDFState(tuple(params), tuple(opts)), metrics

    def for_group(g: int) -> FederatedAlgorithm:
        model, base = models[g], bases[g]

        def client_update(bcast, cs, data, key) -> ClientOutput:
            state, sdata = bcast
            out = base.client_update(state.params[g], cs, data, key)
            # the engine's mean weighs the slots by the client's weight (example count), so each
            # group's mean delta is deltas[g] / w[g]
            deltas = tuple(out.update if h == g else
                           jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[h]) for h in range(n))
            ws = jnp.zeros((n,)).at[g].set(1.0)
            trained = jax.tree.map(jnp.add, state.params[g], out.update)
            logits = model.apply(trained, sdata["proxy"])[0]
            sent = (out.weight > 0).astype(jnp.float32)
            return ClientOutput({"deltas": deltas, "w": ws}, out.weight, cs, out.metrics,
                                upload_bytes=tree_bytes(out.update), aux=logits, aux_weight=sent)

        return FederatedAlgorithm(
            name="feddf", model=model, init=init, init_client=None, broadcast=lambda s: s,
            client_update=client_update, server_update=server_update, model_params=lambda s: s.params[g],
            download_bytes=tree_bytes(shapes[g]), server_data={"proxy": np.asarray(proxy)},
            clients_see_server_data=True,
        )

    alg = grouped([for_group(g) for g in range(n)], name="feddf")
    return alg._replace(model_params=lambda s: None,
                        download_bytes=max(tree_bytes(s) for s in shapes))
