"""Membership-inference audits: does a model give away whose data trained it?

Two attacks, each scoring target rows (higher = "member"):

* **Loss threshold** (Yeom et al. 2018, "Privacy Risk in Machine Learning"):
  the score is minus the model's loss on the row.
* **Calibrated, LiRA-lite** (offline LiRA, Carlini et al. 2022, "Membership
  Inference Attacks From First Principles"): ``K`` shadow models of the same
  architecture are trained on random halves of a reference pool that holds
  none of the targets, so every target is *out* for every shadow. For a row
  with label ``y`` the statistic is the logit-scaled confidence
  ``phi = log(p_y / (1 - p_y))``; the score is how far the target model's
  ``phi`` sits above the shadows' mean, in units of their standard deviation.
  Calibrating per row removes the "easy example" effect that makes the
  plain loss attack weak.

Reported per attack: ROC AUC (0.5 = chance) and the true-positive rate at a
1% false-positive rate (Carlini et al.'s low-FPR figure).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedkd_jax.errors import ConfigError

Apply = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]


def roc_auc(member: np.ndarray, nonmember: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counted half."""
    s = np.concatenate([member, nonmember])
    ranks = _ranks(s)
    n1, n0 = len(member), len(nonmember)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _ranks(s: np.ndarray) -> np.ndarray:
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    ranks[order] = np.arange(1, len(s) + 1)
    # average the ranks of ties
    vals, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return (sums / counts)[inv]


def tpr_at_fpr(member: np.ndarray, nonmember: np.ndarray, fpr: float = 0.01) -> float:
    """True-positive rate at the threshold where at most ``fpr`` of non-members are flagged."""
    thr = np.quantile(nonmember, 1.0 - fpr, method="higher")
    return float(np.mean(member > thr))


@jax.jit
def _stats(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    logp = jax.nn.log_softmax(logits)
    lp = jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
    # logit-scaled confidence log(p / (1 - p)), computed stably from log-probabilities
    others = jax.nn.logsumexp(jnp.where(jax.nn.one_hot(y, logits.shape[1]) > 0, -jnp.inf, logp), axis=1)
    return -lp, lp - others


def row_stats(apply: Apply, params: Any, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(loss, phi)`` of every row under ``params``."""
    logits = apply(params, jnp.asarray(x))[0]
    loss, phi = _stats(logits, jnp.asarray(y, jnp.int32))
    return np.asarray(loss, np.float64), np.asarray(phi, np.float64)


def train_centrally(init: Callable, apply: Apply, x: np.ndarray, y: np.ndarray, key: jax.Array, *,
                    epochs: int = 30, batch_size: int = 32, lr: float = 0.05) -> Any:
    """A plain SGD model on ``(x, y)`` (the shadow models' trainer)."""
    params = init(key)
    opt = optax.sgd(lr, momentum=0.9)
    n = len(y)
    steps = max(1, n // batch_size)

    @jax.jit
    def epoch(carry, k):
        p, s = carry
        perm = jax.random.permutation(k, n)[: steps * batch_size].reshape(steps, batch_size)

        def step(c, idx):
            p, s = c
            g = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(apply(q, xs[idx])[0], ys[idx]).mean())(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (p, s), perm)[0], None

    xs, ys = jnp.asarray(x), jnp.asarray(y, jnp.int32)
    (params, _), _ = jax.lax.scan(epoch, (params, opt.init(params)), jax.random.split(key, epochs))
    return params


class AttackResult(NamedTuple):
    auc: float
    tpr_at_1pct_fpr: float


def loss_threshold(apply: Apply, params: Any, members: tuple, nonmembers: tuple) -> AttackResult:
    lm, _ = row_stats(apply, params, *members)
    ln, _ = row_stats(apply, params, *nonmembers)
    return AttackResult(roc_auc(-lm, -ln), tpr_at_fpr(-lm, -ln))


def calibrated(apply: Apply, params: Any, members: tuple, nonmembers: tuple, shadow_params: list) -> AttackResult:
    """Offline LiRA with shadow models that never saw a target (see the module docstring)."""
    x = np.concatenate([members[0], nonmembers[0]])
    y = np.concatenate([members[1], nonmembers[1]])
    _, phi = row_stats(apply, params, x, y)
    ref = np.stack([row_stats(apply, p, x, y)[1] for p in shadow_params])
    mu, sd = ref.mean(0), ref.std(0) + 1e-3
    score = (phi - mu) / sd
    m = len(members[1])
    return AttackResult(roc_auc(score[:m], score[m:]), tpr_at_fpr(score[:m], score[m:]))


def audit_model(init: Callable, apply: Apply, params: Any, members: tuple, nonmembers: tuple, pool: tuple, *,
                shadows: int = 4, seed: int = 0, shadow_epochs: int = 30) -> dict[str, float]:
    """Both attacks on one model. ``pool``: reference rows holding none of the targets."""
    rng = np.random.default_rng(seed)
    shadow = []
    for k in range(shadows):
        half = rng.choice(len(pool[1]), len(pool[1]) // 2, replace=False)
        shadow.append(train_centrally(init, apply, pool[0][half], pool[1][half], jax.random.key(seed * 1000 + k),
                                      epochs=shadow_epochs))
    lt = loss_threshold(apply, params, members, nonmembers)
    ca = calibrated(apply, params, members, nonmembers, shadow)
    return {"loss_auc": lt.auc, "loss_tpr_at_1pct_fpr": lt.tpr_at_1pct_fpr,
            "calibrated_auc": ca.auc, "calibrated_tpr_at_1pct_fpr": ca.tpr_at_1pct_fpr,
            "members": len(members[1]), "nonmembers": len(nonmembers[1]), "shadows": shadows}


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
