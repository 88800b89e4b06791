"""The weighted mean: the aggregation every chain ends its server side with.

``encode`` multiplies the client's update (and ``aux``) by its weight;
``finalize`` divides the sums by the summed weights (``denominator=
"weights"``, FedAvg), or by a fixed expected cohort size (``"expected"``,
DP-FedAvg, McMahan et al. 2018: the denominator must not depend on who took
part, or it would leak it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedkd_jax.aggregation.base import ClientIn, ClientOut, ServerIn, Transform
from fedkd_jax.errors import ConfigError

WEIGHTINGS = ("examples", "uniform")


def mean(weighting: str = "examples", *, denominator: str = "weights", expected: float | None = None) -> Transform:
    """Weighted mean.

    Args:
      weighting: ``examples`` keeps the algorithms' weights (example counts,
        McMahan et al. 2017); ``uniform`` gives every contributing client weight 1.
      denominator: ``weights`` divides by the summed weights; ``expected``
        divides by ``expected`` (the expected number of contributing clients).
    """
    if weighting not in WEIGHTINGS:
        raise ConfigError("client.weighting", f"unknown value {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
    if denominator == "expected" and not (expected and expected > 0):
        raise ConfigError("privacy", "a fixed denominator needs the expected cohort size")

    def init(_template):
        # a state, not a constant: XLA would turn x / constant into x * (1 / constant),
        # which differs from dividing by the summed weights in the last bit
        return {"denominator": jnp.float32(expected)} if denominator == "expected" else ()

    def encode(payload, cin: ClientIn):
        w, aw = cin.weight, cin.aux_weight
        if weighting == "uniform":
            w = (w > 0).astype(jnp.float32)
        scaled = {"update": jax.tree.map(lambda u: w * u, payload["update"]),
                  "aux": jax.tree.map(lambda u: aw * u, payload["aux"])}
        return scaled, ClientOut(w, aw)

    def finalize(total, sin: ServerIn):
        if denominator == "weights":
            d = jnp.where(sin.weight_sum > 0, sin.weight_sum, 1.0)
            da = jnp.where(sin.aux_weight_sum > 0, sin.aux_weight_sum, 1.0)
        else:
            d = da = sin.state["denominator"]
        out = {"update": jax.tree.map(lambda u: u / d, total["update"]),
               "aux": jax.tree.map(lambda u: u / da, total["aux"])}
        return out, sin.state, {}

    return Transform("mean", init, encode, finalize)
