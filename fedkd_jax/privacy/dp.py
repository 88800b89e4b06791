"""Client-level differential privacy: DP-FedAvg's clip and Gaussian noise.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models" (ICLR); adaptive clipping from Andrew et al. 2021, "Differentially
Private Learning with Adaptive Clipping" (NeurIPS).

In the chain (:mod:`fedkd_jax.aggregation`) this transform sits after the
uniform weighting and before secure aggregation:

* **encode** (each client): the whole payload, every leaf of the update and
  of any ``aux`` the server derives from it (FedDF's logits), is clipped to
  global L2 norm ``S``: ``p * min(1, S / ||p||)``. It runs after every
  client-side transformation that could raise the norm (compression).
* **finalize** (server): Gaussian noise ``N(0, (z * S)^2)`` is added to each
  coordinate of the *sum*; the mean transform then divides by the expected
  cohort size, never by the realised one.
* **adaptive clipping** (``quantile`` set): each client also reports whether
  it was unclipped; the server privatises that count with ``N(0, sigma_b^2)``
  (``sigma_b`` = expected cohort / 20 by default, as in TensorFlow Federated
  and Flower) and moves the clip norm geometrically toward the target
  quantile: ``S <- S * exp(-lr * (b - quantile))``. The update noise then uses
  ``z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` so that both releases together
  cost exactly one Gaussian mechanism of multiplier ``z`` (Andrew et al.,
  Thm. 1): the accountant charges ``z``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedkd_jax.aggregation.base import ClientIn, ClientOut, ServerIn, Transform
from fedkd_jax.errors import ConfigError, concrete

_COUNT_NOISE = 0xC0C0


def update_noise_multiplier(z: float, count_stddev: float | None) -> float:
    """The multiplier left for the update when the clipped count takes its share."""
    if not count_stddev:
        return z
    if not concrete(z):  # a swept value: checked by the config before tracing
        return jnp.where(z > 0, jnp.maximum(z ** -2 - (2.0 * count_stddev) ** -2, 1e-30) ** -0.5, 0.0)
    if z == 0:
        return 0.0
    rest = z ** -2 - (2.0 * count_stddev) ** -2
    if rest <= 0:
        raise ConfigError("privacy.noise_multiplier",
                          f"{z} is too small for adaptive clipping with count noise {count_stddev:g}: the count alone "
                          f"needs z > {1 / (2 * count_stddev):.4g}; raise the noise or privacy.count_stddev")
    return rest ** -0.5


def gaussian(noise_multiplier: float, clip_norm: float, *, expected_clients: float,
             quantile: float | None = None, learning_rate: float = 0.2, count_stddev: float | None = None) -> Transform:
    """DP-FedAvg's clip (client) and Gaussian noise on the sum (server).

    Args:
      noise_multiplier: ``z``; the noise standard deviation is ``z * S``.
      clip_norm: ``S`` (the initial norm when adaptive); ``inf`` disables clipping.
      expected_clients: expected number of contributing clients per round.
      quantile: target unclipped share for adaptive clipping (``None``: fixed ``S``).
      learning_rate: adaptive clipping's geometric step.
      count_stddev: noise on the unclipped count (default ``expected_clients / 20``).
    """
    if concrete(noise_multiplier) and not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ConfigError("privacy.noise_multiplier", f"must be a finite number >= 0; got {noise_multiplier}")
    if concrete(clip_norm) and not clip_norm > 0:
        raise ConfigError("privacy.clip_norm", f"must be > 0; got {clip_norm}")
    adaptive = quantile is not None
    if adaptive and not 0 < quantile < 1:
        raise ConfigError("privacy.adaptive_quantile", f"must be in (0, 1); got {quantile}")
    sigma_b = (count_stddev if count_stddev is not None else expected_clients / 20.0) if adaptive else None
    z_update = update_noise_multiplier(noise_multiplier, sigma_b)

    def init(_template):
        return {"clip_norm": jnp.float32(clip_norm)}

    def encode(payload, cin: ClientIn):
        s = cin.state["clip_norm"]
        leaves = jax.tree.leaves(payload)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
        factor = jnp.where(norm > s, s / jnp.maximum(norm, 1e-30), 1.0)
        clipped = jax.tree.map(lambda x: x * factor, payload)
        stats = {"dp_unclipped": (norm <= s).astype(jnp.float32), "dp_norm": norm}
        return clipped, ClientOut(cin.weight, cin.aux_weight, None, stats)

    def finalize(total, sin: ServerIn):
        s = sin.state["clip_norm"]
        if not concrete(z_update) or z_update > 0:
            leaves, treedef = jax.tree.flatten(total)
            keys = jax.random.split(sin.key, len(leaves))
            noisy = [x + (z_update * s) * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
            total = jax.tree.unflatten(treedef, noisy)
        unclipped = sin.stats["dp_unclipped"]
        metrics = {"clip_norm": s, "mean_norm": sin.stats["dp_norm"] / jnp.maximum(sin.contributing, 1.0)}
        state = sin.state
        if adaptive:
            noisy_count = unclipped + sigma_b * jax.random.normal(jax.random.fold_in(sin.key, _COUNT_NOISE))
            b = noisy_count / expected_clients
            state = {"clip_norm": s * jnp.exp(-learning_rate * (b - quantile))}
            metrics["unclipped_fraction_noisy"] = b
        return total, state, metrics

    return Transform("dp", init, encode, finalize)
