"""Test setup: 4 forced CPU devices (set before JAX starts) and shared small data."""

import os
import tempfile

# The suite's programs are tiny and each compiles once: XLA's cheapest backend optimisation
# roughly halves compile time, which dominates the suite (subprocesses inherit it). Results are
# compared within the suite or against numpy with tolerances, never against figures compiled
# at another level. FEDKD_TEST_XLA_OPT=1 keeps XLA's default.
if os.environ.get("FEDKD_TEST_XLA_OPT") != "1" and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                               " --xla_llvm_disable_expensive_passes=true").strip()

import jax  # noqa: E402

# Must precede any JAX computation: tests compare 1-device and 4-device meshes.
jax.config.update("jax_num_cpu_devices", 4)
# Many tests (and their subprocesses, through the environment) compile the same
# small programs: a session-wide persistent compilation cache compiles them once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="fedkd-test-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
# data.pool=disk's pool files go to the user's cache unless data.pool_dir says otherwise: not from tests
os.environ.setdefault("FEDKD_POOL_DIR", tempfile.mkdtemp(prefix="fedkd-test-pools-"))

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


def make_fd(xs, ys, num_classes):
    """A FederatedData from per-client lists (numpy): each client's rows, pooled."""
    counts = np.array([len(a) for a in xs], np.int64)
    x = np.concatenate(xs).astype(np.float32)
    y = np.concatenate(ys).astype(np.int32)
    n = len(xs)
    return fk.FederatedData(
        x=x, y=y,
        train_rows=np.arange(len(x), dtype=np.int32), train_offsets=np.concatenate([[0], np.cumsum(counts)]),
        test_rows=np.zeros(0, np.int32), test_offsets=np.zeros(n + 1, np.int64),
        global_x=x, global_y=y, num_classes=num_classes,
    )
