"""Privacy inside the round: client-level DP, accounting, secure aggregation and
homomorphic aggregation (optional extra ``he``). The membership-inference audit,
an offline tool that reads run directories, is :mod:`fedkd_jax.audit`."""

from fedkd_jax.privacy.accounting import (
    ACCOUNTANTS,
    RELATION,
    SAMPLINGS,
    Accountant,
    Mechanism,
    calibrate,
    epsilon,
    round_event,
)
from fedkd_jax.privacy.dp import gaussian, update_noise_multiplier
from fedkd_jax.privacy.secagg import choose_fraction_bits, secure_aggregation, upload_bytes

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "Mechanism",
    "RELATION",
    "SAMPLINGS",
    "calibrate",
    "choose_fraction_bits",
    "epsilon",
    "gaussian",
    "round_event",
    "secure_aggregation",
    "update_noise_multiplier",
    "upload_bytes",
]
