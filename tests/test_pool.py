"""Host-resident and memory-mapped pools (data.pool=host / disk) place only each dispatch's
rows and give the device pool's results bit for bit; pool files hold token ids in narrow
integer types and are reused for the same source files."""

import os

import jax
import numpy as np
import optax
import pytest

import fedkd_jax as fk
from fedkd_jax.builders import build_data
from fedkd_jax.config import load_config
from fedkd_jax.engine.pool import HostPool, compact_rows
from fedkd_jax.errors import ConfigError
from fedkd_jax.runner import read_jsonl, run_experiment
from fedkd_jax.runner.evaluate import make_evaluate
from fedkd_jax.store import pool_file

TIMING = ("round_time", "wall_time", "eval_time", "eval_seconds", "checkpoint_seconds")


def test_compact_rows_by_hand():
    rows = np.array([[[7, 3, 9], [3, 5, 0]], [[9, 9, 2], [4, 1, 6]]])
    counts = np.array([[2, 3], [1, 0]])  # real: 7,3 | 3,5,0 | 9 | none
    used, remapped = compact_rows(rows, counts, capacity=8)
    assert list(used[:5]) == [0, 3, 5, 7, 9] and len(used) == 8
    real = np.arange(3) < counts[..., None]
    np.testing.assert_array_equal(used[remapped][real], rows[real])  # every real row points at itself
    assert (remapped[~real] == 0).all()


def test_narrow_dtypes_and_a_pool_file_written_in_chunks(tmp_path):
    assert [pool_file.narrow_int(*r).name for r in ((0, 255), (-1, 90), (0, 10003), (-1, 10003), (-1, 40000))] == [
        "uint8", "int8", "uint16", "int16", "int32"]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 300, (1000, 7)).astype(np.float32)
    y = rng.integers(-1, 300, (1000, 7)).astype(np.int32)
    with pool_file.PoolWriter(str(tmp_path), "p", rows=1000, x_shape=(7,), x_dtype=np.uint16, y_shape=(7,),
                              y_dtype=np.int16) as w:
        for s in (600, 0, 250):  # any order, any chunk sizes
            e = {600: 1000, 0: 250, 250: 600}[s]
            w.write(s, x[s:e], y[s:e])
        with pytest.raises(ValueError, match="outside uint16"):
            w.write(0, -x[:2], y[:2])
        path = w.finish()
    arrays, meta = pool_file.open_pool(path)
    assert isinstance(arrays["x"], np.memmap) and arrays["x"].dtype == np.uint16 and arrays["y"].dtype == np.int16
    np.testing.assert_array_equal(np.asarray(arrays["x"], np.float32), x)
    np.testing.assert_array_equal(np.asarray(arrays["y"], np.int32), y)
    assert meta["rows"] == 1000 and sorted(os.listdir(tmp_path)) == ["p"]  # no temporary left


def _sims(fd, algorithm, pool_dir):
    return [fk.Simulator(algorithm, fd, cohort_size=5, mesh=fk.client_mesh(2), store="host", pool=kind,
                         pool_dir=pool_dir) for kind in ("device", "host", "disk")]


@pytest.mark.parametrize("kind", ["fedavg", "fedkd"])
def test_host_and_disk_pools_equal_the_device_pool(digits20, kind, tmp_path):
    student = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(8,))
    if kind == "fedavg":
        alg = fk.fedavg(student, optax.sgd(0.1), optax.sgd(1.0), batch_size=10)
    else:
        teacher = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(12,))
        alg = fk.algorithms.fedkd(student, teacher, optax.sgd(0.1), optax.sgd(0.1), optax.sgd(1.0), batch_size=10)
    outs = []
    for sim in _sims(digits20, alg, str(tmp_path)):
        pool = sim.put_data()
        assert isinstance(pool, HostPool) == (sim.pool_kind != "device")
        assert isinstance(sim.data.x, np.memmap) == (sim.pool_kind == "disk")
        state, m = sim.run(sim.put_state(sim.init(0)), pool, 3)
        state, m2 = sim.run(state, pool, 2)
        ev = make_evaluate(sim, np.arange(digits20.num_clients), pool=pool)(state)
        outs.append((jax.device_get(state.server), {k: np.asarray(v) for k, v in {**m, **m2}.items()}, ev))
    for other in outs[1:]:
        for a, b in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(other[0])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for k in outs[0][1]:
            np.testing.assert_array_equal(outs[0][1][k], other[1][k], err_msg=k)
        assert outs[0][2] == other[2]  # the same evaluation, personal models included
    if kind == "fedkd":
        assert "teacher_acc_mean" in outs[0][2]


BASE = ["data.num_clients=20", "run.cohort_size=5", "run.rounds=4", "run.eval_every=2", "run.rounds_per_dispatch=2",
        "model.hidden=[16]", "distill.teacher_hidden=[24]", "run.progress=false"]


def _rows(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("algorithm,kinds", [("fedavg", ("device", "disk")), ("fedkd", ("device", "host", "disk"))])
def test_runs_with_host_and_disk_pools_match_the_device_pool(tmp_path, algorithm, kinds, monkeypatch):
    """Through the run loop: two dispatches whose rows the prefetcher gathers ahead."""
    monkeypatch.setenv("FEDKD_POOL_DIR", str(tmp_path / "cache"))  # data.pool_dir unset: the user's cache
    rows = {}
    for kind in kinds:
        out = str(tmp_path / kind)
        run_experiment(load_config(None, BASE + [f"algorithm={algorithm}", f"data.pool={kind}"]), out)
        rows[kind] = _rows(out)
    assert all(rows[k] == rows["device"] for k in kinds) and len(rows["device"]) == 4
    (name,) = os.listdir(tmp_path / "cache")
    arrays, meta = pool_file.open_pool(str(tmp_path / "cache" / name))
    assert arrays["x"].dtype == np.float32 and arrays["y"].dtype == np.uint8 and meta["name"] == "digits"


def _token_npz(path, seed, vocab=300):
    rng = np.random.default_rng(seed)
    seq = rng.integers(1, vocab, (60, 6))
    x, y = seq[:, :5].copy(), seq[:, 1:].copy()
    for i, n in enumerate(rng.integers(2, 6, 60)):
        x[i, n:], y[i, n:] = 0, -1
    np.savez(path, x=x, y=y, client=np.repeat(np.arange(12), 5))
    return x, y


def test_token_pool_file_is_narrow_and_reused_for_the_same_source(tmp_path):
    src, cache = tmp_path / "t.npz", tmp_path / "cache"
    x, y = _token_npz(src, 0)
    over = ["data.dataset=npz", f"data.path={src}", "data.task=next_token", "run.cohort_size=4",
            "model.kind=transformer", "model.width=0.0625", "algorithm=fedavg", "run.rounds=4", "run.eval_every=2",
            "run.rounds_per_dispatch=2", "run.progress=false"]
    disk = over + ["data.pool=disk", f"data.pool_dir={cache}"]
    fd = build_data(load_config(None, disk), pool_dir=str(cache))
    assert fd.x.dtype == np.uint16 and fd.y.dtype == np.int16 and isinstance(fd.x, np.memmap)
    np.testing.assert_array_equal(np.asarray(fd.x, np.float32), x.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(fd.y, np.int32), y)
    (name,) = os.listdir(cache)
    stamp = os.stat(cache / name / "meta.json").st_mtime_ns
    again = build_data(load_config(None, disk), pool_dir=str(cache))  # the same source: the same file, not rewritten
    assert os.listdir(cache) == [name] and os.stat(cache / name / "meta.json").st_mtime_ns == stamp
    assert again.x.filename == fd.x.filename
    rows = {}
    for kind, extra in (("device", ["data.pool=device"]), ("disk", disk[len(over):])):
        run_experiment(load_config(None, over + extra), str(tmp_path / kind))
        rows[kind] = _rows(str(tmp_path / kind))
    assert rows["disk"] == rows["device"] and os.listdir(cache) == [name]  # the run reused it too
    x2, _ = _token_npz(src, 1)  # a changed source file is read again, into a pool file of its own
    fd2 = build_data(load_config(None, disk), pool_dir=str(cache))
    assert len(os.listdir(cache)) == 2
    np.testing.assert_array_equal(np.asarray(fd2.x, np.float32), x2.astype(np.float32))


def test_bad_pool_dirs_and_sweeps_are_refused_before_anything_is_built(tmp_path, digits20):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for value, says in ((afile, "is a file"), ("/proc/fedkd-pool", "not writable")):
        with pytest.raises(ConfigError, match="data.pool_dir") as e:
            run_experiment(load_config(None, BASE + ["data.pool=disk", f"data.pool_dir={value}"]),
                           str(tmp_path / "run"))
        assert says in str(e.value) and not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="data.pool_dir.*keeps none"):
        load_config(None, BASE + ["data.pool=device", f"data.pool_dir={tmp_path}"])
    alg = fk.fedavg(fk.make_model("mlp", num_features=64, num_classes=10, hidden=(8,)), optax.sgd(0.1),
                    optax.sgd(1.0), batch_size=10)
    with pytest.raises(ConfigError, match="data.pool_dir.*is a file"):
        fk.Simulator(alg, digits20, cohort_size=5, pool="disk", pool_dir=str(afile))
    for kind in ("host", "disk"):
        with pytest.raises(ConfigError, match="data.pool.*host or disk"):
            fk.sweep(load_config(None, BASE + [f"data.pool={kind}"]), {"client.lr": [0.05, 0.1]},
                     out=str(tmp_path / "sw"))
    assert not (tmp_path / "sw").exists()
