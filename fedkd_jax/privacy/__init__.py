"""Privacy inside the round: client-level DP, accounting, secure aggregation and
homomorphic aggregation (optional extra ``he``). The membership-inference audit,
an offline tool that reads run directories, is :mod:`fedkd_jax.audit`."""

import importlib

# Loaded on first use (module __getattr__): the accountant pulls in dp-accounting
# and scipy (~0.7 s), which runs without DP never need.
_HOME = {
    "ACCOUNTANTS": "accounting", "RELATION": "accounting", "SAMPLINGS": "accounting", "Accountant": "accounting",
    "Mechanism": "accounting", "calibrate": "accounting", "epsilon": "accounting", "round_event": "accounting",
    "gaussian": "dp", "update_noise_multiplier": "dp",
    "choose_fraction_bits": "secagg", "secure_aggregation": "secagg", "upload_bytes": "secagg",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"fedkd_jax.privacy.{_HOME[name]}"), name)
    raise AttributeError(f"module 'fedkd_jax.privacy' has no attribute {name!r}")


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
