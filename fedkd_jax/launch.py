"""``fedkd launch``: start N local processes on 127.0.0.1 that run one job.

    fedkd launch --processes 2 [--devices-per-process 1] [--timeout 60] -- run --out runs/x [...]

Each child is ``fedkd <command...>`` with ``FEDKD_COORDINATOR``,
``FEDKD_NUM_PROCESSES`` and ``FEDKD_PROCESS_ID`` set (see
:mod:`fedkd_jax.distributed`). Process 0's output is shown; the others' is
kept and shown if they fail. When one process exits with an error (or is
killed), the launcher stops the others and names the lost process, and the
run can be resumed from its last checkpoint with the same command.
SIGTERM / Ctrl-C are forwarded to every process, which checkpoint and stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

from fedkd_jax.distributed import ENV_COORDINATOR, ENV_COUNT, ENV_INDEX, ENV_TIMEOUT, free_port
from fedkd_jax.errors import ConfigError


def launch(processes: int, command: list[str], *, devices_per_process: int | None = None, timeout: float = 60.0,
           port: int | None = None) -> int:
    """Run ``fedkd <command...>`` as ``processes`` processes; return the exit status."""
    if not command or command[0] not in ("run", "resume"):
        raise ConfigError("command", "give the fedkd command to run after '--', e.g. -- run --out runs/x")
    return launch_argv(processes, ["-m", "fedkd_jax.cli", *command], devices_per_process=devices_per_process,
                       timeout=timeout, port=port)


def launch_script() -> int:
    """``python -c 'from fedkd_jax.launch import launch_script; launch_script()' N K script.py args...``:
    any Python script as N processes of K CPU devices (used by the benchmarks)."""
    processes, per, *argv = sys.argv[1:]
    return launch_argv(int(processes), argv, devices_per_process=int(per))


def launch_argv(processes: int, argv: list[str], *, devices_per_process: int | None = None, timeout: float = 60.0,
                port: int | None = None) -> int:
    """Run ``python <argv...>`` as ``processes`` processes of one job (see the module docstring)."""
    if processes < 1:
        raise ConfigError("--processes", f"must be at least 1; got {processes}")
    if timeout <= 0:
        raise ConfigError("--timeout", f"must be positive seconds; got {timeout}")
    port = port or free_port()
    procs, logs = [], []
    for i in range(processes):
        env = dict(os.environ)
        env.update({ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_COUNT: str(processes), ENV_INDEX: str(i),
                    ENV_TIMEOUT: str(timeout)})
        if devices_per_process:
            env["FEDKD_CPU_DEVICES"] = str(devices_per_process)
        log = None if i == 0 else tempfile.TemporaryFile(mode="w+")
        procs.append(subprocess.Popen([sys.executable, *argv], env=env,
                                      stdout=log, stderr=subprocess.STDOUT if log else None))
        logs.append(log)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                # When several are seen down at once, the lost one is more likely the one
                # killed outright than one aborting because its peer went away.
                i = min(failed, key=lambda j: (codes[j] in (-signal.SIGABRT, 1, 2), j))
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                deadline = time.time() + 10  # a survivor may hang in a collective: then it is killed
                for p in procs:
                    try:
                        p.wait(timeout=max(0.1, deadline - time.time()))
                    except subprocess.TimeoutExpired:
                        p.kill()
                code = codes[i]
                how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                if logs[i] is not None:
                    logs[i].seek(0)
                    tail = logs[i].read()[-3000:]
                    if tail.strip():
                        print(f"--- output of process {i} ---\n{tail}", file=sys.stderr)
                print(f"fedkd: error: process {i} of {processes} {how}; stopped the other processes. "
                      f"Resume with the same command (the run continues from its last checkpoint).", file=sys.stderr)
                return 2 if code > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for log in logs:
            if log is not None:
                log.close()
