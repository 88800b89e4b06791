"""Mask-aware losses returning ``(loss, metrics)``."""

from fedkd_jax.losses.classification import cross_entropy, masked_mean, token_mask
from fedkd_jax.losses.distillation import fedkd_mutual, hint_loss, kd_loss, kd_mix, kl_rows

__all__ = ["cross_entropy", "fedkd_mutual", "hint_loss", "kd_loss", "kd_mix", "kl_rows", "masked_mean", "token_mask"]
