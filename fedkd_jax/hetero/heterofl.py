"""HeteroFL and FedRolex: one global model, each client trains a width-sliced sub-model.

* HeteroFL: Diao, Ding & Tarokh 2021 (ICLR), static sub-models of the leading
  channels; reference code diaoenmao/HeteroFL-Computation-and-Communication-
  Efficient-Federated-Learning-for-Heterogeneous-Clients.
* FedRolex: Alam et al. 2022 (NeurIPS), the window rolls every round;
  reference code AIoT-MLSys-Lab/FedRolex.

Both share one code path (:mod:`~fedkd_jax.hetero.slicing`): group ``g``'s
clients train the global model's sub-model of width ratio ``r_g`` (every
hidden width scaled by ``r_g``), taken with the group's rule at the server's
round counter. A client uploads its sub-model's delta scattered into the
global shape, weighted by its example count, and that weight scattered over
the coordinates it trained (a fixed-shape payload: one all-reduce sums every
group's). The server divides coordinate by coordinate (coverage-count
weighting: each coordinate is averaged over the clients that trained it;
a coordinate nobody trained is unchanged) and applies its optimizer to the
result (FedAvg's step; plain averaging of the parameters with the default
server learning rate 1, as both papers do).

Normalisation: the zoo's models hold no running statistics (the ResNet uses
GroupNorm), so HeteroFL's static batch norm is not needed: a sub-model
normalises over its own channels. HeteroFL's *Scaler* (a sub-model's hidden
representations times ``1 / r`` in training, each followed by a batch norm in
their models) is not applied: without a normalisation layer to absorb it, it
lowered FedRolex's global accuracy on ``experiments/hetero.py --only width``
from 0.905 to 0.64, and an inverted-dropout form did no better. The reference codes' masking of the output
layer to each client's labels is not applied. Both reference codes weight
every client 1; here the weight is the client's example count (FedAvg's),
which ``client.weighting=uniform`` turns into 1 (the engine's mean weighs
both parts of the payload, so their ratio is the weighted average).

Each client is charged its sub-model's size, up and down.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from fedkd_jax.algorithms.base import ClientOutput, FederatedAlgorithm
from fedkd_jax.algorithms.fedavg import FedAvgState, local_sgd_algorithm
from fedkd_jax.hetero.grouped import grouped
from fedkd_jax.hetero.slicing import masked_average, scatter_sum, slice_params, width_slice
from fedkd_jax.models import Model
from fedkd_jax.tree_util import tree_bytes


class WidthState(NamedTuple):
    """The global model, the server optimizer's state and the round counter (FedRolex's window)."""

    params: dict
    opt_state: optax.OptState
    round: jax.Array


def width_sliced(
    kind: str,
    ratios: Sequence[float],
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    rule: str,
    batch_size: int,
    local_epochs: int = 1,
    local_steps: int | None = None,
    **model_kwargs,
) -> FederatedAlgorithm:
    """HeteroFL (``rule="heterofl"``) or FedRolex (``rule="fedrolex"``) over groups of width ``ratios[g]``.

    ``model_kwargs`` describe the global (full-width) model, as for ``make_model``.
    """
    from fedkd_jax.models import make_model

    glob = make_model(kind, **model_kwargs)
    slices = [width_slice(kind, r, rule=rule, **model_kwargs) for r in ratios]
    base = local_sgd_algorithm(rule, glob, client_optimizer, server_optimizer, batch_size=batch_size,
                               local_epochs=local_epochs, local_steps=local_steps)

    def init(key):
        s = base.init(key)
        return WidthState(s.params, s.opt_state, jnp.int32(0))

    def server_update(state: WidthState, mean, _aux, key, _sdata):
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        delta = masked_average(mean["sums"], mean["counts"], zeros)
        avg, m = base.server_update(FedAvgState(state.params, state.opt_state), delta, (), key)
        return WidthState(avg.params, avg.opt_state, state.round + 1), m

    def for_group(sub: Model, spec) -> FederatedAlgorithm:
        sub_base = local_sgd_algorithm(rule, sub, client_optimizer, server_optimizer, batch_size=batch_size,
                                       local_epochs=local_epochs, local_steps=local_steps)

        def client_update(state: WidthState, cs, data, key) -> ClientOutput:
            params = slice_params(state.params, spec, state.round)
            out = sub_base.client_update(params, cs, data, key)
            # unit weight here: the engine's mean weighs both parts by the client's weight (its
            # example count, or 1 with client.weighting=uniform), so their ratio is the
            # weighted average of each coordinate over the clients that trained it
            sums, counts = scatter_sum(out.update, spec, state.round)
            return ClientOutput({"sums": sums, "counts": counts}, out.weight, cs, out.metrics,
                                upload_bytes=tree_bytes(out.update))

        sub_bytes = tree_bytes(jax.eval_shape(sub.init, jax.random.key(0)))
        return FederatedAlgorithm(
            name=rule, model=sub, init=init, init_client=None, broadcast=lambda s: s, client_update=client_update,
            server_update=server_update, model_params=lambda s: slice_params(s.params, spec, s.round),
            download_bytes=sub_bytes,
        )

    alg = grouped([for_group(s.model, s.spec) for s in slices], name=rule)
    return alg._replace(model=glob, model_params=lambda s: s.params,
                        download_bytes=max(g.download_bytes for g in alg.groups),
                        with_model_params=lambda s, p: s._replace(params=p))
