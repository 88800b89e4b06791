"""``fedkd audit RUN_DIR``: membership-inference audit of a finished run directory.

An offline tool beside the CLI: it reads a run's saved config and newest
checkpoint, rebuilds the run's data and models, and scores them with the
attacks of :mod:`fedkd_jax.audit.attacks` on the targets that
:mod:`fedkd_jax.audit.targets` chooses (members only from clients the run
really sampled; a private model's non-members from its own client's held-out
rows). It sits above the run loop (it imports the builders and the
checkpoint reader), so nothing in ``privacy/`` depends on it.

Writes ``RUN_DIR/audit/audit.json`` and ``audit.md``.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import numpy as np

from fedkd_jax.audit.attacks import audit_model, resolved_variance
from fedkd_jax.audit.targets import (
    NoHeldOutRows,
    private_client,
    private_targets,
    sampled_clients,
    shared_targets,
    universe,
)
from fedkd_jax.errors import ConfigError


class AuditReport(NamedTuple):
    """What :func:`audit_run` found.

    Attributes:
      results: per audited model, the attack figures of
        :func:`~fedkd_jax.audit.attacks.audit_model` plus how its targets were chosen.
      markdown: the report, as written to ``path``.
      path: ``RUN_DIR/audit/audit.md``.
      notes: models that could not be audited, and why (e.g. a FedKD teacher
        whose client has no held-out rows).
    """

    results: dict[str, dict[str, Any]]
    markdown: str
    path: str
    notes: tuple[str, ...] = ()


def audit_run(run_dir: str, *, shadows: int = 4, members: int = 500, seed: int = 0,
              client: int | None = None) -> AuditReport:
    """Audit a finished run: the shared (student) model, and for FedKD one client's private teacher.

    Args:
      run_dir: a run directory (``config.json`` and ``checkpoints/``).
      shadows: shadow models per audited model (at least 2; below 64 the
        calibrated attack uses one global variance, Carlini et al. 2022).
      members: at most this many member and this many non-member rows per model.
      seed: draws the target rows and the shadow models.
      client: whose private teacher to audit (default: of the sampled clients with
        held-out rows, the one with the most; a client given here must have some).

    Targets (see :mod:`fedkd_jax.audit.targets`): the shared model's members
    are training rows of clients sampled in the rounds run, its non-members
    the held-out rows of those clients (the global test set when there are
    none); a teacher's members are its client's training rows, its
    non-members that client's held-out rows, and its shadow models never see
    a row of that client. A teacher that cannot be audited this way is
    skipped, with the reason in ``notes`` and in the report.
    """
    import dataclasses
    import tempfile

    from fedkd_jax.builders import build_algorithm, build_data, build_model, build_simulator
    from fedkd_jax.paths import check_run_dir
    from fedkd_jax.runner.checkpoint import Checkpointer
    from fedkd_jax.runner.resume import saved_config

    if shadows < 2:
        raise ConfigError("--shadows", f"the calibrated attack needs at least 2 shadow models; got {shadows}")
    if members < 1:
        raise ConfigError("--members", f"must be at least 1; got {members}")
    check_run_dir("run_dir", run_dir)
    cfg = saved_config(run_dir)
    data = build_data(cfg)
    model = build_model(cfg, data)
    alg = build_algorithm(cfg, model, data)
    if client is not None and alg.personal_model is None:
        raise ConfigError("--client", f"the run's algorithm ({cfg.algorithm}) keeps no private per-client model")
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
    sampled = sampled_clients(sim, state.key, step)
    if len(sampled) == 0:
        raise ConfigError("run_dir", f"{run_dir!r}: no client was sampled in the {step} round(s) run; nothing to audit")
    if client is not None and not 0 <= client < data.num_clients:
        raise ConfigError("--client", f"must be in [0, {data.num_clients}); got {client}")
    if client is not None and client not in set(sampled.tolist()):
        raise ConfigError("--client", f"client {client} was never sampled in the {step} round(s) run: its "
                                      "teacher never trained")
    rows = universe(data)
    rng = np.random.default_rng(seed)
    host = lambda t: jax.tree.map(np.asarray, jax.device_get(t))  # noqa: E731
    try:
        shared = shared_targets(data, sampled, members=members, rng=rng, rows=rows)
    except ValueError as e:
        raise ConfigError("run_dir", f"{run_dir!r}: {e}") from None
    notes: list[str] = []
    teacher_targets = None
    if alg.personal_model is not None:  # choose before any shadow is trained, so a bad --client fails fast
        chosen = private_client(data, sampled) if client is None else int(client)
        try:
            if chosen is None:
                raise NoHeldOutRows("none of the sampled clients has held-out rows (data.test_fraction=0?), so no "
                                    "teacher has non-members from its own distribution; rerun with "
                                    "data.test_fraction > 0 to audit a teacher")
            teacher_targets = private_targets(data, chosen, members=members, rng=rng, rows=rows)
        except NoHeldOutRows as e:
            if client is not None:
                raise ConfigError("--client", str(e)) from None
            notes.append(f"private teacher not audited: {e}")
    results = {"shared model": audit_model(model.init, model.apply, host(alg.model_params(state.server)),
                                           shared.members, shared.nonmembers, shared.pool, shadows=shadows,
                                           seed=seed)
               | {"nonmember_source": shared.nonmember_source, "clients_sampled": int(len(sampled)),
                  "clients": int(data.num_clients)}}
    if teacher_targets is not None:
        t = teacher_targets
        teacher = host(jax.tree.map(lambda a: a[0],
                                    alg.personal_params(sim.client_states(state.key, np.array([chosen])))))
        results[f"private teacher of client {chosen}"] = audit_model(
            alg.personal_model.init, alg.personal_model.apply, teacher, t.members, t.nonmembers, t.pool,
            shadows=shadows, seed=seed) | {"nonmember_source": t.nonmember_source}
    eps = None
    rows_log = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(rows_log):
        with open(rows_log) as f:
            last = [json.loads(line) for line in f if line.strip()]
        eps = next((r.get("epsilon") for r in reversed(last) if r.get("round") == step), None)
    md = _markdown(run_dir, step, eps, shadows, results, notes)
    out_dir = os.path.join(run_dir, "audit")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "audit.json"), "w") as f:
        json.dump({"round": step, "epsilon": eps, "results": results, "notes": notes}, f, indent=2)
    with open(os.path.join(out_dir, "audit.md"), "w") as f:
        f.write(md)
    return AuditReport(results, md, os.path.join(out_dir, "audit.md"), tuple(notes))


def _markdown(run_dir: str, step: int, eps, shadows: int, results: dict, notes: list[str]) -> str:
    shared = results["shared model"]
    source = {"held-out": "held-out rows (local test splits) of those clients",
              "global test": "global test rows (the clients hold no held-out rows)"}
    lines = [f"# Membership-inference audit of {run_dir} (round {step})", "",
             f"Shared model: members are training rows of the {shared['clients_sampled']} of {shared['clients']} "
             f"clients sampled in rounds 0-{step - 1}; non-members are {source[shared['nonmember_source']]}."
             + (" A private teacher: members are its client's training rows, non-members that client's held-out "
                "rows; its shadow models never see a row of that client." if len(results) > 1 else ""),
             f"Shadow models: {shadows} (offline LiRA, {resolved_variance(shadows).replace('_', '-')} variance). "
             f"Epsilon: {'none (no DP)' if eps is None else f'{eps:.3f}'}.", "",
             "| model | loss-threshold AUC | TPR @ 1% FPR | calibrated AUC | TPR @ 1% FPR | rows |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['loss_auc']:.3f} | {r['loss_tpr_at_1pct_fpr']:.3f} | {r['calibrated_auc']:.3f} | "
                     f"{r['calibrated_tpr_at_1pct_fpr']:.3f} | {r['members']} + {r['nonmembers']} |")
    lines += [""] + [f"Note: {n}" for n in notes] if notes else []
    return "\n".join(lines) + "\n"
