"""CPU device count, set by entry points before anything initialises JAX's backends.

On CPU, XLA exposes one device by default and spends much of a small model's
step synchronising its intra-op thread pool. Exposing each core as a device
and sharding the cohort over them is where CPU speed comes from, so the CLI,
:func:`fedkd_jax.runner` and the scripts call :func:`configure_cpu_devices`
first. ``import fedkd_jax`` itself configures nothing, so a multi-host job
can call ``jax.distributed.initialize`` before any device is touched.
"""

from __future__ import annotations

import os
import warnings

import jax

# With one XLA device per core, every core already runs its own clients; a
# multithreaded BLAS (OpenBLAS under LAPACK calls such as eigh in the SVD
# compressor) would only fight those threads: measured on W2, FedKD's round
# took 262 ms with OpenBLAS's default threads and 113 ms with one. A value
# the user set is kept.
_USER_BLAS_THREADS = "OPENBLAS_NUM_THREADS" in os.environ


def limit_blas_threads() -> None:
    """Pin already-loaded BLAS libraries to one thread (unless the user chose a count)."""
    if _USER_BLAS_THREADS:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return
    threadpool_limits(limits=1, user_api="blas")


def _user_chose_device_count() -> bool:
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return True
    return int(jax.config.jax_num_cpu_devices) != -1


def all_devices(num_devices: int | str | None) -> int | None:
    """A device count as given in ``run.devices``: ``"all"`` is ``None`` (every device)."""
    if isinstance(num_devices, str) and num_devices.strip().lower() == "all":
        return None
    return num_devices


def configure_cpu_devices(num_devices: int | str | None = None) -> int | None:
    """Expose ``num_devices`` CPU devices (default, or ``"all"``: ``FEDKD_CPU_DEVICES`` or the core count).

    Without an explicit count this defers to a count the user already chose
    (``jax_num_cpu_devices`` or ``XLA_FLAGS``). Once JAX's backends have
    started the count cannot change: an explicit request that differs only warns.

    Returns:
      The count now requested, or ``None`` if left unchanged.
    """
    num_devices = all_devices(num_devices)
    if num_devices is None:
        if _user_chose_device_count():
            return None
        num_devices = int(os.environ.get("FEDKD_CPU_DEVICES", os.cpu_count() or 1))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        jax.config.update("jax_num_cpu_devices", max(1, int(num_devices)))
    except RuntimeError:  # backends already started: the count is fixed
        if jax.default_backend() == "cpu" and num_devices != jax.local_device_count():
            warnings.warn(
                f"JAX already started with {jax.local_device_count()} CPU devices; cannot switch to {num_devices}. "
                "Call fedkd_jax.configure_cpu_devices before any JAX computation.",
                stacklevel=2,
            )
        return None
    return num_devices
