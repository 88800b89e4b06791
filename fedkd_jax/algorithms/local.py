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
    """Run ``step(carry, xb [B, D], yb [B], where [B]) -> (carry, metrics)`` over the
    client's real batches of :func:`batch_schedule`.

    The loop runs exactly the client's real steps (a dynamic trip count), not
    the schedule padded to the largest client: a client of 20 rows in a
    population whose largest holds 400 takes 2 steps, not 40 (with clients
    vmapped together, the group runs to its longest member and the finished
    ones stay put). Batches, their order and the updates are those of the
    padded schedule, whose empty batches changed nothing. ``max_real_steps``
    (straggler simulation) stops the client after that many real steps.
    ``unroll`` is accepted for compatibility and ignored (a dynamic loop).

    Returns:
      ``(carry, metrics)``: each metric averaged over the real steps, plus
      ``"steps"``, the number of real steps taken.
    """
    del unroll
    m = x.shape[0]
    n = real_steps(count, m, batch_size, epochs=epochs, steps=steps)
    if max_real_steps is not None:
        n = jnp.minimum(n, max_real_steps)
    if steps is None:  # epoch e's real batches are the first ceil(count / B) of its shuffle
        orders = jax.vmap(lambda e: epoch_order(jax.random.fold_in(key, e), count, m))(jnp.arange(epochs))
        per_epoch = jnp.maximum((count + batch_size - 1) // batch_size, 1)

        def batch(t):
            pos = (t % per_epoch) * batch_size + jnp.arange(batch_size)
            return jnp.take(orders[t // per_epoch], pos, mode="clip"), pos < count
    else:
        idx, mask = batch_schedule(key, count, m, batch_size, steps=steps)

        def batch(t):
            return idx[t], mask[t]

    def one(c, t):
        bi, bm = batch(t)
        yb = y[bi]
        return step(c, x[bi], yb, token_mask(yb, bm))

    # zero sums typed like per-client values (inside shard_map they vary over the clients axis, as count does)
    zero = (count * 0).astype(jnp.float32)
    zeros = jax.tree.map(lambda a: jnp.broadcast_to(zero, a.shape).astype(a.dtype),
                         jax.eval_shape(one, carry, jnp.int32(0))[1])

    def body(t, state):
        c, sums = state
        c, metrics = one(c, t)
        return c, jax.tree.map(jnp.add, sums, metrics)

    carry, sums = jax.lax.fori_loop(0, n, body, (carry, zeros))
    nf = n.astype(jnp.float32)
    out = {k: v / jnp.maximum(nf, 1.0) for k, v in sums.items()}
    out["steps"] = nf
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
