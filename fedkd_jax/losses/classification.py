"""Masked classification losses. Each returns ``(loss, metrics)``.

Shape key: ``B`` batch rows, ``K`` classes. ``where [B]`` marks real rows;
padded rows contribute nothing, and an all-padded batch gives loss 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(values: jax.Array, where: jax.Array | None) -> jax.Array:
    """Mean of ``values [B]`` over rows where ``where`` is true (0 if none)."""
    if where is None:
        return jnp.mean(values)
    w = where.astype(values.dtype)
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def cross_entropy(
    logits: jax.Array, labels: jax.Array, *, where: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Softmax cross-entropy with integer labels, averaged over real rows.

    Args:
      logits: ``[B, K]``.
      labels: ``[B]`` int in ``[0, K)``.
      where: optional ``[B]`` bool mask.

    Returns:
      ``(loss, {"loss": loss, "accuracy": acc})``.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=1)[:, 0]
    loss = masked_mean(nll, where)
    acc = masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), where)
    return loss, {"loss": loss, "accuracy": acc}
