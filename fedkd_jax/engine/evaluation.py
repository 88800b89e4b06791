"""Jitted, batched evaluation of the global model.

Global metrics on the held-out test set, and the per-client accuracy of the
global model on each client's local test split (its distribution tells how
evenly the model serves the population).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedkd_jax.data import FederatedData

Apply = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]


def _chunked_stats(apply: Apply, params, x: jax.Array, y: jax.Array, chunk: int):
    """Per-row NLL and correctness over ``x [R, D]`` in chunks (bounded memory)."""
    r = x.shape[0]
    n_chunks = max(1, -(-r // chunk))
    pad = n_chunks * chunk - r
    xp = jnp.pad(x, ((0, pad), (0, 0))).reshape(n_chunks, chunk, -1)
    yp = jnp.pad(y, (0, pad)).reshape(n_chunks, chunk)

    def one(batch):
        xb, yb = batch
        logits, _ = apply(params, xb)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, yb[:, None], axis=1)[:, 0]
        return nll, (jnp.argmax(logits, -1) == yb).astype(jnp.float32)

    nll, correct = jax.lax.map(one, (xp, yp))
    return nll.reshape(-1)[:r], correct.reshape(-1)[:r]


def make_evaluator(apply: Apply, *, chunk: int = 1024):
    """``evaluate(params, data) -> metrics`` (jitted).

    Returns a dict with ``test_loss``, ``test_accuracy`` (global test set) and
    ``client_accuracy [N]`` (NaN for clients without a local test split).
    """

    @jax.jit
    def evaluate(params, data: FederatedData) -> dict[str, jax.Array]:
        out = {}
        if data.global_y.shape[0]:
            nll, correct = _chunked_stats(apply, params, data.global_x, data.global_y, chunk)
            out["test_loss"] = jnp.mean(nll)
            out["test_accuracy"] = jnp.mean(correct)
        n, mt = data.test_y.shape
        _, correct = _chunked_stats(apply, params, data.test_x.reshape(n * mt, -1), data.test_y.reshape(-1), chunk)
        mask = jnp.arange(mt)[None, :] < data.test_counts[:, None]
        hits = jnp.sum(correct.reshape(n, mt) * mask, axis=1)
        out["client_accuracy"] = jnp.where(data.test_counts > 0, hits / jnp.maximum(data.test_counts, 1), jnp.nan)
        return out

    return evaluate


def make_personal_evaluator(apply: Apply, *, clients_per_chunk: int = 64):
    """``evaluate(stacked_params [N, ...], data) -> [N]`` accuracy of each client's own
    model (e.g. its private teacher) on its local test split (NaN without one)."""

    @jax.jit
    def evaluate(stacked_params, data: FederatedData) -> jax.Array:
        def one(args):
            params, x, y, n = args
            logits, _ = apply(params, x)
            hit = (jnp.argmax(logits, -1) == y) & (jnp.arange(y.shape[0]) < n)
            return jnp.where(n > 0, jnp.sum(hit) / jnp.maximum(n, 1), jnp.nan)

        return jax.lax.map(one, (stacked_params, data.test_x, data.test_y, data.test_counts), batch_size=clients_per_chunk)

    return evaluate


def summarize_clients(client_accuracy: np.ndarray, prefix: str = "client_acc") -> dict[str, float]:
    """Mean, 10th and 90th percentile of per-client accuracy (ignoring NaN)."""
    a = np.asarray(client_accuracy, np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {}
    return {
        f"{prefix}_mean": float(a.mean()),
        f"{prefix}_p10": float(np.percentile(a, 10)),
        f"{prefix}_p90": float(np.percentile(a, 90)),
    }
