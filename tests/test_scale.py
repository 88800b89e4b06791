"""Large populations: index-based data, device / host / disk client stores, prefetch."""

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import fedkd_jax as fk
from fedkd_jax.config import load_config
from fedkd_jax.errors import ConfigError
from fedkd_jax.runner import read_jsonl, run_experiment

STUDENT = dict(num_features=64, num_classes=10, hidden=(16,))
TEACHER = dict(num_features=64, num_classes=10, hidden=(24,))
TIMING = ("round_time", "wall_time", "eval_time", "eval_seconds", "checkpoint_seconds")


def _fedkd(fd):
    s, t = fk.make_model("mlp", **STUDENT), fk.make_model("mlp", **TEACHER)
    return fk.algorithms.fedkd(s, t, optax.sgd(0.1), optax.sgd(0.1), optax.sgd(1.0), batch_size=8)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_index_based_and_copied_populations_give_identical_rounds(digits):
    fd = fk.federate(digits, partition="dirichlet", num_clients=10, seed=2, alpha=0.5)
    copied = fd.copied()
    assert copied.x.shape[0] == len(fd.train_rows) + len(fd.test_rows)  # one private copy per client row
    alg = _fedkd(fd)
    out = []
    for data in (fd, copied):
        sim = fk.Simulator(alg, data, cohort_size=4, mesh=fk.client_mesh(2), store="host")
        state, m = sim.run(sim.put_state(sim.init(0)), sim.put_data(), 3)
        out.append((_leaves(state.server), _leaves(sim.client_states(state.key)), np.asarray(m["train_loss"])))
    for a, b in zip(out[0][0] + out[0][1], out[1][0] + out[1][1]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(out[0][2], out[1][2])


SMALL_KD = ["algorithm=fedkd", "data.num_clients=8", "run.cohort_size=4", "model.hidden=[16]",
            "distill.teacher_hidden=[24]", "run.rounds=12", "run.rounds_per_dispatch=3", "run.eval_every=6",
            "run.checkpoint_every=6", "run.devices=2", "run.progress=false"]


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]


def _final(run_dir):
    from tests.test_resume import final_state

    return final_state(run_dir)


def test_device_host_and_disk_stores_are_bit_identical(tmp_path):
    # 8 clients, 4 per round, 3 rounds per dispatch: clients recur within and across
    # consecutive dispatches, so a stale prefetched state would show up.
    runs = {}
    for kind in ("device", "host", "disk"):
        out = str(tmp_path / kind)
        run_experiment(load_config(None, SMALL_KD + [f"run.client_store={kind}"]), out)
        runs[kind] = out
    ref_rows, (ref_state, ref_clients) = _rows(runs["device"]), _final(runs["device"])
    for kind in ("host", "disk"):
        assert _rows(runs[kind]) == ref_rows, kind
        state, clients = _final(runs[kind])
        for a, b in zip(jax.tree.leaves((ref_state, ref_clients)), jax.tree.leaves((state, clients))):
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the disk store holds its states in sparse files under the run directory
    assert os.path.isdir(os.path.join(runs["disk"], "client-store"))


def test_prefetch_never_serves_a_stale_state(digits):
    from fedkd_jax.runner.prefetch import Prefetcher

    fd = fk.federate(digits, partition="dirichlet", num_clients=6, seed=1, alpha=1.0)
    alg = _fedkd(fd)
    sims = [fk.Simulator(alg, fd, cohort_size=4, mesh=fk.client_mesh(1), store=kind) for kind in ("device", "host")]
    states = [s.put_state(s.init(0)) for s in sims]
    pools = [s.put_data() for s in sims]
    pre = Prefetcher(sims[1], fk.engine.cohort.key_bits(states[1].key), pools[1])
    written = None
    for start in range(0, 8, 2):
        states[0], m0 = sims[0].run(states[0], pools[0], 2)
        plan, gathered, pool = pre.take(start, 2, written, states[1].key)
        pre.request(start + 2, 2)  # read ahead while this dispatch runs
        assert start == 0 or set(plan.union.tolist()) & set(written.tolist())  # clients recur: staleness matters
        states[1], m1 = sims[1].execute(states[1], pool, plan, gathered)
        written = plan.union
        np.testing.assert_array_equal(np.asarray(m0["train_loss"]), np.asarray(m1["train_loss"]))
    pre.close()
    for a, b in zip(_leaves(sims[0].client_states(states[0].key)), _leaves(sims[1].client_states(states[1].key))):
        np.testing.assert_array_equal(a, b)


def test_disk_store_resume_is_exact(tmp_path):
    import shutil

    cfg = load_config(None, SMALL_KD + ["run.client_store=disk", "data.num_clients=40"])
    ref, crashed = str(tmp_path / "ref"), str(tmp_path / "crashed")
    run_experiment(cfg, ref)
    run_experiment(cfg, crashed)
    shutil.rmtree(os.path.join(crashed, "checkpoints", "12"))  # as if killed after round 6's checkpoint
    res = run_experiment(cfg, crashed)
    assert res.resumed_from == 6
    assert _rows(ref) == _rows(crashed)
    (a, ca), (b, cb) = _final(ref), _final(crashed)
    for x, y in zip(jax.tree.leaves((a.server, ca)), jax.tree.leaves((b.server, cb))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_disk_store_files_are_sparse_and_rows_round_trip(tmp_path):
    template = {"kernel": jax.ShapeDtypeStruct((64, 32), np.float32), "step": jax.ShapeDtypeStruct((), np.int32)}
    n = 5000  # 8 KB of kernel per client: a 40 MB file if written whole
    store = fk.store.DiskStore(template, n, str(tmp_path / "store"))
    ids = np.array([7, 4999, 1234, 3])
    rows = {"kernel": np.random.default_rng(0).normal(size=(4, 64, 32)).astype(np.float32),
            "step": np.arange(4, dtype=np.int32)}
    store.scatter(ids, rows)
    got, fresh = store.gather(np.array([3, 7, 8, 5000]))  # 5000: padding
    np.testing.assert_array_equal(got["kernel"][:2], rows["kernel"][[3, 0]])
    assert fresh.tolist() == [False, False, True, True]
    assert store.disk_bytes() < 4 * (8192 + 2 * 4096)  # blocks only for the 4 written clients
    np.testing.assert_array_equal(store.take_dirty(), np.sort(ids))
    store.reset()
    assert store.disk_bytes() == 0 and not store.touched.any()
    store.close()


def test_kill_9_with_disk_store_then_resume_matches(tmp_path):
    import signal
    import time

    args = [f"--set={s}" for s in SMALL_KD + ["run.client_store=disk", "run.rounds=12"]]
    env = dict(os.environ, FEDKD_CPU_DEVICES="2")
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "fedkd_jax.cli", "run", "--out", str(ref), *args], env=env, check=True,
                   capture_output=True, timeout=300)
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "fedkd_jax.cli", "run", "--out", str(out), *args], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoints" / "6").exists():
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    q = subprocess.run([sys.executable, "-m", "fedkd_jax.cli", "resume", str(out)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert q.returncode == 0, q.stderr
    assert _rows(str(ref)) == _rows(str(out))


def test_bad_scale_settings_fail_before_compiling(tmp_path):
    cases = [
        (["algorithm=fedkd", "run.memory_budget_gb=0.00001"], "run.memory_budget_gb"),
        (["run.client_store=tape"], "run.client_store"),
        (["run.group_size=0"], "run.group_size"),
        (["run.group_size=wide"], "run.group_size"),
    ]
    for overrides, field in cases:
        with pytest.raises(ConfigError) as e:
            run_experiment(load_config(None, overrides), str(tmp_path / "x"))
        assert e.value.field == field, overrides
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError) as e:
        run_experiment(load_config(None, ["algorithm=fedkd", "run.client_store=disk", f"run.store_dir={afile}"]),
                       str(tmp_path / "y"))
    assert e.value.field == "run.store_dir"
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_auto_store_picks_by_size_against_the_budget():
    from fedkd_jax.store import choose_store

    mb = 2**20
    assert choose_store("auto", num_clients=100, per_client_bytes=mb, num_devices=2, budget_gb=1, union_size=10) == "device"
    assert choose_store("auto", num_clients=400, per_client_bytes=mb, num_devices=2, budget_gb=1, union_size=10) == "host"
    assert choose_store("auto", num_clients=10**5, per_client_bytes=mb, num_devices=2, budget_gb=1, union_size=10) == "disk"
    with pytest.raises(ConfigError):
        choose_store("host", num_clients=10, per_client_bytes=mb, num_devices=1, budget_gb=0.001, union_size=10)


def test_import_configures_nothing_in_jax():
    code = ("import fedkd_jax, jax; assert jax.config.jax_num_cpu_devices == -1; "
            "jax.config.update('jax_num_cpu_devices', 3); assert jax.device_count() == 3; print('ok')")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FEDKD_CPU_DEVICES")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr
    src = os.path.join(os.path.dirname(fk.__file__))
    for root, _, files in os.walk(src):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(root, f)) as fh:
                    assert "jax._src" not in fh.read(), f
