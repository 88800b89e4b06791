"""One client's local training: a ``lax.scan`` over padded, masked batches.

Shape key: ``M`` padded examples of the client, ``S`` local steps, ``B`` batch.

The batch schedule is fixed-shape so every client (and every round) runs the
same program: ``S = epochs * ceil(M / B)`` steps in epoch mode, ``S = steps``
in step mode. Rows past the client's real count are masked; a step whose batch
holds no real row leaves parameters *and* optimizer state untouched, so a
padded client trains exactly like the same client run alone, unpadded.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedkd_jax.losses.classification import token_mask

Params = Any
LossFn = Callable[[Params, jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict]]


def tree_where(pred: jax.Array, a: Any, b: Any) -> Any:
    """Leafwise ``where(pred, a, b)`` for a scalar ``pred``."""
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def num_local_steps(max_examples: int, batch_size: int, *, epochs: int = 1, steps: int | None = None) -> int:
    """``S``: steps per round for every client (static)."""
    if steps is not None:
        return int(steps)
    return int(epochs) * math.ceil(max_examples / batch_size)


def epoch_order(key: jax.Array, count: jax.Array, max_examples: int) -> jax.Array:
    """A random order of ``arange(M)`` with the ``count`` real rows first.

    Returns:
      ``[M]`` int32: positions ``0..count-1`` are a uniform permutation of the
      real rows; the padded rows follow.
    """
    u = jax.random.uniform(key, (max_examples,))
    u = jnp.where(jnp.arange(max_examples) < count, u, 2.0)
    return jnp.argsort(u).astype(jnp.int32)


def batch_schedule(
    key: jax.Array,
    count: jax.Array,
    max_examples: int,
    batch_size: int,
    *,
    epochs: int = 1,
    steps: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Row indices and masks of every local batch.

    Epoch mode (``steps is None``): each epoch is a fresh shuffle (key folded
    with the epoch number) cut into ``ceil(M / B)`` batches; the last real batch
    may be partial and the batches after it are empty.
    Step mode: the real rows are visited in passes, each pass a fresh shuffle
    (key folded with the pass number); step ``s`` takes the stream's positions
    ``s*B .. s*B+B-1``, and position ``p`` is row ``order_{p // count}[p % count]``.
    A batch spans at most ``ceil(B / count) + 1`` passes, so each step sorts
    ``B + 1`` candidate orders of ``M`` keys (cheap next to a training step).

    Returns:
      ``(idx [S, B] int32, mask [S, B] bool)``.
    """
    if steps is None:
        nb = math.ceil(max_examples / batch_size)
        pos = jnp.arange(nb * batch_size)

        def one_epoch(e):
            order = epoch_order(jax.random.fold_in(key, e), count, max_examples)
            idx = jnp.take(order, pos, mode="clip")
            return idx.reshape(nb, batch_size), (pos < count).reshape(nb, batch_size)

        idx, mask = jax.vmap(one_epoch)(jnp.arange(epochs))
        return idx.reshape(-1, batch_size), mask.reshape(-1, batch_size)
    cnt = jnp.maximum(count, 1)
    num_orders = batch_size + 1

    def one_step(s):
        pos = s * batch_size + jnp.arange(batch_size)
        first = (s * batch_size) // cnt
        orders = jax.vmap(lambda q: epoch_order(jax.random.fold_in(key, q), count, max_examples))(
            first + jnp.arange(num_orders))
        return orders[pos // cnt - first, pos % cnt]

    idx = jax.vmap(one_step)(jnp.arange(steps)).astype(jnp.int32)
    mask = jnp.broadcast_to(count > 0, idx.shape)
    return idx, mask


def scan_batches(
    step: Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[Any, dict[str, jax.Array]]],
    carry: Any,
    x: jax.Array,
    y: jax.Array,
    count: jax.Array,
    key: jax.Array,
    *,
    batch_size: int,
    epochs: int = 1,
    steps: int | None = None,
    max_real_steps: jax.Array | None = None,
    unroll: int | bool = 1,
) -> tuple[Any, dict[str, jax.Array]]:
    """Run ``step(carry, xb [B, D], yb [B], where [B]) -> (carry, metrics)`` over the schedule.

    A step whose batch holds no real row keeps the old carry (parameters and
    optimizer states alike). ``max_real_steps`` (straggler simulation) stops
    the client after that many real steps.

    Returns:
      ``(carry, metrics)``: each metric averaged over the real steps, plus
      ``"steps"``, the number of real steps taken.
    """
    idx, mask = batch_schedule(key, count, x.shape[0], batch_size, epochs=epochs, steps=steps)
    if max_real_steps is not None:
        real_so_far = jnp.cumsum(jnp.any(mask, axis=1))
        mask = mask & (real_so_far <= max_real_steps)[:, None]

    def body(c, batch):
        bi, bm = batch
        yb = y[bi]
        new_c, metrics = step(c, x[bi], yb, token_mask(yb, bm))
        real = jnp.any(bm)
        return tree_where(real, new_c, c), (metrics, real.astype(jnp.float32))

    carry, (metrics, real) = jax.lax.scan(body, carry, (idx, mask), unroll=unroll)
    n = jnp.sum(real)
    out = {k: jnp.sum(v * real) / jnp.maximum(n, 1.0) for k, v in metrics.items()}
    out["steps"] = n
    return carry, out


def real_steps(count: jax.Array, max_examples: int, batch_size: int, *, epochs: int = 1, steps: int | None = None) -> jax.Array:
    """Number of real (non-empty) local steps a client with ``count`` rows takes."""
    if steps is not None:
        return jnp.where(count > 0, steps, 0)
    return epochs * ((count + batch_size - 1) // batch_size)


def local_train(
    loss_fn: LossFn,
    params: Params,
    optimizer: optax.GradientTransformation,
    x: jax.Array,
    y: jax.Array,
    count: jax.Array,
    key: jax.Array,
    *,
    batch_size: int,
    epochs: int = 1,
    steps: int | None = None,
    max_real_steps: jax.Array | None = None,
    unroll: int | bool = 1,
) -> tuple[Params, dict[str, jax.Array]]:
    """Train ``params`` on one client's padded data with a fresh ``optimizer`` state.

    Args:
      loss_fn: ``(params, x [B, D], y [B], where [B]) -> (loss, metrics)``.
      params: starting parameters.
      optimizer: the local optax optimizer (state starts fresh each round).
      x: ``[M, D]`` padded features; y: ``[M]`` labels; count: real rows.
      key: this client's key for this round.
      max_real_steps: optional cap on real steps (stragglers).

    Returns:
      ``(params, metrics)``: the loss function's metrics and ``"loss"`` (the
      optimised loss) averaged over real steps, and ``"steps"``, the real steps.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(carry, xb, yb, where):
        p, opt_state = carry
        (loss, aux), grads = grad_fn(p, xb, yb, where)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), {**aux, "loss": loss}

    (params, _), metrics = scan_batches(
        step, (params, optimizer.init(params)), x, y, count, key,
        batch_size=batch_size, epochs=epochs, steps=steps, max_real_steps=max_real_steps, unroll=unroll,
    )
    return params, metrics
