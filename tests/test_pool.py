"""A host-resident pool (data.pool=host) places only each dispatch's rows and gives the
device pool's results bit for bit."""

import os

import jax
import numpy as np
import optax
import pytest

import fedkd_jax as fk
from fedkd_jax.config import load_config
from fedkd_jax.engine.pool import HostPool, compact_rows
from fedkd_jax.errors import ConfigError
from fedkd_jax.runner import read_jsonl, run_experiment
from fedkd_jax.runner.evaluate import make_evaluate

TIMING = ("round_time", "wall_time", "eval_time", "eval_seconds", "checkpoint_seconds")


def test_compact_rows_by_hand():
    rows = np.array([[[7, 3, 9], [3, 5, 0]], [[9, 9, 2], [4, 1, 6]]])
    counts = np.array([[2, 3], [1, 0]])  # real: 7,3 | 3,5,0 | 9 | none
    used, remapped = compact_rows(rows, counts, capacity=8)
    assert list(used[:5]) == [0, 3, 5, 7, 9] and len(used) == 8
    real = np.arange(3) < counts[..., None]
    np.testing.assert_array_equal(used[remapped][real], rows[real])  # every real row points at itself
    assert (remapped[~real] == 0).all()


def _sims(fd, algorithm):
    return [fk.Simulator(algorithm, fd, cohort_size=5, mesh=fk.client_mesh(2), store="host", pool=kind)
            for kind in ("device", "host")]


@pytest.mark.parametrize("kind", ["fedavg", "fedkd"])
def test_host_pool_equals_device_pool(digits20, kind):
    student = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(8,))
    if kind == "fedavg":
        alg = fk.fedavg(student, optax.sgd(0.1), optax.sgd(1.0), batch_size=10)
    else:
        teacher = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(12,))
        alg = fk.algorithms.fedkd(student, teacher, optax.sgd(0.1), optax.sgd(0.1), optax.sgd(1.0), batch_size=10)
    outs = []
    for sim in _sims(digits20, alg):
        pool = sim.put_data()
        assert isinstance(pool, HostPool) == (sim.pool_kind == "host")
        state, m = sim.run(sim.put_state(sim.init(0)), pool, 3)
        state, m2 = sim.run(state, pool, 2)
        ev = make_evaluate(sim, np.arange(digits20.num_clients), pool=pool)(state)
        outs.append((jax.device_get(state.server), {k: np.asarray(v) for k, v in {**m, **m2}.items()}, ev))
    for a, b in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(outs[1][0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k in outs[0][1]:
        np.testing.assert_array_equal(outs[0][1][k], outs[1][1][k], err_msg=k)
    assert outs[0][2] == outs[1][2]  # the same evaluation, personal models included
    if kind == "fedkd":
        assert "teacher_acc_mean" in outs[0][2]


def test_run_with_a_host_pool_matches_and_a_sweep_refuses_it(tmp_path):
    base = ["data.num_clients=20", "run.cohort_size=5", "run.rounds=6", "run.eval_every=3",
            "run.rounds_per_dispatch=2", "model.hidden=[16]", "distill.teacher_hidden=[24]", "run.progress=false"]
    rows = {}
    for kind in ("device", "host"):
        out = str(tmp_path / kind)
        run_experiment(load_config(None, base + [f"data.pool={kind}"]), out)
        rows[kind] = [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(os.path.join(out, "metrics.jsonl"))]
    assert rows["device"] == rows["host"] and len(rows["host"]) == 6
    with pytest.raises(ConfigError, match="data.pool"):
        fk.sweep(load_config(None, base + ["data.pool=host"]), {"client.lr": [0.05, 0.1]}, out=str(tmp_path / "sw"))
