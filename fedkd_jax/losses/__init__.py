"""Mask-aware losses returning ``(loss, metrics)``."""

from fedkd_jax.losses.classification import cross_entropy, masked_mean

__all__ = ["cross_entropy", "masked_mean"]
