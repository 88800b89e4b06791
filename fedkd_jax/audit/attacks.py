"""Membership-inference attacks: does a model give away whose data trained it?

Two attacks, each scoring target rows (higher = "member"):

* **Loss threshold** (Yeom et al. 2018, "Privacy Risk in Machine Learning"):
  the score is minus the model's loss on the row.
* **Offline LiRA** (Carlini et al. 2022, "Membership Inference Attacks From
  First Principles", IEEE S&P): ``K`` shadow models of the same architecture
  are trained on random halves of a reference pool that holds none of the
  targets, so every target is *out* for every shadow. For a row with label
  ``y`` the statistic is the logit-scaled confidence
  ``phi = log(p_y / (1 - p_y))``. With ``mu_i`` the mean of row ``i``'s
  ``phi`` over the shadows, the score is the one-sided z-statistic

      score_i = (phi_i - mu_i) / sigma_i

  (the paper's offline test ``1 - Pr[Z > phi_i]``, ``Z ~ N(mu_i, sigma_i^2)``,
  is a monotone function of it, so both rank rows, hence AUC and TPR at a
  fixed FPR, identically). Calibrating per row removes the "easy example"
  effect that makes the plain loss attack weak.

  The variance: a per-row variance estimated from a handful of shadow
  models is too noisy, and Carlini et al. recommend one *global* variance
  shared by all rows when fewer than about 64 shadow models are available
  (the ``fix_variance`` option of their reference code, tensorflow/privacy
  ``research/mi_lira_2021``). Below :data:`GLOBAL_VARIANCE_BELOW` (64)
  shadows :func:`lira_offline` uses the pooled within-row variance of the OUT
  scores, ``sigma^2 = mean_i var_k(phi_ki)``; from 64 on, each row's own
  ``var_k(phi_ki)`` (both with ``ddof=0``, as the reference code). The
  reference code's global estimate (``np.std`` over every OUT score) also
  counts the spread between rows' means; with one sigma for all rows the
  ranking is the same whichever constant is used.

Reported per attack: ROC AUC (0.5 = chance) and the true-positive rate at a
1% false-positive rate (Carlini et al.'s low-FPR figure).

This module holds only the statistics and the shadow trainer; it imports no
run loop. Choosing a run's members and non-members is
:mod:`fedkd_jax.audit.targets`; reading a run directory is
:mod:`fedkd_jax.audit.run_dir`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


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
    """A plain SGD model on ``(x, y)`` (the shadow models' trainer).

    Compiled once per ``(apply, rows, batch size, epochs, lr)``: every shadow
    model of an audit reuses the program.
    """
    n = len(y)
    train = _trainer(apply, n, min(batch_size, n), epochs, float(lr))
    return train(init(key), jnp.asarray(x), jnp.asarray(y, jnp.int32), key)


@functools.lru_cache(maxsize=16)
def _trainer(apply: Apply, n: int, batch_size: int, epochs: int, lr: float):
    opt = optax.sgd(lr, momentum=0.9)
    steps = max(1, n // batch_size)

    def loss(p, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, xb)[0], yb).mean()

    @jax.jit
    def train(params, xs, ys, key):
        def epoch(carry, k):
            perm = jax.random.permutation(k, n)[: steps * batch_size].reshape(steps, batch_size)

            def step(c, idx):
                p, s = c
                u, s = opt.update(jax.grad(loss)(p, xs[idx], ys[idx]), s, p)
                return (optax.apply_updates(p, u), s), None

            return jax.lax.scan(step, carry, perm)[0], None

        (params, _), _ = jax.lax.scan(epoch, (params, opt.init(params)), jax.random.split(key, epochs))
        return params

    return train


class AttackResult(NamedTuple):
    auc: float
    tpr_at_1pct_fpr: float


def loss_threshold(apply: Apply, params: Any, members: tuple, nonmembers: tuple) -> AttackResult:
    lm, _ = row_stats(apply, params, *members)
    ln, _ = row_stats(apply, params, *nonmembers)
    return AttackResult(roc_auc(-lm, -ln), tpr_at_fpr(-lm, -ln))


GLOBAL_VARIANCE_BELOW = 64
"""Fewer shadow models than this: :func:`lira_offline` uses one global variance."""

VARIANCES = ("auto", "global", "per_example")
_SD_FLOOR = 1e-6  # a row whose shadows agree exactly would otherwise divide by zero


def lira_offline(phi: np.ndarray, shadow_phi: np.ndarray, *, variance: str = "auto") -> np.ndarray:
    """Offline LiRA scores (see the module docstring).

    Args:
      phi: ``[n]`` logit-scaled confidences of the targets under the audited model.
      shadow_phi: ``[K, n]`` the same under ``K >= 2`` shadow models that never saw a target.
      variance: ``global`` (one pooled variance for all rows), ``per_example``
        (each row's own), or ``auto``: global below :data:`GLOBAL_VARIANCE_BELOW` shadows.

    Returns:
      ``[n]`` float64 scores ``(phi - mu) / sigma``; higher = more likely a member.
    """
    phi = np.asarray(phi, np.float64)
    ref = np.asarray(shadow_phi, np.float64)
    if ref.ndim != 2 or ref.shape[1] != phi.shape[0]:
        raise ValueError(f"shadow_phi must be [K, {phi.shape[0]}]; got {ref.shape}")
    if ref.shape[0] < 2:
        raise ValueError(f"offline LiRA needs at least 2 shadow models to estimate a variance; got {ref.shape[0]}")
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}; got {variance!r}")
    if variance == "auto":
        variance = resolved_variance(ref.shape[0])
    mu = ref.mean(0)
    var = ref.var(0)
    sd = np.sqrt(var.mean()) if variance == "global" else np.sqrt(var)
    return (phi - mu) / np.maximum(sd, _SD_FLOOR)


def resolved_variance(shadows: int) -> str:
    """What ``variance="auto"`` means for ``shadows`` shadow models."""
    return "global" if shadows < GLOBAL_VARIANCE_BELOW else "per_example"


def calibrated(apply: Apply, params: Any, members: tuple, nonmembers: tuple, shadow_params: list, *,
               variance: str = "auto") -> AttackResult:
    """Offline LiRA with shadow models that never saw a target (see the module docstring)."""
    x = np.concatenate([members[0], nonmembers[0]])
    y = np.concatenate([members[1], nonmembers[1]])
    _, phi = row_stats(apply, params, x, y)
    ref = np.stack([row_stats(apply, p, x, y)[1] for p in shadow_params])
    score = lira_offline(phi, ref, variance=variance)
    m = len(members[1])
    return AttackResult(roc_auc(score[:m], score[m:]), tpr_at_fpr(score[:m], score[m:]))


def audit_model(init: Callable, apply: Apply, params: Any, members: tuple, nonmembers: tuple, pool: tuple, *,
                shadows: int = 4, seed: int = 0, shadow_epochs: int = 30, variance: str = "auto") -> dict[str, Any]:
    """Both attacks on one model. ``pool``: reference rows holding none of the targets
    (each shadow trains on a random half of it)."""
    if shadows < 2:
        raise ValueError(f"the calibrated attack needs at least 2 shadow models; got {shadows}")
    rng = np.random.default_rng(seed)
    shadow = []
    for k in range(shadows):
        half = rng.choice(len(pool[1]), len(pool[1]) // 2, replace=False)
        shadow.append(train_centrally(init, apply, pool[0][half], pool[1][half], jax.random.key(seed * 1000 + k),
                                      epochs=shadow_epochs))
    lt = loss_threshold(apply, params, members, nonmembers)
    ca = calibrated(apply, params, members, nonmembers, shadow, variance=variance)
    return {"loss_auc": lt.auc, "loss_tpr_at_1pct_fpr": lt.tpr_at_1pct_fpr,
            "calibrated_auc": ca.auc, "calibrated_tpr_at_1pct_fpr": ca.tpr_at_1pct_fpr,
            "members": len(members[1]), "nonmembers": len(nonmembers[1]), "shadows": shadows,
            "variance": resolved_variance(shadows) if variance == "auto" else variance}
