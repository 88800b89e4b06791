"""Several processes on 127.0.0.1 with jax.distributed: the same run, a lost peer, bad launches."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from fedkd_jax.distributed import free_port
from fedkd_jax.runner import read_jsonl

ARGS = ["--no-progress", "--set", "algorithm=fedkd", "--set", "data.num_clients=16", "--set", "run.cohort_size=4",
        "--set", "model.hidden=[16]", "--set", "distill.teacher_hidden=[24]", "--set", "run.eval_every=4",
        "--set", "run.checkpoint_every=4", "--set", "run.rounds_per_dispatch=2", "--set", "run.client_store=host"]
TIMING = ("round_time", "wall_time", "eval_time", "eval_seconds", "checkpoint_seconds")


def _fedkd(*args, env=None, timeout=400):
    return subprocess.run([sys.executable, "-m", "fedkd_jax.cli", *args], capture_output=True, text=True,
                          env=env or dict(os.environ), timeout=timeout)


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]


def _children_with(process_id: int) -> list[int]:
    """Pids of launched processes with FEDKD_PROCESS_ID=process_id (read from /proc)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"FEDKD_PROCESS_ID={process_id}".encode() in env and b"FEDKD_TEST_MARK=distributed" in env:
            pids.append(int(pid))
    return pids


def test_two_processes_equal_one_and_survive_a_lost_peer(tmp_path):
    rounds = ["--set", "run.rounds=16"]
    one = tmp_path / "one"
    env1 = dict(os.environ, FEDKD_CPU_DEVICES="2")
    p = _fedkd("run", "--out", str(one), *ARGS, *rounds, env=env1)
    assert p.returncode == 0, p.stderr

    # 2 processes x 1 device; process 1 is killed (-9) after the checkpoint of round 8
    two = tmp_path / "two"
    env2 = dict(os.environ, FEDKD_TEST_MARK="distributed")
    cmd = [sys.executable, "-m", "fedkd_jax.cli", "launch", "--processes", "2", "--devices-per-process", "1",
           "--timeout", "60", "--", "run", "--out", str(two), *ARGS, *rounds]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env2)
    deadline = time.time() + 300
    while time.time() < deadline and not (two / "checkpoints" / "8").exists() and launcher.poll() is None:
        time.sleep(0.05)
    victims = _children_with(1)
    assert victims and launcher.poll() is None
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert "process 1 of 2 was killed by signal 9" in err and "Traceback" not in err.split("---")[0]
    assert not _children_with(0)  # the launcher stopped the surviving process

    # resume with the same launch: it continues from the last checkpoint and ends like the 1-process run
    q = subprocess.run(cmd, capture_output=True, text=True, env=env2, timeout=400)
    assert q.returncode == 0, q.stderr[-3000:]
    assert "resumed from the checkpoint of round" in q.stdout
    a, b = _rows(str(one)), _rows(str(two))
    assert [r["round"] for r in a] == [r["round"] for r in b] == list(range(1, 17))
    for ra, rb in zip(a, b):
        assert ra["bytes_up"] == rb["bytes_up"]  # same cohorts, same compressed uploads
        for k in ("train_loss", "test_accuracy", "teacher_acc_mean"):
            if ra.get(k) is not None:
                np.testing.assert_allclose(ra[k], rb[k], rtol=1e-5, atol=1e-6)


def test_unreachable_coordinator_and_bad_process_counts_fail_clearly(tmp_path):
    env = dict(os.environ, FEDKD_COORDINATOR=f"127.0.0.1:{free_port()}", FEDKD_NUM_PROCESSES="2",
               FEDKD_PROCESS_ID="1", FEDKD_INIT_TIMEOUT="3", FEDKD_CPU_DEVICES="1")
    p = _fedkd("run", "--out", str(tmp_path / "x"), *ARGS, "--set", "run.rounds=2", env=env, timeout=120)
    assert p.returncode == 2 and "fedkd: error: --coordinator:" in p.stderr and "within 3 s" in p.stderr
    assert "Traceback" not in p.stderr
    for n in ("0", "-1"):
        p = _fedkd("launch", "--processes", n, "--", "run", "--out", str(tmp_path / "y"))
        assert p.returncode == 2 and "fedkd: error: --processes: must be at least 1" in p.stderr
    p = _fedkd("launch", "--processes", "2", "--", "frobnicate")
    assert p.returncode == 2 and "fedkd: error: command:" in p.stderr
