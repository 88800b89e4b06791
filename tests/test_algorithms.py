"""Every algorithm learns, is shard-invariant, and keeps its promises."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedkd_jax as fk
from fedkd_jax.algorithms import fedavg, feddf, fedkd, fedprox, server_teacher_kd
from fedkd_jax.errors import ConfigError

STUDENT = dict(num_features=64, num_classes=10, hidden=(16,))
TEACHER = dict(num_features=64, num_classes=10, hidden=(32,))


@pytest.fixture(scope="module")
def fd(digits):
    return fk.federate(digits, partition="dirichlet", num_clients=16, seed=0, alpha=1.0, proxy_fraction=0.1)


def build(name, fd, **kw):
    s = fk.make_model("mlp", **STUDENT)
    t = fk.make_model("mlp", **TEACHER)
    sgd, one = optax.sgd(0.1), optax.sgd(1.0)
    if name == "fedavg":
        return fedavg(s, sgd, one, batch_size=8, **kw)
    if name == "fedprox":
        return fedprox(s, sgd, one, mu=kw.pop("mu", 0.01), batch_size=8, **kw)
    if name == "fedkd":
        return fedkd(s, t, sgd, optax.sgd(0.1), one, batch_size=8, **kw)
    if name == "server_teacher_kd":
        return server_teacher_kd(s, t, sgd, one, fd.proxy_x, alpha=0.5, temperature=2.0, batch_size=8, distill_steps=10, **kw)
    if name == "feddf":
        return feddf(s, sgd, one, fd.proxy_x, batch_size=8, distill_steps=10, **kw)
    raise ValueError(name)


ALL = ["fedavg", "fedprox", "fedkd", "server_teacher_kd", "feddf"]


def _run(alg, fd, devices, rounds, cohort=6, compressor=None, seed=0):
    sim = fk.Simulator(alg, fd, cohort_size=cohort, mesh=fk.client_mesh(devices), compressor=compressor)
    data = sim.put_data(fd)
    state = sim.put_state(sim.init(seed))
    state, m = sim.run(state, data, rounds)
    return sim, state, m, data


def _clients(sim, state):
    return sim.client_states(state.key) if sim.stateful else ()


@pytest.mark.parametrize("name", ALL)
def test_algorithm_learns_and_is_shard_invariant(fd, name):
    alg = build(name, fd)
    comp = fk.compression.make_compressor("svd", rounds=12) if name == "fedkd" else None
    sim1, s1, m1, data = _run(alg, fd, 1, 12, compressor=comp)
    sim4, s4, m4, _ = _run(alg, fd, 4, 12, compressor=comp)
    for a, b in zip(jax.tree.leaves((s1.server, _clients(sim1, s1))), jax.tree.leaves((s4.server, _clients(sim4, s4)))):
        np.testing.assert_allclose(a, b, atol=2e-5)
    np.testing.assert_allclose(m1["train_loss"], m4["train_loss"], atol=2e-5)
    ev = fk.engine.make_evaluator(alg.model.apply)
    evd = sim1.eval_data()
    before = float(ev(alg.model_params(sim1.init(0).server), evd)["test_accuracy"])
    after = float(ev(alg.model_params(s1.server), evd)["test_accuracy"])
    assert after > before + 0.3, (before, after)


def test_fedkd_unsampled_teachers_stay_bit_identical(fd):
    alg = build("fedkd", fd)
    sim = fk.Simulator(alg, fd, cohort_size=5, mesh=fk.client_mesh(2))
    data = sim.put_data(fd)
    state = sim.put_state(sim.init(0))
    before = jax.device_get(sim.client_states(state.key))
    cohort = set(fk.engine.sample_cohort(state.key, 0, fd.num_clients, 5).tolist())
    state, _ = sim.step(state, data)
    after = jax.device_get(sim.client_states(state.key))
    assert set(np.flatnonzero(sim.store.touched).tolist()) == cohort
    for c in range(fd.num_clients):
        same = all(np.array_equal(a[c], b[c]) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
        assert same == (c not in cohort), c
    # and the teachers learn: personal accuracy rises after a few rounds
    pe = fk.engine.make_personal_evaluator(alg.personal_model.apply)
    evd = sim.eval_data()
    acc0 = np.nanmean(np.asarray(pe(alg.personal_params(before), evd)))
    state, _ = sim.run(state, data, 20)
    acc1 = np.nanmean(np.asarray(pe(alg.personal_params(sim.client_states(state.key)), evd)))
    assert acc1 > acc0 + 0.2, (acc0, acc1)


def test_fedkd_uploads_only_the_compressed_student(fd):
    alg = build("fedkd", fd)
    student_bytes = fk.engine.tree_bytes(alg.model.init(jax.random.key(0)))
    sim_full = fk.Simulator(alg, fd, cohort_size=4, mesh=fk.client_mesh(1))
    assert sim_full.round_bytes() == (4 * student_bytes, 4 * student_bytes)
    comp = fk.compression.make_compressor("svd", rounds=10, energy_start=0.5, energy_end=0.5)
    _, _, m, _ = _run(alg, fd, 1, 3, cohort=4, compressor=comp)
    assert np.all(np.asarray(m["bytes_up_clients"]).sum(axis=1) < 4 * student_bytes)


def test_stragglers_dropped_by_fedavg_kept_by_fedprox(fd):
    for name, changes in (("fedavg", False), ("fedprox", True)):
        alg = build(name, fd)
        sim = fk.Simulator(alg, fd, cohort_size=6, mesh=fk.client_mesh(1), straggler_fraction=1.0)
        st = sim.init(0)
        new, m = sim.step(st, sim.put_data(fd))
        moved = any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(st.server.params), jax.tree.leaves(new.server.params)))
        assert moved == changes, name
    # FedProx's stragglers take fewer than their full number of steps
    full = fk.algorithms.real_steps(jnp.asarray(fd.counts), fd.max_examples, 8).mean()
    assert float(m["client_steps"]) < float(full)
    with pytest.raises(ConfigError) as e:
        fk.Simulator(build("fedkd", fd), fd, cohort_size=6, straggler_fraction=0.5)
    assert e.value.field == "client.straggler_fraction"


def test_fedprox_proximal_term_keeps_clients_near_the_global_model(fd):
    norms = {}
    for mu in (0.0, 10.0):
        alg = build("fedprox", fd, mu=mu)
        sim = fk.Simulator(alg, fd, cohort_size=6, mesh=fk.client_mesh(1))
        st = sim.init(0)
        new, _ = sim.step(st, sim.put_data(fd))
        norms[mu] = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(new.server.params), jax.tree.leaves(st.server.params)))
    assert norms[10.0] < 0.8 * norms[0.0]


def test_bad_hyperparameters_fail_before_compiling(fd):
    s = fk.make_model("mlp", **STUDENT)
    t = fk.make_model("mlp", **TEACHER)
    sgd = optax.sgd(0.1)
    cases = [
        (lambda: fedkd(s, t, sgd, sgd, sgd, batch_size=8, temperature=0.0), "distill.temperature"),
        (lambda: server_teacher_kd(s, t, sgd, sgd, fd.proxy_x, alpha=1.5, temperature=1.0, batch_size=8), "distill.alpha"),
        (lambda: server_teacher_kd(s, t, sgd, sgd, fd.proxy_x, alpha=0.5, temperature=-1.0, batch_size=8), "distill.temperature"),
        (lambda: fedprox(s, sgd, sgd, mu=-0.1, batch_size=8), "fedprox.mu"),
        (lambda: feddf(s, sgd, sgd, np.ones((10, 63), np.float32), batch_size=8), "data.proxy_fraction"),
        (lambda: feddf(s, sgd, sgd, np.ones((0, 64), np.float32), batch_size=8), "data.proxy_fraction"),
    ]
    for make, field in cases:
        with pytest.raises(ConfigError) as e:
            make()
        assert e.value.field == field
    from fedkd_jax.config import load_config

    for override, field in [
        ("algorithm=fedmagic", "algorithm"),
        ("distill.temperature=0", "distill.temperature"),
        ("distill.alpha=1.2", "distill.alpha"),
        ("fedprox.mu=-1", "fedprox.mu"),
        ("compression.method=zip", "compression.method"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert e.value.field == field
    with pytest.raises(ConfigError) as e:
        load_config(None, ["algorithm=feddf"])
    assert e.value.field == "data.proxy_fraction"


def test_aux_is_derived_from_the_update_the_server_receives(fd):
    # aux_from_update sees the decompressed update: with aux = update, the averaged
    # aux must equal the averaged (compressed) update exactly.
    base = build("fedavg", fd)

    def server_update(state, mean_update, mean_aux, key, sdata):
        pairs = zip(jax.tree.leaves(mean_update), jax.tree.leaves(mean_aux))
        gap = jnp.max(jnp.stack([jnp.max(jnp.abs(a - b)) for a, b in pairs]))
        norm = sum(jnp.sum(u**2) for u in jax.tree.leaves(mean_aux))
        new, _ = base.server_update(state, mean_update, (), key, sdata)
        return new, {"gap": gap, "norm": norm}

    alg = base._replace(aux_from_update=lambda bcast, update, sdata: update, server_update=server_update)
    compressed = fk.Simulator(alg, fd, cohort_size=4, mesh=fk.client_mesh(2), compressor=fk.compression.topk(0.05))
    full = fk.Simulator(alg, fd, cohort_size=4, mesh=fk.client_mesh(2))
    _, m = compressed.step(compressed.init(0), compressed.put_data(fd))
    _, m_full = full.step(full.init(0), full.put_data(fd))
    assert float(m["server_gap"]) == 0.0
    assert float(m["server_norm"]) < float(m_full["server_norm"])  # only 5% of entries survive top-k
