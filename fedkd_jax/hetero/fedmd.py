"""FedMD: heterogeneous federated learning via model distillation on a public set.

Li & Wang 2019, "FedMD: Heterogenous Federated Learning via Model
Distillation" (NeurIPS workshop; arXiv:1910.03581), Algorithm 1; reference
code diogenes0319/FedMD_clean.

Every client owns a model of its group's architecture. Before any round it
is trained on the labeled public set (*transfer learning*, ``public_epochs``
epochs; done the first time the client is touched, as a pure function of
``(seed, client)``). Each round then has the paper's four steps:

* **communicate**: each participant computes its logits on a subset of the
  public set drawn by the server (``public_subset`` rows, fresh each round);
* **aggregate**: the server averages them into the *consensus* (every
  participant counts once);
* **digest**: each participant trains towards the consensus on that subset
  (the reference code's mean absolute error between logits);
* **revisit**: a few epochs on its own private data (``local_epochs``).

One compiled round holds one client phase, so a participant of round ``t``
digests the consensus of round ``t - 1``, revisits, then computes its logits
on round ``t``'s subset (whose average is the next consensus). With every
client participating (as in the paper) each client runs exactly the
paper's sequence (communicate, digest, revisit, communicate, ...), shifted
by its first communicate; with a sampled cohort the consensus it digests
comes from the previous round's participants.

The public set is the run's proxy set (``data.proxy``; FedMD needs its
labels for transfer learning unless ``public_epochs = 0``). Clients read it
as data they already hold, so the download is the consensus only.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from fedkd_jax.algorithms.base import ClientData, ClientOutput, FederatedAlgorithm
from fedkd_jax.algorithms.local import scan_batches
from fedkd_jax.algorithms.server_distill import check_proxy
from fedkd_jax.errors import ConfigError
from fedkd_jax.hetero.fd import LocalModel
from fedkd_jax.hetero.grouped import grouped
from fedkd_jax.losses.classification import cross_entropy, masked_mean
from fedkd_jax.models import Model


class FedMDState(NamedTuple):
    """Server state.

    Attributes:
      consensus: ``[S, K]`` mean logits of the last round's participants on ``idx``.
      idx: ``[S]`` public rows of the consensus; next_idx: ``[S]`` rows this round's
        participants compute their logits on.
      valid: 1 once a consensus exists.
    """

    consensus: jax.Array
    idx: jax.Array
    next_idx: jax.Array
    valid: jax.Array


def fedmd(
    models: Sequence[Model],
    optimizer: optax.GradientTransformation,
    public_x,
    public_y=None,
    *,
    num_classes: int,
    batch_size: int,
    local_epochs: int = 1,
    local_steps: int | None = None,
    public_subset: int = 5000,
    public_epochs: int = 1,
    digest_epochs: int = 1,
    digest_batch_size: int = 32,
) -> FederatedAlgorithm:
    """Build FedMD over architecture groups (``models[g]`` is group ``g``'s model).

    Args:
      public_x: ``[P, D]`` the public set; public_y: ``[P]`` its labels (transfer learning).
      public_subset: ``S`` public rows per round (at most ``P``).
      public_epochs: epochs of transfer learning on the labeled public set (0: none).
      digest_epochs, digest_batch_size: the digest step's passes over the subset.
    """
    px = check_proxy(public_x, models[0], "fedmd")
    if public_epochs > 0 and public_y is None:
        raise ConfigError("distill.public_epochs", "FedMD's transfer learning trains on the public set's labels, "
                                                   "which this proxy set lacks: use data.proxy=holdout (labeled "
                                                   "held-out rows) or distill.public_epochs=0")
    p, k = px.shape[0], int(num_classes)
    s = int(min(public_subset, p))
    if s < 1:
        raise ConfigError("distill.public_subset", f"must be >= 1; got {public_subset}")
    py = jnp.zeros((p,), jnp.int32) if public_y is None else jnp.asarray(public_y, jnp.int32)
    sdata = {"public_x": px, "public_y": py}

    def draw(key):
        return jax.random.choice(key, p, (s,), replace=False).astype(jnp.int32)

    def init(key):
        return FedMDState(jnp.zeros((s, k)), jnp.zeros((s,), jnp.int32), draw(key), jnp.float32(0))

    def server_update(state: FedMDState, mean, _aux, key, _sdata):
        return FedMDState(mean["logits"], state.next_idx, draw(key), jnp.float32(1)), {}

    def for_model(model: Model) -> FederatedAlgorithm:
        def ce(params, xb, yb, where):
            return cross_entropy(model.apply(params, xb)[0], yb, where=where)

        def train(loss, params, opt_state, x, y, count, key, epochs, bsize):
            grad_fn = jax.value_and_grad(loss, has_aux=True)

            def step(carry, xb, yb, where):
                pr, opt = carry
                (_, m), g = grad_fn(pr, xb, yb, where)
                u, opt = optimizer.update(g, opt, pr)
                return (optax.apply_updates(pr, u), opt), m

            return scan_batches(step, (params, opt_state), x, y, count, key, batch_size=bsize, epochs=epochs)

        def init_client(key):
            kp, kt = jax.random.split(key)
            params = model.init(kp)
            opt = optimizer.init(params)
            if public_epochs > 0:  # transfer learning on the labeled public set
                x, y = jnp.asarray(px), py
                (params, opt), _ = train(ce, params, opt, x, y, jnp.int32(p), kt, public_epochs, batch_size)
            return LocalModel(params, opt)

        def client_update(bcast, cs: LocalModel, data: ClientData, key) -> ClientOutput:
            state, pub = bcast
            kd, kr = jax.random.split(key)
            xs = pub["public_x"][state.idx]

            def digest_loss(params, xb, target, where):  # the reference code's MAE on logits
                err = jnp.mean(jnp.abs(model.apply(params, xb)[0] - target), axis=-1)
                return masked_mean(err, where), {"digest_mae": masked_mean(err, where)}

            params, opt, dm = cs.params, cs.opt_state, {"digest_mae": jnp.float32(0)}
            if digest_epochs > 0:  # 0: no digest (each participant alone, the paper's baseline)
                n_digest = jnp.where(state.valid > 0, s, 0).astype(jnp.int32)
                (params, opt), dm = train(digest_loss, params, opt, xs, state.consensus, n_digest, kd,
                                          digest_epochs, digest_batch_size)
            (params, opt), metrics = scan_batches(
                lambda c, xb, yb, w: _ce_step(ce, optimizer, c, xb, yb, w), (params, opt), data.x, data.y,
                data.count, kr, batch_size=batch_size, epochs=local_epochs, steps=local_steps)
            logits = model.apply(params, pub["public_x"][state.next_idx])[0]
            metrics = {**metrics, "digest_mae": dm["digest_mae"]}
            return ClientOutput({"logits": logits}, (data.count > 0).astype(jnp.float32), LocalModel(params, opt),
                                metrics)

        return FederatedAlgorithm(
            name="fedmd", model=model, init=init, init_client=init_client, broadcast=lambda st: st,
            client_update=client_update, server_update=server_update, model_params=lambda st: None,
            personal_model=model, personal_params=lambda cs: cs.params, server_data=sdata,
            download_bytes=s * k * 4, clients_see_server_data=True,
        )

    return grouped([for_model(m) for m in models], name="fedmd")


def _ce_step(ce, optimizer, carry, xb, yb, where):
    params, opt = carry
    (_, m), g = jax.value_and_grad(ce, has_aux=True)(params, xb, yb, where)
    u, opt = optimizer.update(g, opt, params)
    return (optax.apply_updates(params, u), opt), m
