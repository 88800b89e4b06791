"""The membership-inference audit (fedkd_jax.audit): attack statistics, target selection, a run directory."""

import jax
import numpy as np
import pytest

import fedkd_jax as fk
from fedkd_jax import audit


def test_privacy_and_the_attack_statistics_never_import_the_run_loop():
    import ast
    import pathlib

    root = pathlib.Path(fk.__file__).parent
    files = [*(root / "privacy").glob("*.py"), *(root / "audit" / n for n in ("__init__.py", "attacks.py", "targets.py"))]
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("fedkd_jax.runner", "fedkd_jax.builders", "fedkd_jax.sweeps",
                                            "fedkd_jax.api", "fedkd_jax.audit.run_dir")), f"{f.name} imports {name}"
    assert "audit.py" not in {f.name for f in (root / "privacy").glob("*.py")}


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


# ---------------------------------------------------------- target selection
def _hand_built():
    """4 clients with known rows (pool row i has features i); global test rows: a new one,
    a copy of row 0 (client 0 trains on it) and a copy of row 11 (client 3 trains on it)."""
    x = np.repeat(np.arange(14, dtype=np.float32)[:, None], 3, axis=1)
    gx = np.stack([np.full(3, 99.0, np.float32), x[0], x[11]])
    # train: c0 0,1,2 | c1 4,5,6 | c2 8,9 | c3 11,12,13 ; held-out: c0 3 | c1 7 | c2 10 | c3 none
    return fk.FederatedData(
        x=x, y=np.arange(14, dtype=np.int32) % 3,
        train_rows=np.array([0, 1, 2, 4, 5, 6, 8, 9, 11, 12, 13], np.int32), train_offsets=np.array([0, 3, 6, 8, 11]),
        test_rows=np.array([3, 7, 10], np.int32), test_offsets=np.array([0, 1, 2, 3, 3]),
        global_x=gx, global_y=np.array([0, 0, 2], np.int32), num_classes=3)


def _ids(rows):
    """The pool row (or 100 + global row) each feature row came from."""
    return sorted(int(v) if v < 99 else 100 for v in rows[0][:, 0])


def test_shared_model_members_are_rows_of_sampled_clients_only_and_never_in_the_shadow_pool():
    from fedkd_jax.audit.targets import shared_targets

    fd = _hand_built()
    t = shared_targets(fd, np.array([0, 2]), members=100, rng=np.random.default_rng(0))
    assert _ids(t.members) == [0, 1, 2, 8, 9]  # never-sampled clients 1 and 3 contribute no member
    assert t.nonmember_source == "held-out" and _ids(t.nonmembers) == [3, 10]  # the sampled clients' held-out rows
    assert _ids(t.pool) == [4, 5, 6, 7, 11, 12, 13, 100]  # everything else, each content once
    np.testing.assert_array_equal(t.members[1], fd.y[[0, 1, 2, 8, 9]])
    # at most `members` rows a side, drawn from those sets
    few = shared_targets(fd, np.array([0, 2]), members=2, rng=np.random.default_rng(1))
    assert len(few.members[1]) == 2 and set(_ids(few.members)) <= {0, 1, 2, 8, 9}
    assert not set(_ids(few.members)) & set(_ids(few.pool))
    # no held-out rows among the sampled clients: the global test rows that were never trained on
    # (the copy of client 3's row 11 is a member in all but name; the copy of row 0 is not: client 0 never trained)
    g = shared_targets(fd, np.array([3]), members=100, rng=np.random.default_rng(0))
    assert _ids(g.members) == [11, 12, 13] and g.nonmember_source == "global test"
    assert sorted(g.nonmembers[0][:, 0].tolist()) == [0.0, 99.0]


def test_private_model_nonmembers_are_its_own_held_out_rows_and_its_shadows_never_see_its_client():
    from fedkd_jax.audit.targets import NoHeldOutRows, private_client, private_targets

    fd = _hand_built()
    t = private_targets(fd, 0, members=100, rng=np.random.default_rng(0))
    assert _ids(t.members) == [0, 1, 2] and _ids(t.nonmembers) == [3]
    # no row of client 0 in the pool, not even the global test copy of its row 0; everything else once
    assert _ids(t.pool) == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 100]
    with pytest.raises(NoHeldOutRows, match="client 3 has no held-out rows"):
        private_targets(fd, 3, members=100, rng=np.random.default_rng(0))
    assert private_client(fd, np.array([0, 2, 3])) == 0  # held-out rows tie; client 0 has more training rows
    assert private_client(fd, np.array([2, 3])) == 2
    assert private_client(fd, np.array([3])) is None


def test_sampled_clients_are_the_cohorts_of_the_rounds_run(digits20):
    import optax

    from fedkd_jax.audit.targets import sampled_clients
    from fedkd_jax.engine import sample_cohort
    from fedkd_jax.engine.cohort import key_bits

    model = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(8,))
    alg = fk.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), batch_size=8)
    key = jax.random.key(5)
    for sampling in ("fixed", "poisson"):
        sim = fk.Simulator(alg, digits20, cohort_size=2, mesh=fk.client_mesh(1), sampling=sampling)
        expect = np.unique(np.concatenate([sample_cohort(key_bits(key), r, 20, 2, sampling) for r in range(4)]))
        got = sampled_clients(sim, key, 4)
        np.testing.assert_array_equal(got, expect)
        assert 0 < len(got) < 20  # some clients never trained: the case that matters
        np.testing.assert_array_equal(sampled_clients(sim, key, 4, max_rows_per_plan=1), expect)  # chunked
    assert len(sampled_clients(sim, key, 0)) == 0


# ------------------------------------------------------------ a run directory
def test_audit_of_a_fedkd_run_scores_the_right_rows(tmp_path, monkeypatch):
    from fedkd_jax.audit import run_dir
    from fedkd_jax.builders import build_data
    from fedkd_jax.config import load_config
    from fedkd_jax.engine import sample_cohort
    from fedkd_jax.engine.cohort import key_bits
    from fedkd_jax.errors import ConfigError
    from fedkd_jax.runner import run_experiment
    from fedkd_jax.runner.resume import saved_config

    out = str(tmp_path / "run")
    run_experiment(load_config(None, [
        "algorithm=fedkd", "data.num_clients=10", "run.cohort_size=2", "run.rounds=2", "run.eval_every=2",
        "model.hidden=[8]", "distill.teacher_hidden=[8]", "data.test_fraction=0.25", "run.devices=1",
        "run.seed=3", "run.progress=false"]), out)
    seen = []

    def record(init, apply, params, members, nonmembers, pool, **kw):
        seen.append((members, nonmembers, pool))
        return {"loss_auc": 0.5, "loss_tpr_at_1pct_fpr": 0.0, "calibrated_auc": 0.5,
                "calibrated_tpr_at_1pct_fpr": 0.0, "members": len(members[1]), "nonmembers": len(nonmembers[1])}

    monkeypatch.setattr(run_dir, "audit_model", record)
    rep = run_dir.audit_run(out, shadows=2, members=1000)

    data = build_data(saved_config(out))
    sampled = np.unique(np.concatenate([sample_cohort(key_bits(jax.random.key(3)), r, 10, 2) for r in range(2)]))
    as_set = lambda x: {r.tobytes() for r in np.asarray(x, np.float32)}  # noqa: E731
    rows = lambda clients, test=False: as_set(  # noqa: E731
        np.concatenate([data.client(int(c), test=test)[0] for c in clients]))
    never = [c for c in range(10) if c not in sampled]
    (mem, non, pool), (tmem, tnon, tpool) = seen
    # shared model: exactly the sampled clients' rows; non-members their held-out rows; shadows see neither
    assert as_set(mem[0]) == rows(sampled) and not as_set(mem[0]) & (rows(never) - rows(sampled))
    assert as_set(non[0]) == rows(sampled, test=True) - rows(sampled)
    assert not as_set(pool[0]) & (as_set(mem[0]) | as_set(non[0]))
    # the teacher: its own client's rows on both sides, none of its client's rows in the shadow pool
    client = int(next(k for k in rep.results if k.startswith("private teacher")).rsplit(" ", 1)[1])
    assert client in sampled
    assert as_set(tmem[0]) == rows([client]) and as_set(tnon[0]) == rows([client], test=True) - rows([client])
    assert not as_set(tpool[0]) & (rows([client]) | rows([client], test=True))
    assert rep.results["shared model"]["clients_sampled"] == len(sampled) and "held-out rows" in rep.markdown
    # a teacher that cannot be audited is said so, never scored against the global test set
    monkeypatch.setattr(run_dir, "private_client", lambda data, sampled: None)
    rep = run_dir.audit_run(out, shadows=2, members=1000)
    assert list(rep.results) == ["shared model"] and "no teacher has non-members" in rep.notes[0]
    assert "private teacher not audited" in rep.markdown
    with pytest.raises(ConfigError, match="never sampled"):
        run_dir.audit_run(out, shadows=2, client=never[0])
