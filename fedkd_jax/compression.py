"""Compression of uploaded client updates.

A :class:`Compressor` maps one client's update pytree to the update the
server reconstructs from the compressed payload, plus the payload's size in
bytes. The engine applies it to every client's upload, inside the compiled
round, before aggregation. The server only ever sees the decompressed update.

* ``svd``: FedKD's dynamic-rank SVD (Wu et al. 2022). Each 2-D leaf keeps the
  smallest rank whose singular values hold a fraction ``T(t)`` of the
  energy (sum of squared singular values), with
  ``T(t) = T_start + (T_end - T_start) * (1 + t) / R`` for the 0-based round
  ``t`` of ``R`` (the reference code's schedule, wuch15/FedKD ``run.py``). The
  payload is ``k * (m + n + 1)`` floats, or the dense ``m * n`` when that is
  no larger (and always when only full rank meets the threshold). Other
  leaves are sent dense.
* ``topk``: the ``ceil(fraction * n)`` largest-magnitude entries of each leaf,
  sent as (value, int32 index) pairs.
* ``quant8``: unbiased 8-bit stochastic quantization per leaf: ``x / s``
  with ``s = max|x| / 127`` is rounded up or down at random in proportion
  to the remainder. The payload is one byte per entry plus a float32 scale.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedkd_jax.errors import ConfigError, concrete

COMPRESSIONS = ("none", "svd", "topk", "quant8")
__all__ = ["COMPRESSIONS", "COMPRESSORS", "Compressor", "energy_threshold", "make_compressor", "quant8", "svd", "svd_leaf", "topk"]


class Compressor(NamedTuple):
    """``compress(update, key, round) -> (decompressed_update, payload_bytes)``."""

    name: str
    compress: Callable[[Any, jax.Array, jax.Array], tuple[Any, jax.Array]]


def energy_threshold(round_index: jax.Array, rounds: int, start: float, end: float) -> jax.Array:
    """FedKD's schedule ``T(t) = T_start + (T_end - T_start) * (1 + t) / R``.

    As the reference code (wuch15/FedKD, ``run.py``:
    ``energy = tmin + ((1 + comm_round) / epochs) * (tmax - tmin)``) for the
    0-based round ``t`` of ``R = rounds``: the first round already uses
    ``T_start + (T_end - T_start) / R``, the last ``T_end`` (clipped after it).
    """
    t = jnp.clip((jnp.asarray(round_index, jnp.float32) + 1.0) / max(rounds, 1), 0.0, 1.0)
    return start + (end - start) * t


@jax.custom_batching.custom_vmap
def _eigh(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``jnp.linalg.eigh`` of one matrix; under ``vmap``, one matrix at a time on CPU.

    jaxlib 0.10's CPU LAPACK kernels split a batch (a vmapped group of
    clients, or the runs of a batched sweep) into chunks once it is worth
    200k FLOP, schedule *every* chunk on XLA's intra-op thread pool and block
    until they are done (``ParallelBatchMap``). That pool has one thread per
    core, and the CLI exposes one device per core: when every pool thread is
    running one device's batched eigh, no thread is left to run the chunks
    and the round deadlocks at 0% CPU (``run.group_size`` >= 2 on the CPU's
    devices; fixed upstream in jaxlib 0.11, which runs the batch inline).
    A sequential map of unbatched calls never schedules anything, and
    computes each eigenpair with the same LAPACK call as an unbatched client,
    so a group equals its clients run one by one bit for bit. Other platforms
    keep the batched kernel (``lax.platform_dependent`` picks per compiled
    platform); an unbatched call lowers exactly as ``jnp.linalg.eigh``.
    """
    evals, vecs = jnp.linalg.eigh(a)
    return evals, vecs


@_eigh.def_vmap
def _eigh_vmap(axis_size, in_batched, a):
    del axis_size
    if not in_batched[0]:
        return _eigh(a), (False, False)
    evals, vecs = jax.lax.platform_dependent(a, cpu=lambda m: jax.lax.map(_eigh, m),
                                             default=lambda m: tuple(jax.vmap(jnp.linalg.eigh)(m)))
    return (evals, vecs), (True, True)


def svd_leaf(x: jax.Array, threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Low-rank reconstruction of a 2-D ``x`` keeping ``threshold`` of its energy; bytes sent.

    The singular subspace comes from ``eigh`` of the smaller Gram matrix
    (``x^T x`` or ``x x^T``): the squared singular values are its eigenvalues,
    and the rank-k reconstruction ``U_k S_k V_k^T`` equals the projection
    ``x V_k V_k^T`` (or ``U_k U_k^T x``). On CPU this is far cheaper than a
    full SVD of a tall matrix, and the discarded directions are exactly the
    ones whose precision a Gram matrix loses.
    """
    m, n = x.shape
    tall = m >= n
    gram = x.T @ x if tall else x @ x.T
    evals, vecs = _eigh(gram)  # ascending
    evals, vecs = jnp.maximum(evals[::-1], 0.0), vecs[:, ::-1]
    r = evals.shape[0]
    energy = jnp.cumsum(evals)
    total = energy[-1]
    # smallest k with energy[k-1] >= threshold * total (full rank if none earlier)
    k = jnp.minimum(jnp.sum(energy < threshold * total * (1 - 1e-6)) + 1, r)
    low_rank_floats = k * (m + n + 1)
    dense = (low_rank_floats >= m * n) | (k >= r) | (total == 0)
    basis = vecs * (jnp.arange(r) < k).astype(x.dtype)
    approx = (x @ basis) @ basis.T if tall else basis @ (basis.T @ x)
    out = jnp.where(dense, x, approx)
    nbytes = 4 * jnp.where(dense, m * n, low_rank_floats)
    return out, nbytes.astype(jnp.float32)


def svd(rounds: int, *, energy_start: float = 0.95, energy_end: float = 0.98) -> Compressor:
    for name, v in (("compression.energy_start", energy_start), ("compression.energy_end", energy_end)):
        if concrete(v) and not 0.0 < v <= 1.0:
            raise ConfigError(name, f"must be in (0, 1]; got {v}")

    def compress(update, key, round_index):
        del key
        thr = energy_threshold(round_index, rounds, energy_start, energy_end)
        leaves, treedef = jax.tree.flatten(update)
        outs, total = [], jnp.zeros((), jnp.float32)
        for leaf in leaves:
            if leaf.ndim == 2 and min(leaf.shape) > 1:
                o, b = svd_leaf(leaf, thr)
            else:
                o, b = leaf, jnp.float32(4 * leaf.size)
            outs.append(o)
            total = total + b
        return jax.tree.unflatten(treedef, outs), total

    return Compressor("svd", compress)


def topk(fraction: float) -> Compressor:
    if not 0.0 < fraction <= 1.0:
        raise ConfigError("compression.topk_fraction", f"must be in (0, 1]; got {fraction}")

    def compress(update, key, round_index):
        del key, round_index
        leaves, treedef = jax.tree.flatten(update)
        outs, total = [], 0
        for leaf in leaves:
            flat = leaf.reshape(-1)
            k = max(1, math.ceil(fraction * flat.size))
            _, idx = jax.lax.top_k(jnp.abs(flat), k)
            sparse = jnp.zeros_like(flat).at[idx].set(flat[idx])
            outs.append(sparse.reshape(leaf.shape))
            total += 8 * k  # float32 value + int32 index
        return jax.tree.unflatten(treedef, outs), jnp.float32(total)

    return Compressor("topk", compress)


def quant8() -> Compressor:
    def compress(update, key, round_index):
        del round_index
        leaves, treedef = jax.tree.flatten(update)
        keys = jax.random.split(key, len(leaves))
        outs, total = [], 0
        for leaf, k in zip(leaves, keys):
            scale = jnp.max(jnp.abs(leaf)) / 127.0
            safe = jnp.where(scale > 0, scale, 1.0)
            y = leaf / safe
            low = jnp.floor(y)
            q = low + (jax.random.uniform(k, leaf.shape) < (y - low)).astype(leaf.dtype)
            q = jnp.clip(q, -127, 127)
            outs.append(q * safe)
            total += leaf.size + 4
        return jax.tree.unflatten(treedef, outs), jnp.float32(total)

    return Compressor("quant8", compress)


# The compressor registry: name -> factory(rounds, energy_start, energy_end, topk_fraction).
COMPRESSORS: dict[str, Callable[..., Compressor | None]] = {
    "none": lambda **kw: None,
    "svd": lambda *, rounds, energy_start, energy_end, **kw: svd(rounds, energy_start=energy_start,
                                                                 energy_end=energy_end),
    "topk": lambda *, topk_fraction, **kw: topk(topk_fraction),
    "quant8": lambda **kw: quant8(),
}


def make_compressor(
    name: str, *, rounds: int, energy_start: float = 0.95, energy_end: float = 0.98, topk_fraction: float = 0.1
) -> Compressor | None:
    """A compressor by name (:data:`COMPRESSORS`), or ``None`` for ``"none"``."""
    if name not in COMPRESSORS:
        raise ConfigError("compression.method", f"unknown compression {name!r}; allowed: {', '.join(COMPRESSIONS)}")
    return COMPRESSORS[name](rounds=rounds, energy_start=energy_start, energy_end=energy_end,
                             topk_fraction=topk_fraction)
