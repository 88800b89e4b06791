"""Several processes (hosts) running one simulation with ``jax.distributed``.

Each process runs the same deterministic host code (data, cohorts, plans) and
drives its own devices; the compiled round spans the global mesh of every
process's devices, and its one all-reduce crosses processes (gloo on CPU,
NCCL on GPU). Process 0 alone writes the run directory, logs and plots;
checkpoints are orbax multi-process checkpoints.

A process joins a job in one of two ways, checked by :func:`initialize`
before anything touches a device:

* ``fedkd launch --processes N -- run ...`` starts N local processes on
  127.0.0.1 and tells each its coordinator, count and index through
  ``FEDKD_COORDINATOR``, ``FEDKD_NUM_PROCESSES`` and ``FEDKD_PROCESS_ID``;
* a cluster launcher (SLURM ``srun``, Open MPI ``mpirun``, ...) sets its own
  variables, and ``jax.distributed.initialize()`` detects them.
"""

from __future__ import annotations

import os
import socket

from fedkd_jax.errors import ConfigError

ENV_COORDINATOR, ENV_COUNT, ENV_INDEX, ENV_TIMEOUT = (
    "FEDKD_COORDINATOR", "FEDKD_NUM_PROCESSES", "FEDKD_PROCESS_ID", "FEDKD_INIT_TIMEOUT")
_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def cluster_detected() -> bool:
    """Whether a cluster launcher started this process as one of several."""
    for var in _CLUSTER_SIZE_VARS:
        try:
            if int(os.environ.get(var, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def _use_gloo() -> None:
    import jax

    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, RuntimeError, ValueError):  # older/newer names, or already set
        pass


def initialize() -> bool:
    """Join a multi-process job if this process was started as part of one.

    Must run before any JAX computation. Returns whether a job was joined.

    Raises:
      ConfigError: malformed launch variables, or the coordinator could not be
        reached within ``FEDKD_INIT_TIMEOUT`` seconds (default 60).
    """
    coord = os.environ.get(ENV_COORDINATOR)
    if not coord and not cluster_detected():
        return False
    import jax

    _use_gloo()
    timeout = int(float(os.environ.get(ENV_TIMEOUT, "60")))
    try:
        if coord:
            try:
                count, index = int(os.environ[ENV_COUNT]), int(os.environ[ENV_INDEX])
            except (KeyError, ValueError):
                raise ConfigError("--processes", f"{ENV_COUNT} / {ENV_INDEX} are missing or not integers "
                                                 f"({ENV_COORDINATOR} is set)") from None
            if index != 0:
                # XLA's coordination client aborts the process when it cannot connect;
                # check reachability first so the user gets one clear line instead.
                _wait_for(coord, timeout)
            jax.distributed.initialize(coord, num_processes=count, process_id=index,
                                       initialization_timeout=timeout)
        else:
            jax.distributed.initialize(initialization_timeout=timeout)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - jax raises several types for an unreachable coordinator
        where = coord or "the cluster's coordinator"
        raise ConfigError("--coordinator", f"could not join the job at {where} within {timeout} s "
                                           f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    return True


def _wait_for(address: str, timeout: float) -> None:
    import time

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ConfigError("--coordinator", f"could not join the job at {address} within {timeout:g} s "
                                                   "(nothing is listening there)") from None
            time.sleep(0.2)


def is_primary() -> bool:
    import jax

    return jax.process_index() == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agree(flag: bool) -> bool:
    """``True`` on every process if it is ``True`` on any (e.g. a stop request)."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(bool(flag)))))


def barrier(name: str) -> None:
    """Wait until every process reaches this point (no-op in one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
