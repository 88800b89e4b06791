"""Checkpoint-and-resume: exact, crash-safe, verified, elastic."""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fedkd_jax as fk
from fedkd_jax.builders import build_algorithm, build_compressor, build_data, build_model
from fedkd_jax.config import load_config
from fedkd_jax.errors import ConfigError
from fedkd_jax.runner import Checkpointer, read_jsonl, run_experiment
from fedkd_jax.runner.resume import saved_config

TIMING = ("round_time", "wall_time", "eval_time", "eval_seconds", "checkpoint_seconds")
BASE = [
    "data.num_clients=12", "run.cohort_size=4", "model.hidden=[16]", "distill.teacher_hidden=[24]",
    "run.eval_every=4", "run.checkpoint_every=4", "run.rounds_per_dispatch=2", "run.keep_checkpoints=5",
    "run.progress=false",
]


def final_state(run_dir, step=None, devices=None):
    cfg = saved_config(run_dir)
    data = build_data(cfg)
    model = build_model(cfg, data)
    alg = build_algorithm(cfg, model, data)
    sim = fk.Simulator(alg, data, cohort_size=cfg.run.cohort_size, mesh=fk.client_mesh(devices or cfg.run.devices),
                       compressor=build_compressor(cfg), store="host")
    ck = Checkpointer(os.path.join(run_dir, "checkpoints"), store=sim.store)
    like = sim.put_state(sim.init(cfg.run.seed))
    state = ck.restore(step if step is not None else ck.latest(), like)
    ck.close()
    clients = sim.client_states(state.key) if sim.stateful else ()
    return jax.device_get((state, clients))


def assert_states_equal(a, b, exact=True):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        if exact:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def metric_rows(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]


def _png(run_dir):
    with open(os.path.join(run_dir, "accuracy.png"), "rb") as f:
        return f.read()


@pytest.mark.parametrize("algorithm", ["fedavg", "fedkd"])
def test_resume_after_losing_newest_checkpoints_is_bit_identical(tmp_path, algorithm):
    cfg = load_config(None, BASE + [f"algorithm={algorithm}", "run.rounds=12"])
    ref, crashed = str(tmp_path / "ref"), str(tmp_path / "crashed")
    run_experiment(cfg, ref)
    run_experiment(cfg, crashed)
    # as if killed right after round 8: newer checkpoints never committed, rows 9-12 logged
    shutil.rmtree(os.path.join(crashed, "checkpoints", "12"))
    with open(os.path.join(crashed, "metrics.jsonl"), "a") as f:
        f.write('{"round": 13, "train_lo')  # a torn line
    res = run_experiment(cfg, crashed)
    assert res.resumed_from == 8 and res.rounds == 12
    assert_states_equal(final_state(ref), final_state(crashed))
    assert metric_rows(ref) == metric_rows(crashed)
    assert [r["round"] for r in metric_rows(crashed)] == list(range(1, 13))
    assert _png(ref) == _png(crashed)


def test_more_rounds_on_resume_continue_the_same_trajectory(tmp_path):
    long = load_config(None, BASE + ["algorithm=fedavg", "run.rounds=12"])
    short = load_config(None, BASE + ["algorithm=fedavg", "run.rounds=8"])
    run_experiment(long, str(tmp_path / "long"))
    run_experiment(short, str(tmp_path / "grow"))
    run_experiment(long, str(tmp_path / "grow"))  # only run.rounds differs: allowed
    assert_states_equal(final_state(str(tmp_path / "long")), final_state(str(tmp_path / "grow")))
    # the cumulative clocks continue across the resume instead of restarting at 0
    rows = read_jsonl(os.path.join(str(tmp_path / "grow"), "metrics.jsonl"))
    for key in ("wall_time", "eval_seconds", "checkpoint_seconds"):
        clock = [r[key] for r in rows]
        assert clock == sorted(clock) and clock[8] >= clock[7] > 0, key


def test_incompatible_config_is_refused_naming_keys(tmp_path):
    cfg = load_config(None, BASE + ["algorithm=fedavg", "run.rounds=4"])
    out = str(tmp_path / "run")
    run_experiment(cfg, out)
    before = open(os.path.join(out, "metrics.jsonl")).read()
    other = load_config(None, BASE + ["algorithm=fedavg", "run.rounds=8", "data.alpha=0.1", "run.seed=3"])
    with pytest.raises(ConfigError) as e:
        run_experiment(other, out)
    assert "data.alpha (saved 0.5, now 0.1)" in str(e.value) and "run.seed (saved 0, now 3)" in str(e.value)
    assert open(os.path.join(out, "metrics.jsonl")).read() == before


@pytest.mark.parametrize("corruption", ["flip", "truncate"])
def test_corrupted_newest_checkpoint_falls_back_to_previous(tmp_path, corruption):
    cfg = load_config(None, BASE + ["algorithm=fedavg", "run.rounds=12"])
    ref, bad = str(tmp_path / "ref"), str(tmp_path / "bad")
    run_experiment(cfg, ref)
    run_experiment(cfg, bad)
    # damage every data file of the newest step (orbax may keep more than one copy)
    files = [f for f in glob.glob(os.path.join(bad, "checkpoints", "12", "**", "*"), recursive=True)
             if os.path.isfile(f) and f"{os.sep}d{os.sep}" in f]
    assert files
    for target in files:
        size = os.path.getsize(target)
        with open(target, "r+b") as f:
            if corruption == "flip":
                f.seek(size // 2)
                b = f.read(1)
                f.seek(size // 2)
                f.write(bytes([b[0] ^ 0x10]))
            else:
                f.truncate(size // 3)
    with pytest.warns(UserWarning, match="round 12 is unreadable or corrupted"):
        res = run_experiment(cfg, bad)
    assert res.resumed_from == 8
    assert os.listdir(os.path.join(bad, "checkpoints-corrupt"))  # kept aside, not deleted
    assert_states_equal(final_state(ref), final_state(bad))
    assert metric_rows(ref) == metric_rows(bad)


def test_checkpoint_restores_on_fewer_and_more_devices(tmp_path):
    assert jax.device_count() == 4
    # FedKD without compression: the SVD schedule spans run.rounds, which this test changes
    kd = ["algorithm=fedkd", "compression.method=none"]
    four = load_config(None, BASE + kd + ["run.rounds=8", "run.devices=4"])
    out = str(tmp_path / "elastic")
    run_experiment(four, out)
    s4 = final_state(out, devices=4)
    for devices in (1, 2):
        s = final_state(out, devices=devices)
        assert_states_equal(s4, s)  # the saved bits, resharded
    # continue on 1 device: the same trajectory up to float summation order
    # (a psum over 4 devices adds in another order than one device's scan)
    run_experiment(load_config(None, BASE + kd + ["run.rounds=9", "run.devices=1"]), out)
    ref = str(tmp_path / "ref4")
    run_experiment(load_config(None, BASE + kd + ["run.rounds=9", "run.devices=4"]), ref)
    assert_states_equal(final_state(ref), final_state(out, devices=1), exact=False)
    # and back on 4 devices
    res = run_experiment(load_config(None, BASE + kd + ["run.rounds=12", "run.devices=4"]), out)
    assert res.resumed_from == 9 and int(final_state(out, devices=4)[0].round) == 12


# ---------------------------------------------------------------- processes
SUB = BASE + ["algorithm=fedkd", "run.rounds=40", "run.checkpoint_every=2", "run.rounds_per_dispatch=1",
              "run.eval_every=5"]


def _cmd(*args):
    sets = [x for s in SUB for x in ("--set", s)]
    return [sys.executable, "-m", "fedkd_jax.cli", *args, *sets, "--no-progress"]


def _env():
    return dict(os.environ, FEDKD_CPU_DEVICES="2")


def _wait_for_round(out, target, proc, timeout=120):
    path = os.path.join(out, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if os.path.exists(path):
            with open(path) as f:
                n = sum(1 for _ in f)
            if n >= target:
                return True
        time.sleep(0.01)
    return False


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "run")
    p = subprocess.run(_cmd("run", "--out", out), env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return out


def test_kill_9_at_random_moments_then_resume_matches_uninterrupted(tmp_path, reference_run):
    rng = random.Random(1234)
    ref_state, ref_rows = final_state(reference_run, devices=2), metric_rows(reference_run)
    for trial in range(2):
        out = str(tmp_path / f"k{trial}")
        proc = subprocess.Popen(_cmd("run", "--out", out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        reached = _wait_for_round(out, rng.randint(3, 30), proc)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert reached or proc.returncode == 0, proc.stderr.read()
        p = subprocess.run([sys.executable, "-m", "fedkd_jax.cli", "resume", out, "--no-progress"], env=_env(),
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert_states_equal(ref_state, final_state(out, devices=2))
        assert metric_rows(out) == ref_rows


def test_sigterm_finishes_the_round_checkpoints_and_exits_zero(tmp_path, reference_run):
    out = str(tmp_path / "term")
    proc = subprocess.Popen(_cmd("run", "--out", out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for_round(out, 7, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped by signal after round" in stdout and f"fedkd resume {out}" in stdout
    stopped = int(stdout.split("after round ")[1].split(";")[0])
    assert stopped < 40
    steps = Checkpointer(os.path.join(out, "checkpoints")).steps()
    assert max(steps) == stopped  # the checkpoint covers every logged round
    assert [r["round"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))] == list(range(1, stopped + 1))
    p = subprocess.run([sys.executable, "-m", "fedkd_jax.cli", "resume", out, "--no-progress"], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and f"resumed from the checkpoint of round {stopped}" in p.stdout
    assert_states_equal(final_state(reference_run, devices=2), final_state(out, devices=2))
    assert metric_rows(out) == metric_rows(reference_run)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["run"]["rounds"] == 40


def test_client_store_is_saved_incrementally_and_verified(tmp_path):
    cfg = load_config(None, BASE + ["algorithm=fedkd", "run.rounds=12"])
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    run_experiment(cfg, ref)
    run_experiment(cfg, run)
    store = os.path.join(run, "checkpoints-clients")
    files = sorted(f for f in os.listdir(store) if f.endswith(".npy"))
    # the initial store is a function of the seed: never written
    assert files == ["segment-000000004.npy", "segment-000000008.npy", "segment-000000012.npy"]
    # a segment holds exactly the clients sampled since the previous checkpoint
    key = jax.random.key(cfg.run.seed)
    sampled = {int(c) for r in range(4, 8)
               for c in fk.engine.sample_cohort(key, r, cfg.data.num_clients, cfg.run.cohort_size)}
    with open(os.path.join(store, "segment-000000008.npy"), "rb") as f:
        assert set(np.load(f).tolist()) == sampled
    assert len(sampled) < cfg.data.num_clients
    # damage the newest segment: the checkpoint of round 12 is rejected, round 8 restored
    path = os.path.join(store, "segment-000000012.npy")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - 200)
        b = f.read(1)
        f.seek(size - 200)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.warns(UserWarning, match="round 12"):
        res = run_experiment(cfg, run)
    assert res.resumed_from == 8
    assert_states_equal(final_state(ref), final_state(run))


def test_client_store_chains_segments_and_compacts_into_a_base(tmp_path):
    from fedkd_jax.runner.client_store import ClientStoreCheckpointer
    from fedkd_jax.store import HostStore

    template = {"w": jax.ShapeDtypeStruct((2,), np.float32), "b": jax.ShapeDtypeStruct((), np.int32)}
    live = HostStore(template, 5)
    cs = ClientStoreCheckpointer(str(tmp_path), 5, compact_factor=1.0)
    cs.start_from_init()
    snapshots, chains = [], []
    for r, dirty in enumerate([[0, 1], [2, 3], [4, 0]], start=1):
        ids = np.array(dirty)
        rows = {"w": np.full((2, 2), 100.0 * r, np.float32) + ids[:, None], "b": np.full(2, r, np.int32)}
        live.scatter(ids, rows)
        snapshots.append(([a.copy() for a in live.arrays], live.touched.copy()))
        chains.append(cs.save(r, live, live.take_dirty()))
    cs.wait()
    assert [e["kind"] for e in chains[1]] == ["init", "segment", "segment"]
    assert [e["kind"] for e in chains[2]] == ["base"]  # 6 rows since the base > 1.0 x 5 touched clients
    for chain, (arrays, touched) in zip(chains, snapshots):
        got = HostStore(template, 5)
        ClientStoreCheckpointer(str(tmp_path), 5).load(chain, got)
        np.testing.assert_array_equal(got.touched, touched)
        for a, b in zip(got.arrays, arrays):
            np.testing.assert_array_equal(a[touched], b[touched])
    cs.close()
