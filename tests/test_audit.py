"""The membership-inference audit (fedkd_jax.audit): attack statistics, target selection, a run directory."""

import jax
import numpy as np
import pytest

import fedkd_jax as fk
from fedkd_jax import audit


def test_membership_attack_is_chance_without_members_and_clear_on_an_overfit_model(digits):
    model = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(64,))
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(digits.y))
    a, b, c, pool = perm[:30], perm[30:60], perm[60:160], perm[160:760]
    xy = lambda idx: (digits.x[idx], digits.y[idx])  # noqa: E731
    overfit = audit.train_centrally(model.init, model.apply, *xy(a), jax.random.key(1), epochs=300, batch_size=10)
    # members trained the model: clearly detectable
    hit = audit.audit_model(model.init, model.apply, overfit, xy(a), xy(c), xy(pool), shadows=3)
    # "members" the model never saw: chance
    miss = audit.audit_model(model.init, model.apply, overfit, xy(b), xy(c), xy(pool), shadows=3)
    assert hit["loss_auc"] > 0.8 and hit["calibrated_auc"] > 0.8
    assert abs(miss["loss_auc"] - 0.5) < 0.1 and abs(miss["calibrated_auc"] - 0.5) < 0.1
    assert audit.roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert audit.roc_auc(np.array([1.0]), np.array([1.0])) == 0.5


# ------------------------------------------------------------- offline LiRA
def test_lira_offline_uses_one_global_variance_with_few_shadows():
    # 2 shadows, 3 rows; by hand: mu = (1, 2, 5); per-row variances (ddof 0) = (1, 4, 0); pooled = 5/3
    shadow = np.array([[0.0, 0.0, 5.0], [2.0, 4.0, 5.0]])
    phi = np.array([3.0, 6.0, 5.5])
    sd = np.sqrt(5.0 / 3.0)
    expect = np.array([2.0 / sd, 4.0 / sd, 0.5 / sd])
    np.testing.assert_allclose(audit.lira_offline(phi, shadow), expect, rtol=1e-12)
    np.testing.assert_allclose(audit.lira_offline(phi, shadow, variance="global"), expect, rtol=1e-12)
    # per-row variances tie rows 0 and 1 (z = 2 each); the global one ranks row 1 above row 0
    per_row = audit.lira_offline(phi, shadow, variance="per_example")
    np.testing.assert_allclose(per_row[:2], [2.0, 2.0], rtol=1e-12)


def test_lira_offline_switches_to_per_example_variances_at_64_shadows():
    rng = np.random.default_rng(0)
    scale = np.array([0.5, 1.0, 3.0, 10.0])
    phi = rng.normal(size=4)
    for k, kind in ((63, "global"), (64, "per_example")):
        shadow = rng.normal(size=(k, 4)) * scale + np.arange(4)
        mu, var = shadow.mean(0), ((shadow - shadow.mean(0)) ** 2).mean(0)
        sd = np.sqrt(var.mean()) if kind == "global" else np.sqrt(var)
        np.testing.assert_allclose(audit.lira_offline(phi, shadow), (phi - mu) / sd, rtol=1e-12)
        assert audit.resolved_variance(k) == kind
    with pytest.raises(ValueError, match="at least 2 shadow"):
        audit.lira_offline(phi, np.zeros((1, 4)))
