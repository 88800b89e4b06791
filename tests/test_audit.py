"""The membership-inference audit (fedkd_jax.audit): attack statistics, target selection, a run directory."""

import jax
import numpy as np

import fedkd_jax as fk
from fedkd_jax import audit


def test_membership_attack_is_chance_without_members_and_clear_on_an_overfit_model(digits):
    model = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(64,))
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(digits.y))
    a, b, c, pool = perm[:30], perm[30:60], perm[60:160], perm[160:]
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
