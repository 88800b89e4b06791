"""FedDF: ensemble distillation for robust model fusion.

Lin et al. 2020, "Ensemble Distillation for Robust Model Fusion in Federated
Learning" (NeurIPS); reference code: epfml/federated-learning-public-code,
``codes/FedDF-code``.

Clients train as in FedAvg and upload their models. The server first
averages them (FedAvg with the server optimizer). It then distils the
cohort's ensemble into that average on an unlabeled proxy set, inside the
same compiled round:

* **Target:** the *uniform* mean of the cohort models' logits (the paper's
  ``avg_logits``: every contributing model counts once, whatever its data
  size). The engine evaluates each client's model *as the server receives
  it* (global + decompressed delta) on the proxy set (``aux_from_update``),
  as a real server would from the uploads; this adds no uploaded bytes.
* **Loss:** ``T^2 KL(ensemble_T || model_T)``, averaged over the batch
  (``reduction="batchmean"``; the paper uses ``T = 1``, where ``T^2 = 1``).
* **Optimizer:** Adam (lr ``distill_lr``, 1e-3 in the paper) with a fresh
  state every round, the learning rate cosine-annealed to 0 over the step
  budget, gradients clipped to global norm 5, as in the reference code.
* **Batches:** passes over the proxy without replacement.
* **Early stopping:** a held-out validation part of the proxy
  (``val_fraction``) is checked before distillation and every ``val_every``
  steps; after ``patience`` checks without improvement the server stops and
  keeps the best-scoring parameters (possibly the plain average). The score
  is accuracy when the proxy's labels are known to the server (the
  reference code validates on a labeled split of the task's training data),
  otherwise the KL divergence to the ensemble on the validation rows.
  ``val_fraction = 0`` gives a fixed budget of ``distill_steps`` steps.

The paper's budget is 10^4 steps with validation every 100 and patience
10^3 (10 checks); the defaults here scale that down to CPU rounds
(``distill.server_steps``, ``distill.val_every``, ``distill.patience``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedkd_jax.algorithms.base import ClientData, ClientOutput, FederatedAlgorithm
from fedkd_jax.algorithms.fedavg import FedAvgState, local_sgd_algorithm
from fedkd_jax.algorithms.server_distill import check_proxy, distill_on_proxy, proxy_logits, split_validation
from fedkd_jax.errors import ConfigError, concrete
from fedkd_jax.losses import kd_loss
from fedkd_jax.models import Model, Params
from fedkd_jax.tree_util import tree_bytes

SCHEDULES = ("cosine", "constant")


class FedDFState(NamedTuple):
    """Global parameters and the server optimizer's state (the proxy set is
    server *data*: ``FederatedAlgorithm.server_data["proxy"]``)."""

    params: Params
    opt_state: optax.OptState


def distill_optimizer(lr: float, steps: int, schedule: str, clip_norm: float | None = 5.0) -> optax.GradientTransformation:
    """FedDF's server optimizer: Adam, cosine-annealed over ``steps``, gradient-norm clipped."""
    if schedule not in SCHEDULES:
        raise ConfigError("distill.server_schedule", f"unknown value {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    rate = optax.cosine_decay_schedule(lr, steps) if schedule == "cosine" else lr
    adam = optax.adam(rate)
    return optax.chain(optax.clip_by_global_norm(clip_norm), adam) if clip_norm else adam


def validation_score(apply, proxy_x, target, val_rows, labels, temperature):
    """FedDF's early-stopping score on the proxy's validation rows (lower is better): minus the
    accuracy when the server knows their ``labels``, else the KL to the ensemble ``target``;
    ``None`` without validation rows."""
    if not len(val_rows):
        return None
    vx, vt = proxy_x[val_rows], target[val_rows]
    if labels is not None:
        return lambda p: -jnp.mean((jnp.argmax(apply(p, vx)[0], -1) == labels).astype(jnp.float32))
    return lambda p: kd_loss(apply(p, vx)[0], vt, temperature=temperature)[0]


def feddf(
    model: Model,
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
    logit_weight: float = 1.0,
) -> FederatedAlgorithm:
    """Build FedDF (see the module docstring).

    Args:
      proxy_x: ``[P, D]`` the server's unlabeled proxy data.
      proxy_y: optional ``[P]`` labels of the proxy, used only to score the
        validation rows (early stopping), never to distil.
      distill_steps: the step budget per round (the most, with early stopping).
      val_fraction: share of the proxy held out for early stopping (0: none).
      logit_weight: the uploaded logit differences are multiplied by it (and the
        aggregate divided by it): their share of DP's joint clip (see the README).
    """
    proxy = check_proxy(proxy_x, model, "feddf")
    if concrete(temperature) and not temperature > 0:
        raise ConfigError("distill.temperature", f"must be > 0; got {temperature}")
    if distill_steps < 1:
        raise ConfigError("distill.server_steps", f"must be a positive integer; got {distill_steps}")
    if not 0 <= val_fraction < 1:
        raise ConfigError("distill.val_fraction", f"must be in [0, 1); got {val_fraction}")
    train_rows, val_rows = split_validation(proxy.shape[0], val_fraction)
    labels = None if proxy_y is None else jnp.asarray(np.asarray(proxy_y)[val_rows], jnp.int32)
    base = local_sgd_algorithm(
        "feddf", model, client_optimizer, server_optimizer,
        batch_size=batch_size, local_epochs=local_epochs, local_steps=local_steps,
    )
    distill_opt = distill_optimizer(distill_lr, distill_steps, schedule)

    def init(key: jax.Array) -> FedDFState:
        s = base.init(key)
        return FedDFState(s.params, s.opt_state)

    def client_update(bcast, cs, data: ClientData, key: jax.Array) -> ClientOutput:
        out = base.client_update(bcast, cs, data, key)
        # the ensemble is the uniform mean over contributing models (avg_logits)
        return out._replace(aux_weight=(out.weight > 0).astype(jnp.float32))

    def aux_from_update(params, delta, sdata):
        # the server's view of this client's model (global + decompressed delta), as logits
        # *relative to the global model's*: what the client adds, small like its delta, so
        # DP's joint clip of (delta, logits) does not spend its budget on the global logits
        proxy = sdata["proxy"]
        return logit_weight * (proxy_logits(model.apply, jax.tree.map(jnp.add, params, delta), proxy)
                               - proxy_logits(model.apply, params, proxy))

    def server_update(state: FedDFState, mean_delta, mean_dlogits, key: jax.Array, sdata):
        avg, _ = base.server_update(FedAvgState(state.params, state.opt_state), mean_delta, (), key)
        proxy_rows = sdata["proxy"]
        # the ensemble: the global model's logits plus the mean difference (= mean client logits)
        mean_logits = proxy_logits(model.apply, state.params, proxy_rows) + mean_dlogits / logit_weight
        val_score = validation_score(model.apply, proxy_rows, mean_logits, val_rows, labels, temperature)
        params, _, m = distill_on_proxy(
            model.apply, avg.params, distill_opt.init(avg.params), distill_opt, proxy_rows[train_rows],
            mean_logits[train_rows], key, steps=distill_steps, batch_size=distill_batch_size,
            temperature=temperature, val_score=val_score, val_every=val_every, patience=patience,
        )
        return FedDFState(params, avg.opt_state), m

    return FederatedAlgorithm(
        name="feddf",
        model=model,
        init=init,
        init_client=None,
        broadcast=lambda state: state.params,
        client_update=client_update,
        server_update=server_update,
        model_params=lambda state: state.params,
        download_bytes=tree_bytes(jax.eval_shape(model.init, jax.random.key(0))),
        aux_from_update=aux_from_update,
        server_data={"proxy": np.asarray(proxy)},
    )
