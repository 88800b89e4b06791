"""Server-side distillation on an unlabeled proxy set (shared by FedDF and
server-teacher KD). Shape key: ``P`` proxy rows, ``D`` features, ``K`` classes,
``B`` batch rows."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedkd_jax.errors import ConfigError
from fedkd_jax.losses import kd_loss
from fedkd_jax.models import Model


def check_proxy(proxy_x: Any, model: Model, algorithm: str) -> np.ndarray:
    """A ``[P, D]`` float proxy set matching the model's input width, or a clear error.

    A host (numpy) array: the algorithm may be built inside a trace (a sweep's traced
    hyperparameters), where a ``jnp`` array would be a tracer and could not become server data."""
    shape = tuple(np.shape(proxy_x))
    if len(shape) != 2 or shape[0] < 1:
        raise ConfigError("data.proxy_fraction", f"{algorithm} needs a non-empty proxy set [P, D]; got shape {shape}")
    if model.in_features and shape[1] != model.in_features:
        raise ConfigError(
            "data.proxy_fraction",
            f"{algorithm}: proxy set has {shape[1]} features per row but the model takes {model.in_features}",
        )
    return np.asarray(proxy_x, np.float32)


def proxy_logits(apply: Callable, params: Any, proxy_x: jax.Array) -> jax.Array:
    """``[P, K]`` logits of one model on the proxy set."""
    return apply(params, proxy_x)[0]


def split_validation(num_rows: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Fixed ``(train_rows, val_rows)`` index split of the proxy (a seeded permutation).

    ``fraction = 0`` gives no validation rows. At least one row stays for training.
    """
    n_val = min(int(round(fraction * num_rows)), num_rows - 1) if fraction > 0 else 0
    perm = np.random.default_rng(0x7A1).permutation(num_rows)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def pass_batches(key: jax.Array, step: jax.Array, num_rows: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """Rows and mask of distillation batch ``step``: passes over the proxy without replacement.

    Pass ``q`` is a fresh permutation (key folded with ``q``) cut into
    ``ceil(P / B)`` batches; the last batch of a pass may be partial (masked).
    """
    b = min(batch_size, num_rows)
    per_pass = math.ceil(num_rows / b)
    q, j = step // per_pass, step % per_pass
    order = jax.random.permutation(jax.random.fold_in(key, q), num_rows)
    pos = j * b + jnp.arange(b)
    return jnp.take(order, pos, mode="clip"), pos < num_rows


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
    val_score: Callable[[Any], jax.Array] | None = None,
    val_every: int = 10,
    patience: int = 2,
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """Up to ``steps`` optimizer steps of ``T^2 KL(target_T || model_T)`` on the proxy.

    Batches go through the proxy in passes without replacement
    (:func:`pass_batches`). With ``val_score(params) -> scalar`` (lower is
    better): it is checked before the first step and every ``val_every``
    steps; distillation stops after ``patience`` checks without strict
    improvement, and the parameters of the best check are returned (possibly
    the starting ones), as FedDF's reference code does. Without it, all
    ``steps`` are taken.

    Returns:
      ``(params, opt_state, metrics)`` with ``distill_loss`` (mean training loss
      over the steps taken), ``distill_steps`` and, with validation,
      ``distill_val_score`` (the best score).
    """
    n = proxy_x.shape[0]

    def train_loss(q, idx, mask):
        return kd_loss(apply(q, proxy_x[idx])[0], target_logits[idx], temperature=temperature, where=mask)[0]

    def step(carry, s):
        p, st = carry
        idx, mask = pass_batches(key, s, n, batch_size)
        value, g = jax.value_and_grad(train_loss)(p, idx, mask)
        u, st = optimizer.update(g, st, p)
        return (optax.apply_updates(p, u), st), value

    if val_score is None:
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jnp.arange(steps))
        return params, opt_state, {"distill_loss": jnp.mean(losses), "distill_steps": jnp.float32(steps)}
    val_loss = val_score

    chunk = max(1, min(val_every, steps))
    num_chunks = math.ceil(steps / chunk)

    def cond(c):
        i, _, _, _, _, bad, _ = c
        return (i < num_chunks) & (bad < patience)

    def body(c):
        i, p, st, best_p, best, bad, total = c
        (p, st), losses = jax.lax.scan(step, (p, st), i * chunk + jnp.arange(chunk))
        v = val_loss(p)
        better = v < best
        best_p = jax.tree.map(lambda a, b: jnp.where(better, a, b), p, best_p)
        return (i + 1, p, st, best_p, jnp.where(better, v, best), jnp.where(better, 0, bad + 1), total + jnp.sum(losses))

    start = (jnp.int32(0), params, opt_state, params, val_loss(params), jnp.int32(0), jnp.float32(0.0))
    i, _, opt_state, best_p, best, _, total = jax.lax.while_loop(cond, body, start)
    taken = (i * chunk).astype(jnp.float32)
    return best_p, opt_state, {"distill_loss": total / jnp.maximum(taken, 1.0), "distill_steps": taken,
                               "distill_val_score": best}
