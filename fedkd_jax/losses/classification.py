"""Masked classification losses. Each returns ``(loss, metrics)``.

Shape key: ``B`` batch rows, ``K`` classes. ``where [B]`` marks real rows;
padded rows contribute nothing, and an all-padded batch gives loss 0.

Token tasks (``data.task=next_token``): labels ``[B, L]`` with a negative id
at padded positions, logits ``[B, L, K]``, and ``where [B, L]`` marking the
real tokens of real rows (:func:`token_mask`); every mean is then over real
tokens (the per-token loss and accuracy of Reddi et al. 2021). A per-row
value (e.g. a feature loss) averaged with a token mask counts the rows that
hold at least one real token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_mask(labels: jax.Array, where: jax.Array) -> jax.Array:
    """``where [B]`` (real rows) as a mask of ``labels``' shape: for token labels
    ``[B, L]``, real rows' positions whose label is not padding (``>= 0``)."""
    if labels.ndim == where.ndim:
        return where
    return where.reshape(where.shape + (1,) * (labels.ndim - where.ndim)) & (labels >= 0)


def masked_mean(values: jax.Array, where: jax.Array | None) -> jax.Array:
    """Mean of ``values`` over the positions ``where`` marks (0 if none).

    ``where`` may have more axes than ``values`` (a token mask for per-row
    values: a row counts if any of its tokens does) or fewer (a row mask for
    per-token values: broadcast over the tokens)."""
    if where is None:
        return jnp.mean(values)
    if where.ndim > values.ndim:
        where = jnp.any(where, axis=tuple(range(values.ndim, where.ndim)))
    elif where.ndim < values.ndim:
        where = jnp.broadcast_to(where.reshape(where.shape + (1,) * (values.ndim - where.ndim)), values.shape)
    w = where.astype(values.dtype)
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def cross_entropy(
    logits: jax.Array, labels: jax.Array, *, where: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Softmax cross-entropy with integer labels, averaged over real rows (or tokens).

    Args:
      logits: ``[B, K]`` (token tasks: ``[B, L, K]``).
      labels: ``[B]`` int in ``[0, K)`` (token tasks: ``[B, L]``, negative at padding).
      where: optional ``[B]`` bool mask (token tasks: ``[B, L]``, see :func:`token_mask`).

    Returns:
      ``(loss, {"loss": loss, "accuracy": acc})``.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    if labels.ndim > 1:  # token labels: padding (< 0) is masked by `where`; keep the gather in range
        labels = jnp.maximum(labels, 0)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    loss = masked_mean(nll, where)
    acc = masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), where)
    return loss, {"loss": loss, "accuracy": acc}
