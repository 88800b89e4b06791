"""Membership-inference audits (``fedkd audit RUN_DIR``).

* :mod:`fedkd_jax.audit.attacks`: the attack statistics (loss threshold,
  offline LiRA, ROC AUC, TPR at a fixed FPR) and the shadow-model trainer.
  Pure functions of models and arrays; importing them loads no run loop.
* :mod:`fedkd_jax.audit.targets`: who is a member. Members only from
  clients the run sampled; a private model's non-members from its own
  client's held-out rows; shadow pools that hold no target.
* :mod:`fedkd_jax.audit.run_dir`: :func:`audit_run`, which reads a run
  directory (config, checkpoint) and audits its models. It imports the
  builders and the checkpoint reader, so it is loaded only when used.

The audit used to live in ``fedkd_jax.privacy.audit``; it moved here so that
``privacy/`` (inside the round) never imports the run loop.
"""

from fedkd_jax.audit.attacks import (
    GLOBAL_VARIANCE_BELOW,
    AttackResult,
    audit_model,
    calibrated,
    lira_offline,
    loss_threshold,
    resolved_variance,
    roc_auc,
    row_stats,
    tpr_at_fpr,
    train_centrally,
)
from fedkd_jax.audit.targets import NoHeldOutRows, Targets, private_targets, sampled_clients, shared_targets

__all__ = [
    "GLOBAL_VARIANCE_BELOW",
    "AttackResult",
    "AuditReport",
    "NoHeldOutRows",
    "Targets",
    "audit_model",
    "audit_run",
    "calibrated",
    "lira_offline",
    "loss_threshold",
    "private_targets",
    "resolved_variance",
    "roc_auc",
    "row_stats",
    "sampled_clients",
    "shared_targets",
    "tpr_at_fpr",
    "train_centrally",
]


def __getattr__(name: str):
    # The run-directory reader pulls in the builders and the run loop's checkpoint
    # code: load it on first use, not when the attack statistics are imported.
    if name in ("audit_run", "AuditReport"):
        from fedkd_jax.audit import run_dir

        return getattr(run_dir, name)
    raise AttributeError(f"module 'fedkd_jax.audit' has no attribute {name!r}")
