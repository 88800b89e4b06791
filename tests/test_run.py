"""The run loop and CLI write what the README promises."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np

import fedkd_jax as fk
from fedkd_jax.builders import build_algorithm, build_data, build_model
from fedkd_jax.config import from_dict, load_config, resolve_defaults
from fedkd_jax.engine import Simulator, make_evaluator
from fedkd_jax.runner import Checkpointer, read_jsonl, run_experiment

SMALL = [
    "algorithm=fedavg",
    "data.num_clients=20",
    "run.cohort_size=5",
    "run.rounds=30",
    "run.eval_every=10",
    "run.rounds_per_dispatch=4",
    "run.checkpoint_every=15",
    "run.devices=2",
    "client.lr=0.1",
]


def test_run_writes_metrics_plot_checkpoints_and_learns(tmp_path):
    cfg = load_config(None, SMALL)
    out = str(tmp_path / "run")
    res = run_experiment(cfg, out, progress=False)
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["round"] for r in rows] == list(range(1, 31))
    evaluated = [r["round"] for r in rows if r.get("test_accuracy") is not None]
    assert evaluated == [10, 20, 30]
    for r in rows:
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and np.isfinite(r["train_loss"])
    with open(os.path.join(out, "metrics.csv")) as f:
        crow = list(csv.DictReader(f))
    assert len(crow) == 30 and float(crow[9]["test_accuracy"]) == rows[9]["test_accuracy"]
    assert os.path.getsize(os.path.join(out, "accuracy.png")) > 10_000
    # evaluation and checkpoint time, logged apart: eval_time only on evaluated rows; the cumulative
    # clocks are the running sums (checkpoint_seconds grows only after the saves of rounds 15 and 30)
    assert [r["round"] for r in rows if r.get("eval_time") is not None] == [10, 20, 30]
    for r in rows:
        done = [x["eval_time"] for x in rows if x["round"] <= r["round"] and x.get("eval_time") is not None]
        assert abs(r["eval_seconds"] - sum(done)) < 1e-9
    ck_s = [r["checkpoint_seconds"] for r in rows]
    assert ck_s[:15] == [0.0] * 15 and ck_s[15] > 0 and len(set(ck_s[15:])) == 1  # rows 16-30: the save of 15
    assert {"eval_time", "eval_seconds", "checkpoint_seconds"} <= set(crow[0])
    t = res.timing
    assert abs(t["evaluation"] - rows[-1]["eval_seconds"]) < 1e-9 and t["checkpoints"] >= ck_s[-1] > 0
    assert 0 < t["dispatch"] and t["dispatch"] + t["evaluation"] + t["checkpoints"] <= t["total"]
    saved = from_dict(json.load(open(os.path.join(out, "config.json"))))
    # the resolved config: the SVD schedule horizon is fixed to run.rounds at the start
    assert saved == dataclasses.replace(resolve_defaults(cfg),
                                        compression=dataclasses.replace(cfg.compression, schedule_rounds=30))

    # the model learns: well above chance (0.1) after 30 rounds
    assert res.final["test_accuracy"] > 0.6
    # the last checkpoint holds exactly the final state
    data = build_data(cfg)
    model = build_model(cfg, data)
    alg = build_algorithm(cfg, model, data)
    sim = Simulator(alg, data, cohort_size=5, mesh=fk.client_mesh(2))
    ck = Checkpointer(os.path.join(out, "checkpoints"))
    assert ck.manager.all_steps() == [15, 30]
    state = ck.restore(30, sim.put_state(sim.init(0)))
    ck.close()
    assert int(state.round) == 30
    acc = make_evaluator(model.apply)(alg.model_params(state.server), sim.eval_data())["test_accuracy"]
    assert float(acc) == rows[-1]["test_accuracy"]


def test_run_is_reproducible(tmp_path):
    cfg = load_config(None, SMALL + ["run.rounds=6", "run.eval_every=3"])
    a = run_experiment(cfg, str(tmp_path / "a"), progress=False)
    b = run_experiment(cfg, str(tmp_path / "b"), progress=False)
    ra = read_jsonl(os.path.join(a.run_dir, "metrics.jsonl"))
    rb = read_jsonl(os.path.join(b.run_dir, "metrics.jsonl"))
    keys = ["round", "train_loss", "test_accuracy", "test_loss"]
    assert [[r.get(k) for k in keys] for r in ra] == [[r.get(k) for k in keys] for r in rb]


def test_cli_run_end_to_end(tmp_path):
    env = dict(os.environ, FEDKD_CPU_DEVICES="2")
    out = tmp_path / "cli"
    p = subprocess.run(
        [sys.executable, "-m", "fedkd_jax.cli", "run", "--out", str(out), "--no-progress",
         "--set", "run.rounds=20", "--set", "data.num_clients=30"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert "global test accuracy" in p.stdout
    for f in ("config.yaml", "config.json", "metrics.jsonl", "metrics.csv", "accuracy.png"):
        assert (out / f).exists(), f
    assert (out / "checkpoints" / "20").is_dir()


def test_public_api_imports():
    import fedkd_jax

    for mod in (fedkd_jax, fedkd_jax.algorithms, fedkd_jax.data, fedkd_jax.engine, fedkd_jax.losses, fedkd_jax.models,
                fedkd_jax.runner, fedkd_jax.store):
        for name in mod.__all__:
            assert getattr(mod, name) is not None, f"{mod.__name__}.{name}"
    assert jax.device_count() == 4
