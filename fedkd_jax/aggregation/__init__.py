"""The aggregation chain between clients' updates and the server's step (see :mod:`.base`)."""

from fedkd_jax.aggregation.base import Aggregator, ClientIn, ClientOut, ServerIn, Transform, chain, no_state
from fedkd_jax.aggregation.compress import compress
from fedkd_jax.aggregation.mean import WEIGHTINGS, mean

__all__ = ["Aggregator", "ClientIn", "ClientOut", "ServerIn", "Transform", "WEIGHTINGS", "chain", "compress", "mean",
           "no_state"]
