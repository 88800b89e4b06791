"""``fedkd audit RUN_DIR``: membership-inference audit of a finished run directory.

An offline tool beside the CLI: it reads a run's saved config and newest
checkpoint, rebuilds the run's data and models, and scores them with the
attacks of :mod:`fedkd_jax.audit.attacks`. It sits above the run loop
(it imports the builders and the checkpoint reader), so nothing in
``privacy/`` depends on it.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import jax
import numpy as np

from fedkd_jax.audit.attacks import audit_model
from fedkd_jax.errors import ConfigError


class AuditReport(NamedTuple):
    results: dict[str, dict[str, float]]
    markdown: str
    path: str


def audit_run(run_dir: str, *, shadows: int = 4, members: int = 500, seed: int = 0) -> AuditReport:
    """Audit a finished run: the shared (student) model, and for FedKD one private teacher.

    Members are rows of the clients' training splits; non-members are rows of
    the global test set (never trained on); the shadow pool is the rest of both.
    """
    import dataclasses
    import tempfile

    from fedkd_jax.builders import build_algorithm, build_data, build_model, build_simulator
    from fedkd_jax.paths import check_run_dir
    from fedkd_jax.runner.checkpoint import Checkpointer
    from fedkd_jax.runner.resume import saved_config

    check_run_dir("run_dir", run_dir)
    cfg = saved_config(run_dir)
    data = build_data(cfg)
    model = build_model(cfg, data)
    alg = build_algorithm(cfg, model, data)
    # the run's own aggregation chain (its state is part of the checkpoint), a private host store
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, client_store="host", devices=1))
    sim = build_simulator(cfg, data, alg, out_dir=tempfile.mkdtemp(prefix="fedkd-audit-"))
    ck = Checkpointer(os.path.join(run_dir, "checkpoints"), store=sim.store)
    try:
        restored = ck.restore_latest(sim.put_state(sim.init(cfg.run.seed)))
    except Exception as e:  # noqa: BLE001 - damaged, or from an older version of the code
        raise ConfigError("run_dir", f"could not restore the checkpoints in {run_dir!r} "
                                     f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    finally:
        ck.close()
    if restored is None:
        raise ConfigError("run_dir", f"{run_dir!r} holds no checkpoint to audit")
    state, step = restored
    rng = np.random.default_rng(seed)
    train_rows = data.train_rows
    if len(data.global_y) < 20:
        raise ConfigError("run_dir", "the run has no global test set to draw non-members from")
    k = min(members, len(train_rows) // 2, len(data.global_y) // 2)
    mem_idx = rng.choice(train_rows, k, replace=False)
    non_idx = rng.choice(len(data.global_y), k, replace=False)
    mem = (data.x[mem_idx], data.y[mem_idx])
    non = (data.global_x[non_idx], data.global_y[non_idx])
    rest_train = np.setdiff1d(train_rows, mem_idx)
    rest_global = np.setdiff1d(np.arange(len(data.global_y)), non_idx)
    pool = (np.concatenate([data.x[rest_train], data.global_x[rest_global]]),
            np.concatenate([data.y[rest_train], data.global_y[rest_global]]))
    host = lambda t: jax.tree.map(np.asarray, jax.device_get(t))  # noqa: E731
    results = {"shared model": audit_model(model.init, model.apply, host(alg.model_params(state.server)), mem, non,
                                           pool, shadows=shadows, seed=seed)}
    if alg.personal_model is not None:
        client = int(np.argmax(data.counts))  # the largest client: the most rows to score
        rows = data.client_rows(client)
        teacher = host(jax.tree.map(lambda a: a[0], alg.personal_params(sim.client_states(state.key, np.array([client])))))
        m = min(len(rows), k)
        tmem = (data.x[rows[:m]], data.y[rows[:m]])
        tnon = (data.global_x[non_idx[:m]], data.global_y[non_idx[:m]])
        results[f"private teacher of client {client}"] = audit_model(
            alg.personal_model.init, alg.personal_model.apply, teacher, tmem, tnon, pool, shadows=shadows, seed=seed)
    eps = None
    rows_log = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(rows_log):
        with open(rows_log) as f:
            last = [json.loads(line) for line in f if line.strip()]
        eps = next((r.get("epsilon") for r in reversed(last) if r.get("round") == step), None)
    lines = [f"# Membership-inference audit of {run_dir} (round {step})", "",
             f"Members: rows of clients' training splits; non-members: global test rows. "
             f"Shadow models: {shadows}. Epsilon: {'none (no DP)' if eps is None else f'{eps:.3f}'}.", "",
             "| model | loss-threshold AUC | TPR @ 1% FPR | calibrated AUC | TPR @ 1% FPR | rows |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['loss_auc']:.3f} | {r['loss_tpr_at_1pct_fpr']:.3f} | {r['calibrated_auc']:.3f} | "
                     f"{r['calibrated_tpr_at_1pct_fpr']:.3f} | {r['members']} + {r['nonmembers']} |")
    out_dir = os.path.join(run_dir, "audit")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "audit.json"), "w") as f:
        json.dump({"round": step, "epsilon": eps, "results": results}, f, indent=2)
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "audit.md"), "w") as f:
        f.write(md)
    return AuditReport(results, md, os.path.join(out_dir, "audit.md"))
