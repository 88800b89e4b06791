"""A second SIGTERM / Ctrl-C ends a run whose dispatch never returns, keeping the last checkpoint."""

import os
import signal
import subprocess
import sys
import time

import pytest

from fedkd_jax.runner import Checkpointer, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The third dispatch blocks the main thread inside C for good (a plain mutex
# locked twice by its owner), as a deadlocked device program does: no Python
# signal handler can run there, only the stop flag's watcher thread.
SCRIPT = r"""
import ctypes, sys
import jax
jax.config.update("jax_num_cpu_devices", 1)
from fedkd_jax.config import load_config
from fedkd_jax.engine import Simulator
from fedkd_jax.runner import run_experiment

calls = [0]
execute = Simulator.execute

def hanging_execute(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:
        print("dispatch 3 hangs", flush=True)
        libc, mutex = ctypes.CDLL(None), ctypes.create_string_buffer(64)  # zeroed: a default glibc mutex
        libc.pthread_mutex_lock(mutex)
        libc.pthread_mutex_lock(mutex)  # never returns
    return execute(self, *args, **kwargs)

Simulator.execute = hanging_execute
cfg = load_config(None, ["algorithm=fedavg", "data.num_clients=10", "run.cohort_size=4", "run.rounds=10",
                         "run.rounds_per_dispatch=1", "run.checkpoint_every=1", "run.eval_every=100",
                         "model.hidden=[8]"])
run_experiment(cfg, sys.argv[1], progress=False)
print("finished", flush=True)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="blocks the dispatch with a glibc mutex")
def test_second_signal_ends_a_hung_dispatch_and_keeps_the_last_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, out], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "dispatch 3 hangs", proc.stderr.read()
        deadline = time.monotonic() + 60
        while not os.path.isdir(os.path.join(out, "checkpoints", "2")) and time.monotonic() < deadline:
            time.sleep(0.1)  # round 2's asynchronous save commits
        proc.send_signal(signal.SIGTERM)  # graceful: would wait for the dispatch forever
        time.sleep(1.0)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)  # the second signal: stop now
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "SIGTERM received: stopping after the running dispatch" in stderr
    line = next(x for x in stderr.splitlines() if "second signal" in x)
    assert line == ("fedkd: second signal (SIGINT): stopping without waiting for the running dispatch; "
                    f"the last checkpoint (round 2) is intact; resume with: fedkd resume {out}")
    assert "finished" not in stdout
    assert Checkpointer(os.path.join(out, "checkpoints")).steps() == [1, 2]
    assert [r["round"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))] == [1, 2]
