"""Test setup: 4 forced CPU devices (set before JAX starts) and shared small data."""

import jax

# Must precede any JAX computation: tests compare 1-device and 4-device meshes.
jax.config.update("jax_num_cpu_devices", 4)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import fedkd_jax as fk  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    return fk.data.load_digits()


@pytest.fixture(scope="session")
def digits20(digits):
    """Digits over 20 clients, Dirichlet(0.5): uneven sizes, so padding matters."""
    return fk.federate(digits, partition="dirichlet", num_clients=20, seed=3, alpha=0.5)


def make_fd(xs, ys, num_classes, test=None):
    """A FederatedData from per-client lists (numpy), padded by hand."""
    m = max(len(x) for x in xs)
    d = xs[0].shape[1]
    n = len(xs)
    x = np.zeros((n, m, d), np.float32)
    y = np.zeros((n, m), np.int32)
    for i, (a, b) in enumerate(zip(xs, ys)):
        x[i, : len(a)] = a
        y[i, : len(b)] = b
    counts = np.array([len(a) for a in xs], np.int32)
    return fk.FederatedData(
        x=x, y=y, counts=counts,
        test_x=np.zeros((n, 1, d), np.float32), test_y=np.zeros((n, 1), np.int32), test_counts=np.zeros(n, np.int32),
        global_x=np.concatenate(xs).astype(np.float32), global_y=np.concatenate(ys).astype(np.int32),
        num_classes=num_classes,
    )
