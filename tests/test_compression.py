"""Compressors: exactness, payload sizes, unbiasedness."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedkd_jax.compression import energy_threshold, quant8, svd, svd_leaf, topk

rng = np.random.default_rng(0)
U = {"w": jnp.asarray(rng.normal(size=(40, 12)).astype(np.float32)), "b": jnp.asarray(rng.normal(size=(12,)).astype(np.float32))}
KEY = jax.random.key(0)


def test_svd_at_threshold_one_reproduces_the_update():
    out, nbytes = svd(10, energy_start=1.0, energy_end=1.0).compress(U, KEY, jnp.int32(3))
    np.testing.assert_allclose(out["w"], U["w"], atol=1e-5)
    np.testing.assert_array_equal(out["b"], U["b"])
    assert float(nbytes) == 4 * (40 * 12 + 12)  # full rank: the dense matrix is sent


def test_svd_keeps_the_smallest_rank_meeting_the_energy_and_counts_its_bytes():
    a = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 20))  # rank 3
    x = jnp.asarray(a.astype(np.float32))
    out, nbytes = svd_leaf(x, jnp.float32(0.999))
    s = np.linalg.svd(a, compute_uv=False)
    energy = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(energy >= 0.999 * (1 - 1e-6)) + 1)
    assert k <= 3
    assert float(nbytes) == 4 * k * (50 + 20 + 1)
    np.testing.assert_allclose(out, a, atol=1e-3 if k == 3 else 0.5)


def test_svd_threshold_schedule():
    # wuch15/FedKD run.py: energy = tmin + ((1 + comm_round) / epochs) * (tmax - tmin), by hand for R = 20
    np.testing.assert_allclose(float(energy_threshold(0, 20, 0.95, 0.98)), 0.9515, rtol=1e-6)  # first round
    np.testing.assert_allclose(float(energy_threshold(9, 20, 0.95, 0.98)), 0.965, rtol=1e-6)
    np.testing.assert_allclose(float(energy_threshold(19, 20, 0.95, 0.98)), 0.98, rtol=1e-6)  # last round
    np.testing.assert_allclose(float(energy_threshold(30, 20, 0.95, 0.98)), 0.98, rtol=1e-6)  # clipped after
    np.testing.assert_allclose(float(energy_threshold(0, 1, 0.5, 0.9)), 0.9, rtol=1e-6)  # R = 1: T_end at once


def test_topk_keeps_the_largest_entries():
    out, nbytes = topk(0.25).compress(U, KEY, jnp.int32(0))
    for name, leaf in U.items():
        flat = np.asarray(leaf).ravel()
        k = math.ceil(0.25 * flat.size)
        kept = np.asarray(out[name]).ravel()
        assert np.count_nonzero(kept) == k
        top = np.argsort(-np.abs(flat))[:k]
        np.testing.assert_array_equal(kept[top], flat[top])
    assert float(nbytes) == 8 * (math.ceil(0.25 * 480) + math.ceil(0.25 * 12))


def test_quant8_is_unbiased_and_bounded():
    q = quant8()
    outs = jnp.stack([q.compress(U, jax.random.key(i), 0)[0]["w"] for i in range(400)])
    scale = float(jnp.max(jnp.abs(U["w"]))) / 127
    assert float(jnp.max(jnp.abs(outs - U["w"]))) <= scale * 1.0001
    np.testing.assert_allclose(outs.mean(0), U["w"], atol=scale * 0.2)
    _, nbytes = q.compress(U, KEY, 0)
    assert float(nbytes) == 480 + 4 + 12 + 4
