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
  it was unclipped, *centred*: ``b_i - 1/2`` (as TensorFlow Privacy's
  quantile estimator does), so one client moves the count by at most 1/2
  under add-or-remove-one (and 1 under replace-one, like the update's 2S).
  The server privatises the sum with ``N(0, sigma_b^2)`` (``sigma_b`` =
  expected cohort / 20 by default, as in TensorFlow Federated and Flower),
  estimates the unclipped fraction ``clamp(noisy sum / expected + 1/2, 0, 1)``
  and moves the clip norm geometrically toward the target quantile:
  ``S <- min(S * exp(-lr * (b - quantile)), max_clip_norm)``. The update noise
  then uses ``z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2)``, so that both
  releases together cost exactly one Gaussian mechanism of multiplier ``z``
  (Andrew et al., Thm. 1): the accountant charges ``z``. That needs
  ``z < 2 sigma_b``; a larger ``z`` leaves the update no budget and is refused.
* **noise source**: by default the noise key derives from the run's seed and
  the round, so a run is reproducible and resumes exactly; whoever holds the
  run directory can then regenerate the noise and subtract it. With
  ``secure_noise`` the key is drawn from the operating system's entropy
  before every dispatch (not reproducible; as Opacus' secure mode).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedkd_jax.aggregation.base import ClientIn, ClientOut, ServerIn, Transform
from fedkd_jax.errors import ConfigError, concrete

_COUNT_NOISE = 0xC0C0


def check_count_budget(z: float, count_stddev: float) -> None:
    """Refuse a noise multiplier that leaves the update no budget beside the clipped count."""
    if z > 0 and z >= 2.0 * count_stddev:
        raise ConfigError("privacy.noise_multiplier",
                          f"{z:g} leaves no budget for the update beside adaptive clipping's count noise "
                          f"{count_stddev:g}: the two together cost one Gaussian of multiplier z only if "
                          f"z < 2 x count noise = {2 * count_stddev:g}; lower privacy.noise_multiplier or raise "
                          f"privacy.count_stddev above {z / 2:g}")


def update_noise_multiplier(z: float, count_stddev: float | None) -> float:
    """The multiplier left for the update when the clipped count takes its share."""
    if not count_stddev:
        return z
    if not concrete(z):  # a swept value: every value was checked by the config before tracing
        rest = z ** -2 - (2.0 * count_stddev) ** -2
        # never a silent clamp: a value that slipped through poisons the round with NaN
        return jnp.where(z > 0, jnp.where(rest > 0, jnp.maximum(rest, 1e-30) ** -0.5, jnp.nan), 0.0)
    if z == 0:
        return 0.0
    check_count_budget(z, count_stddev)
    return (z ** -2 - (2.0 * count_stddev) ** -2) ** -0.5


def gaussian(noise_multiplier: float, clip_norm: float, *, expected_clients: float,
             quantile: float | None = None, learning_rate: float = 0.2, count_stddev: float | None = None,
             max_clip_norm: float = math.inf, secure_noise: bool = False, log_raw_norm: bool = False) -> Transform:
    """DP-FedAvg's clip (client) and Gaussian noise on the sum (server).

    Args:
      noise_multiplier: ``z``; the noise standard deviation is ``z * S``.
      clip_norm: ``S`` (the initial norm when adaptive); ``inf`` disables clipping.
      expected_clients: expected number of contributing clients per round.
      quantile: target unclipped share for adaptive clipping (``None``: fixed ``S``).
      learning_rate: adaptive clipping's geometric step.
      count_stddev: noise on the unclipped count (default ``expected_clients / 20``).
      max_clip_norm: the adaptive clip norm never exceeds it (secure aggregation sizes its ring for it).
      secure_noise: draw the noise key from OS entropy (the state's ``noise_seed``, refreshed
        before every dispatch by :func:`refresh_noise_seed`) instead of the round's key.
      log_raw_norm: also report the mean *un-noised* update norm (analyst-only: not covered
        by the privacy guarantee).
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
        state = {"clip_norm": jnp.float32(clip_norm)}
        if secure_noise:
            state["noise_seed"] = jnp.zeros((2,), jnp.uint32)  # replaced from OS entropy before each dispatch
        return state

    def encode(payload, cin: ClientIn):
        s = cin.state["clip_norm"]
        leaves = jax.tree.leaves(payload)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
        factor = jnp.where(norm > s, s / jnp.maximum(norm, 1e-30), 1.0)
        clipped = jax.tree.map(lambda x: x * factor, payload)
        # centred bit (TensorFlow Privacy's quantile estimator): sensitivity 1/2 under add-or-remove
        stats = {"dp_unclipped": (norm <= s).astype(jnp.float32) - 0.5}
        if log_raw_norm:
            stats["dp_norm"] = norm
        return clipped, ClientOut(cin.weight, cin.aux_weight, None, stats)

    def finalize(total, sin: ServerIn):
        s = sin.state["clip_norm"]
        key = sin.key
        if secure_noise:
            seed = jax.random.wrap_key_data(sin.state["noise_seed"], impl="threefry2x32")
            key = jax.random.fold_in(seed, sin.round)
        if not concrete(z_update) or z_update > 0:
            leaves, treedef = jax.tree.flatten(total)
            keys = jax.random.split(key, len(leaves))
            noisy = [x + (z_update * s) * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
            total = jax.tree.unflatten(treedef, noisy)
        metrics = {"clip_norm": s}
        if log_raw_norm:
            metrics["mean_norm"] = sin.stats["dp_norm"] / jnp.maximum(sin.contributing, 1.0)
        state = sin.state
        if adaptive:
            centred = sin.stats["dp_unclipped"]
            noisy = centred + sigma_b * jax.random.normal(jax.random.fold_in(key, _COUNT_NOISE))
            b = jnp.clip(noisy / expected_clients + 0.5, 0.0, 1.0)
            state = dict(state, clip_norm=jnp.minimum(s * jnp.exp(-learning_rate * (b - quantile)), max_clip_norm))
            metrics["unclipped_fraction_noisy"] = b
        return total, state, metrics

    return Transform("dp", init, encode, finalize)


def refresh_noise_seed(agg_state):
    """``agg_state`` with the DP transform's ``noise_seed`` (if any) drawn anew from the OS's
    entropy (``secure_noise``), placed like the old one. Other state is returned as is."""
    import os

    import numpy as np

    dp = agg_state.get("dp") if isinstance(agg_state, dict) else None
    if not isinstance(dp, dict) or "noise_seed" not in dp:
        return agg_state
    old = dp["noise_seed"]
    fresh = np.frombuffer(os.urandom(4 * int(np.prod(old.shape))), np.uint32).reshape(old.shape)
    placed = jax.device_put(fresh, old.sharding) if hasattr(old, "sharding") else jnp.asarray(fresh)
    return dict(agg_state, dp=dict(dp, noise_seed=placed))
