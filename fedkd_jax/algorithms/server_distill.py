"""Server-side distillation on an unlabeled proxy set (shared by FedDF and
server-teacher KD). Shape key: ``P`` proxy rows, ``D`` features, ``K`` classes."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedkd_jax.errors import ConfigError
from fedkd_jax.losses import kd_loss
from fedkd_jax.models import Model


def check_proxy(proxy_x: Any, model: Model, algorithm: str) -> jax.Array:
    """A ``[P, D]`` float proxy set matching the model's input width, or a clear error."""
    shape = tuple(np.shape(proxy_x))
    if len(shape) != 2 or shape[0] < 1:
        raise ConfigError("data.proxy_fraction", f"{algorithm} needs a non-empty proxy set [P, D]; got shape {shape}")
    if model.in_features and shape[1] != model.in_features:
        raise ConfigError(
            "data.proxy_fraction",
            f"{algorithm}: proxy set has {shape[1]} features per row but the model takes {model.in_features}",
        )
    return jnp.asarray(proxy_x, jnp.float32)


def proxy_logits(apply: Callable, params: Any, proxy_x: jax.Array) -> jax.Array:
    """``[P, K]`` logits of one model on the proxy set."""
    return apply(params, proxy_x)[0]


def distill_on_proxy(
    apply: Callable,
    params: Any,
    opt_state: Any,
    optimizer: optax.GradientTransformation,
    proxy_x: jax.Array,
    target_logits: jax.Array,
    key: jax.Array,
    *,
    steps: int,
    batch_size: int,
    temperature: float,
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """``steps`` optimizer steps of ``T^2 KL(target_T || model_T)`` on random proxy batches.

    Returns:
      ``(params, opt_state, {"distill_loss": mean loss over the steps})``.
    """
    n = proxy_x.shape[0]

    def step(carry, k):
        p, s = carry
        idx = jax.random.randint(k, (min(batch_size, n),), 0, n)

        def loss(q):
            return kd_loss(apply(q, proxy_x[idx])[0], target_logits[idx], temperature=temperature)[0]

        value, g = jax.value_and_grad(loss)(p)
        u, s = optimizer.update(g, s, p)
        return (optax.apply_updates(p, u), s), value

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jax.random.split(key, steps))
    return params, opt_state, {"distill_loss": jnp.mean(losses)}
