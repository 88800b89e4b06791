"""Jitted, batched evaluation of the global model and of personal models.

Global metrics on the held-out test set, and the per-client accuracy of the
global model on each client's local test split (its distribution tells how
evenly the model serves the population). With a large population the
per-client figures come from a fixed, seeded sample of clients
(``max_clients``), the same at every evaluation.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedkd_jax.data import FederatedData
from fedkd_jax.engine.placement import put_replicated

Apply = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
_EVAL_TAG = 0xE7A1


class EvalData(NamedTuple):
    """Evaluation inputs on the devices.

    Attributes:
      global_x, global_y: ``[G, D]``, ``[G]`` the global test set.
      pool_x, pool_y: the pooled rows (the same arrays the rounds use).
      test_rows: ``[E, Mt]`` int32 pool rows of the evaluated clients' local tests.
      test_counts: ``[E]`` int32 real rows (0: no local test split).
    """

    global_x: jax.Array
    global_y: jax.Array
    pool_x: jax.Array
    pool_y: jax.Array
    test_rows: jax.Array
    test_counts: jax.Array


def eval_clients(num_clients: int, max_clients: int | None, seed: int) -> np.ndarray:
    """Ids whose local tests are evaluated: all, or a fixed seeded sample of ``max_clients``."""
    if max_clients is None or num_clients <= max_clients:
        return np.arange(num_clients)
    return np.sort(np.random.default_rng([seed, _EVAL_TAG]).choice(num_clients, max_clients, replace=False))


def make_eval_data(data: FederatedData, pool, sharding, *, ids: np.ndarray | None = None) -> EvalData:
    """Place what evaluation needs; ``pool`` is the simulator's ``PoolData``, or a
    ``HostPool`` (then only the evaluated clients' test rows are placed)."""
    from fedkd_jax.engine.pool import HostPool, compact_rows
    from fedkd_jax.engine.state import PoolData

    ids = np.arange(data.num_clients) if ids is None else np.asarray(ids)
    rows = data.row_table(ids, test=True)
    counts = data.test_counts[ids]
    if isinstance(pool, HostPool):
        used, rows = compact_rows(rows, counts, capacity=max(1, rows.size))
        pool = put_replicated(PoolData(np.asarray(pool.x[used], np.float32), np.asarray(pool.y[used], np.int32)),
                              sharding)
    host = (np.asarray(data.global_x, np.float32), np.asarray(data.global_y, np.int32))
    g = put_replicated(host, sharding)
    t = put_replicated((rows, counts.astype(np.int32)), sharding)
    return EvalData(g[0], g[1], pool.x, pool.y, t[0], t[1])


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


def _scored(y: jax.Array, ignore: tuple[int, ...]) -> jax.Array:
    """Token positions that count towards accuracy: not padding (``< 0``) and not one of
    ``ignore`` (e.g. next-word prediction's out-of-vocabulary and end-of-sentence ids)."""
    keep = y >= 0
    for t in ignore:
        keep = keep & (y != t)
    return keep


def _token_stats(apply: Apply, params, x: jax.Array, y: jax.Array, chunk: int, ignore: tuple[int, ...]):
    """Token tasks (``y [R, L]``, negative at padding): sums of NLL over real tokens, real
    tokens, correct scored tokens and scored tokens (see :func:`_scored`), in chunks."""
    r = x.shape[0]
    n_chunks = max(1, -(-r // chunk))
    pad = n_chunks * chunk - r
    xp = jnp.pad(x, ((0, pad), (0, 0))).reshape((n_chunks, chunk) + x.shape[1:])
    yp = jnp.pad(y, ((0, pad), (0, 0)), constant_values=-1).reshape((n_chunks, chunk) + y.shape[1:])

    def one(batch):
        xb, yb = batch
        logits, _ = apply(params, xb)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        real = yb >= 0
        nll = -jnp.take_along_axis(logp, jnp.maximum(yb, 0)[..., None], axis=-1)[..., 0]
        scored = _scored(yb, ignore)
        hit = (jnp.argmax(logits, -1) == yb) & scored
        return jnp.stack([jnp.sum(jnp.where(real, nll, 0.0)), jnp.sum(real), jnp.sum(hit), jnp.sum(scored)])

    return jnp.sum(jax.lax.map(one, (xp, yp)), axis=0)


def _client_accuracy(apply: Apply, ev: EvalData, clients_per_chunk: int, *, shared=None, stacked=None,
                     ignore: tuple[int, ...] = ()) -> jax.Array:
    """Accuracy of ``shared`` params (or each client's ``stacked`` params) on each local test
    (token tasks: over the scored tokens of its test rows)."""

    def one(args):
        params, rows, n = args
        logits, _ = apply(shared if params is None else params, ev.pool_x[rows])
        y = ev.pool_y[rows]
        real_row = jnp.arange(rows.shape[0]) < n
        if y.ndim > 1:
            scored = _scored(y, ignore) & real_row.reshape((-1,) + (1,) * (y.ndim - 1))
            hits, total = jnp.sum((jnp.argmax(logits, -1) == y) & scored), jnp.sum(scored)
            return jnp.where(total > 0, hits / jnp.maximum(total, 1), jnp.nan)
        hit = (jnp.argmax(logits, -1) == y) & real_row
        return jnp.where(n > 0, jnp.sum(hit) / jnp.maximum(n, 1), jnp.nan)

    return jax.lax.map(one, (stacked, ev.test_rows, ev.test_counts), batch_size=clients_per_chunk)


@functools.lru_cache(maxsize=64)
def make_evaluator(apply: Apply, *, chunk: int = 1024, clients_per_chunk: int = 64, ignore: tuple[int, ...] = ()):
    """``evaluate(params, ev: EvalData) -> metrics`` (jitted; one per model, cached).

    Returns a dict with ``test_loss``, ``test_accuracy`` (global test set) and
    ``client_accuracy [E]`` (NaN for clients without a local test split). Token
    tasks: the loss per real token, accuracy over the real tokens whose label is
    not in ``ignore`` (Reddi et al. 2021 leave out-of-vocabulary and
    end-of-sentence tokens out of next-word accuracy).
    """

    @jax.jit
    def evaluate(params, ev: EvalData) -> dict[str, jax.Array]:
        out = {}
        if ev.global_y.shape[0] and ev.global_y.ndim > 1:
            nll, tokens, hits, scored = _token_stats(apply, params, ev.global_x, ev.global_y, chunk, ignore)
            out["test_loss"] = nll / jnp.maximum(tokens, 1)
            out["test_accuracy"] = hits / jnp.maximum(scored, 1)
        elif ev.global_y.shape[0]:
            nll, correct = _chunked_stats(apply, params, ev.global_x, ev.global_y, chunk)
            out["test_loss"] = jnp.mean(nll)
            out["test_accuracy"] = jnp.mean(correct)
        out["client_accuracy"] = _client_accuracy(apply, ev, clients_per_chunk, shared=params, ignore=ignore)
        return out

    return evaluate


def personal_accuracy(apply: Apply, ev: EvalData, stacked_params, *, clients_per_chunk: int = 64,
                      ignore: tuple[int, ...] = ()) -> jax.Array:
    """``[E]`` accuracy of each evaluated client's own ``stacked_params`` on its local
    test split (NaN without one); traceable, for use inside a caller's jit."""
    return _client_accuracy(apply, ev, clients_per_chunk, stacked=stacked_params, ignore=ignore)


@functools.lru_cache(maxsize=64)
def make_personal_evaluator(apply: Apply, *, clients_per_chunk: int = 64, ignore: tuple[int, ...] = ()):
    """``evaluate(stacked_params [E, ...], ev) -> [E]`` accuracy of each evaluated client's
    own model (e.g. its private teacher) on its local test split (NaN without one)."""

    @jax.jit
    def evaluate(stacked_params, ev: EvalData) -> jax.Array:
        return personal_accuracy(apply, ev, stacked_params, clients_per_chunk=clients_per_chunk, ignore=ignore)

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
