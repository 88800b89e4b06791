"""Batched sweeps: each run equals its single run, one program per shape, tables, errors, resume."""

import os
import shutil

import numpy as np
import pytest

import fedkd_jax as fk
from fedkd_jax.config import load_config
from fedkd_jax.errors import ConfigError
from fedkd_jax.runner import read_jsonl, run_experiment
from fedkd_jax.sweeps import run_sweep

SMALL = {"data": {"num_clients": 12}, "model": {"hidden": [16]}, "distill": {"teacher_hidden": [24]},
         "run": {"rounds": 4, "eval_every": 2, "checkpoint_every": 2, "cohort_size": 4, "progress": False,
                 "client_store": "host"}}
METRICS = ("train_loss", "test_accuracy", "test_loss", "teacher_acc_mean", "bytes_up", "bytes_down")


def _base(algorithm, **extra):
    cfg = {k: dict(v) for k, v in SMALL.items()}
    cfg["algorithm"] = algorithm
    for k, v in extra.items():
        section, name = k.split(".")
        cfg.setdefault(section, {})[name] = v
    return cfg


# fedavg / fedprox grids are drawn by the property test in tests/test_plan.py
@pytest.mark.parametrize("algorithm, key, values, per_device", [
    ("fedkd", "distill.temperature", [1.0, 3.0], 2),  # both runs vmapped on one position of the runs axis
])
def test_each_batched_run_equals_its_single_run(tmp_path, algorithm, key, values, per_device):
    extra = {"client.straggler_fraction": 0.5} if algorithm == "fedprox" else {}
    base = _base(algorithm, **extra)
    base["run"] = dict(base["run"], runs_per_device=per_device)
    res = run_sweep(base, {key: values}, [1], str(tmp_path / "sweep"), progress=False)
    assert len(res.runs) == 2 and res.groups == 1
    assert res.runs_per_device == [per_device] and res.runs_per_wave == [2]
    from fedkd_jax.sweeps.engine import sweep_mesh

    assert sweep_mesh(2, runs_per_device=per_device).shape["runs"] == 2 // per_device
    for run in res.runs:  # every run against the same settings run on its own
        section, name = key.split(".")
        cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
        cfg.setdefault(section, {})[name] = run[key]
        cfg["run"] = dict(cfg["run"], seed=run["seed"], runs_per_device="auto")
        single = run_experiment(load_config_dict(cfg), str(tmp_path / f"single-{run['run']}"))
        swept = run["result"].rows
        assert [r["round"] for r in swept] == [r["round"] for r in single.rows] == [1, 2, 3, 4]
        for a, b in zip(swept, single.rows):
            for m in METRICS:
                if a.get(m) is not None or b.get(m) is not None:
                    np.testing.assert_allclose(a[m], b[m], rtol=1e-5, atol=1e-5, err_msg=f"{run['run']} {m}")


def load_config_dict(d):
    from fedkd_jax.sweeps import as_config

    return as_config(d)


def test_shape_changing_keys_compile_one_program_per_shape_and_the_table_is_labelled(tmp_path):
    import logging

    import jax

    compiled = []

    class Count(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if "Finished XLA compilation of jit(_rounds)" in msg:
                compiled.append(msg)

    handler = Count()
    logging.getLogger("jax._src.dispatch").addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:
        res = run_sweep(_base("fedavg"), ["client.lr=0.05,0.1", "model.hidden=[8],[16]"], 2, str(tmp_path / "s"),
                        progress=False)
    finally:
        jax.config.update("jax_log_compiles", False)
        logging.getLogger("jax._src.dispatch").removeHandler(handler)
    assert res.groups == 2  # two model widths: two static configurations
    assert len(compiled) == 2  # one compiled round program each, shared by its 4 runs and all dispatches
    rows = res.rows
    assert len(rows) == 2 * 2 * 2 * 4  # runs x rounds
    labels = {(r["client.lr"], str(r["model.hidden"]), r["seed"]) for r in rows}
    assert len(labels) == 8
    for (lr, hidden, seed) in labels:
        mine = [r["round"] for r in rows if (r["client.lr"], str(r["model.hidden"]), r["seed"]) == (lr, hidden, seed)]
        assert mine == [1, 2, 3, 4]
    assert len(res.summary) == 4 and all(s["seeds"] == 2 for s in res.summary)
    for f in ("sweep.csv", "sweep.parquet", "summary.csv", "report.md", "accuracy_vs_round.png",
              "final_vs_client_lr.png", "final_vs_model_hidden.png"):
        assert (tmp_path / "s" / f).exists(), f
    import pyarrow.parquet as pq

    assert pq.read_table(str(tmp_path / "s" / "sweep.parquet")).num_rows == len(rows)
    df = res.to_pandas()
    assert df.groupby(["client.lr", "seed"]).size().min() == 8


@pytest.mark.parametrize("grid, field, words", [
    (["nosuch.key=1,2"], "--grid nosuch.key", "unknown key"),
    (["client.lr="], "--grid client.lr", "at least one value"),
    (["client.lr=fast,slow"], "--grid client.lr", "not valid"),
    (["run.rounds=5,10"], "--grid run.rounds", "cannot be swept"),
    (["privacy.target_epsilon=1,2"], "--grid privacy.target_epsilon", "cannot be swept"),
    (["client.lr"], "--grid", "section.key=v1,v2"),
    (["client.lr=-1,0.1"], "client.lr", "positive"),
])
def test_bad_grids_fail_before_compiling(tmp_path, grid, field, words):
    with pytest.raises(ConfigError) as e:
        run_sweep(_base("fedavg"), grid, 1, str(tmp_path / "bad"), progress=False)
    assert e.value.field == field and words in str(e.value), str(e.value)
    assert not (tmp_path / "bad").exists()


def test_interrupted_sweep_resumes_to_the_same_table(tmp_path):
    grid = {"client.lr": [0.05, 0.1]}
    ref = run_sweep(_base("fedkd"), grid, 1, str(tmp_path / "ref"), progress=False)
    out = tmp_path / "cut"
    run_sweep(_base("fedkd"), grid, 1, str(out), progress=False)
    # as if killed after round 2: one run lost its last checkpoint, the other kept it
    runs = sorted(os.listdir(out / "runs"))
    shutil.rmtree(out / "runs" / runs[0] / "checkpoints" / "4")
    again = run_sweep(_base("fedkd"), grid, 1, str(out), progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("round_time", "wall_time", "eval_time", "eval_seconds", "checkpoint_seconds")} for r in rows]  # noqa: E731
    assert strip(again.rows) == strip(ref.rows)
    with pytest.raises(ConfigError):  # another grid into the same directory is refused
        run_sweep(_base("fedkd"), {"client.lr": [0.3]}, 1, str(out), progress=False)


def test_python_api_runs_and_sweeps(tmp_path):
    res = fk.run(_base("fedavg"), str(tmp_path / "one"))
    assert res.rounds == 4 and len(res.to_pandas()) == 4 and res.final["test_accuracy"] > 0.1
    assert int(res.state.round) == 4
    with pytest.raises(ConfigError) as e:
        fk.run({"run": {"rounds": 0}}, str(tmp_path / "bad"))
    assert e.value.field == "run.rounds"
    rows = read_jsonl(str(tmp_path / "one" / "metrics.jsonl"))
    assert [r["round"] for r in rows] == [1, 2, 3, 4]


def test_auto_runs_per_device_is_one_on_cpu_and_fills_accelerator_memory(tmp_path, monkeypatch):
    import jax

    from fedkd_jax.sweeps import engine as E
    from fedkd_jax.sweeps import loop as L
    from fedkd_jax.sweeps.grid import expand

    runs = expand(load_config_dict(_base("fedkd")), {"distill.temperature": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}, [0])
    assert L._auto_runs_per_device(runs, str(tmp_path)) == 1  # CPU: one run per core
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the arithmetic an accelerator gets
    from fedkd_jax.builders import build_algorithm, build_data, build_model, build_simulator

    cfg = runs[0].config
    data = build_data(cfg)
    sim = build_simulator(cfg, data, build_algorithm(cfg, build_model(cfg, data), data), out_dir=str(tmp_path))
    need = E.per_run_bytes(sim, sim.init(0))
    assert need >= 4 * sum(a.nbytes for a in jax.tree.leaves(sim.init(0).server))
    n_dev = jax.device_count()
    spread = -(-6 // n_dev)  # all six runs in one wave
    # no reported memory or plenty: one wave; half of 2x one run's footprint: one run per device
    for budget, want in ((None, spread), (10**15, spread), (2 * need, 1)):
        monkeypatch.setattr(L, "device_memory_bytes", lambda b=budget: b)
        assert L._auto_runs_per_device(runs, str(tmp_path)) == want, budget


def test_summary_keeps_swept_values_as_numbers_like_summary_csv(tmp_path):
    """``SweepResult.summary`` holds the swept values typed as in the config (summary.csv's numbers), not strings."""
    from types import SimpleNamespace

    from fedkd_jax.sweeps.grid import expand, parse_grid
    from fedkd_jax.sweeps.report import write_outputs

    base = load_config_dict(_base("fedavg"))
    grid = parse_grid({"client.lr": [0.05, 0.2], "client.local_epochs": [1, 2], "client.optimizer": ["sgd", "adam"]},
                      base)
    runs = expand(base, grid, [0, 1])
    done = [(r, SimpleNamespace(rows=[{"round": 1, "test_accuracy": 0.5}], final={"test_accuracy": 0.5}))
            for r in runs]
    res = write_outputs(str(tmp_path), list(grid), done, interrupted=False, write=False)
    assert len(res.summary) == 8 and all(s["seeds"] == 2 for s in res.summary)
    first = res.summary[0]
    assert (first["client.lr"], first["client.local_epochs"], first["client.optimizer"]) == (0.05, 1, "sgd")
    assert type(first["client.lr"]) is float and type(first["client.local_epochs"]) is int
