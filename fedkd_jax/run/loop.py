"""The run loop: rounds in compiled chunks, evaluation, logs, checkpoints, plot."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from fedkd_jax.builders import build_algorithm, build_compressor, build_data, build_model
from fedkd_jax.config import Config, to_dict, to_yaml, validate
from fedkd_jax.engine import Simulator, client_mesh, make_evaluator, make_personal_evaluator, summarize_clients
from fedkd_jax.errors import ConfigError
from fedkd_jax.run.checkpoint import Checkpointer
from fedkd_jax.run.outputs import MetricsLog, plot_accuracy


@dataclass
class RunResult:
    run_dir: str
    rounds: int
    final: dict[str, Any]
    seconds: float
    first_dispatch_seconds: float


def _next_boundary(r: int, every: int) -> int:
    return (r // every + 1) * every


def _check_out_dir(out_dir: str) -> None:
    if os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        raise ConfigError(
            "--out",
            f"{out_dir!r} already holds a run (metrics.jsonl); choose another --out so its results are kept",
        )


def _evaluator(algorithm):
    """``(state, data) -> dict`` of global metrics, per-client accuracy summary and,
    for algorithms with personal models (FedKD teachers), their accuracy summary."""
    global_eval = make_evaluator(algorithm.model.apply)
    personal_eval = None
    if algorithm.personal_model is not None:
        personal_eval = make_personal_evaluator(algorithm.personal_model.apply)

    def evaluate(state, data) -> dict[str, Any]:
        ev = jax.device_get(global_eval(algorithm.model_params(state.server), data))
        out = {k: float(v) for k, v in ev.items() if np.ndim(v) == 0}
        out.update(summarize_clients(ev["client_accuracy"]))
        if personal_eval is not None:
            acc = jax.device_get(personal_eval(algorithm.personal_params(state.clients), data))
            out.update(summarize_clients(acc, prefix="teacher_acc"))
        return out

    return evaluate


def run_experiment(cfg: Config, out_dir: str, *, progress: bool | None = None) -> RunResult:
    """Run ``cfg`` and write its outputs into ``out_dir``.

    Everything that can be wrong with the input (config, data) raises before
    anything is compiled and before ``out_dir`` is touched.
    """
    validate(cfg)
    _check_out_dir(out_dir)
    r = cfg.run
    data = build_data(cfg)
    model = build_model(cfg, data)
    algorithm = build_algorithm(cfg, model, data)
    sim = Simulator(algorithm, data, cohort_size=r.cohort_size, mesh=client_mesh(r.devices),
                    group_size=r.group_size, compressor=build_compressor(cfg))
    evaluate = _evaluator(algorithm)

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(to_dict(cfg), f, indent=2)

    dev_data = sim.put_data(data)
    state = sim.put_state(sim.init(r.seed))
    log = MetricsLog(out_dir)
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=r.keep_checkpoints)
    bytes_up, bytes_down = sim.round_bytes()
    show = r.progress if progress is None else progress
    bar = tqdm(total=r.rounds, unit="round", disable=not show, dynamic_ncols=True, desc=f"{cfg.algorithm}/{cfg.data.dataset}")
    t_start = time.perf_counter()
    first_dispatch = None
    done = 0
    cum_up = cum_down = 0
    last_eval: dict[str, Any] = {}
    try:
        while done < r.rounds:
            n = min(
                r.rounds_per_dispatch,
                r.rounds - done,
                _next_boundary(done, r.eval_every) - done,
                _next_boundary(done, r.checkpoint_every) - done,
            )
            t0 = time.perf_counter()
            if n == 1:
                state, m = sim.step(state, dev_data)
                m = {k: np.asarray(v)[None] for k, v in jax.device_get(m).items()}
            else:
                state, m = sim.run(state, dev_data, n)
                m = jax.device_get(m)
            dt = time.perf_counter() - t0
            if first_dispatch is None:
                first_dispatch = dt
            rows = []
            for i in range(n):
                row = {"round": done + i + 1}
                row.update({k: float(v[i]) for k, v in m.items() if k not in ("weight_sum", "bytes_up")})
                row["round_time"] = dt / n
                row["bytes_up"] = int(round(float(m["bytes_up"][i]))) if "bytes_up" in m else bytes_up
                row["bytes_down"] = bytes_down
                cum_up += row["bytes_up"]
                cum_down += bytes_down
                row["cum_bytes_up"], row["cum_bytes_down"] = cum_up, cum_down
                rows.append(row)
            done += n
            if done % r.eval_every == 0 or done == r.rounds:
                last_eval = evaluate(state, dev_data)
                rows[-1].update(last_eval)
            wall = time.perf_counter() - t_start
            for row in rows:
                row["wall_time"] = wall
            log.write(rows)
            if done % r.checkpoint_every == 0 or done == r.rounds:
                ckpt.save(done, state)
            bar.update(n)
            post = {"loss": f"{rows[-1].get('train_loss', float('nan')):.3f}"}
            if "test_accuracy" in last_eval:
                post["acc"] = f"{last_eval['test_accuracy']:.3f}"
            if "teacher_acc_mean" in last_eval:
                post["teacher"] = f"{last_eval['teacher_acc_mean']:.3f}"
            bar.set_postfix(post)
    finally:
        bar.close()
        ckpt.close()
    plot_accuracy(log.rows, os.path.join(out_dir, "accuracy.png"), title=f"{cfg.algorithm} on {cfg.data.dataset}")
    final = dict(last_eval)
    if log.rows:
        last = log.rows[-1]
        final.update({k: last.get(k) for k in ("train_loss", "cum_bytes_up", "cum_bytes_down")})
    return RunResult(out_dir, done, final, time.perf_counter() - t_start, first_dispatch or 0.0)
