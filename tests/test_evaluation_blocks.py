"""Evaluation of personal models (FedKD teachers) in bounded blocks, and none gathered
when no client has a local test split."""

import jax
import numpy as np
import optax
import pytest

import fedkd_jax as fk
from fedkd_jax.runner.evaluate import make_evaluate


def _sim(fd):
    student = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(8,))
    teacher = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(12,))
    alg = fk.algorithms.fedkd(student, teacher, optax.sgd(0.05), optax.sgd(0.05), optax.sgd(1.0), batch_size=10)
    return fk.Simulator(alg, fd, cohort_size=6, mesh=fk.client_mesh(1), store="host")


def test_teachers_are_evaluated_in_blocks_with_the_same_result(digits):
    fd = fk.federate(digits, partition="dirichlet", num_clients=16, seed=1, alpha=0.5)
    sim = _sim(fd)
    state, _ = sim.run(sim.put_state(sim.init(0)), sim.put_data(), 2)
    ids = np.arange(16)
    whole = make_evaluate(sim, ids)(state)
    blocked = make_evaluate(sim, ids, personal_block=3)(state)
    assert {k: v for k, v in whole.items() if k.startswith("teacher_acc")}  # teachers were evaluated
    for k in whole:
        np.testing.assert_allclose(blocked[k], whole[k], rtol=1e-6, err_msg=k)
    # the same figure by hand: each tested client's teacher on its own local test rows
    teachers = sim.client_states(state.key, ids)
    params = sim.algorithm.personal_params(teachers)
    accs = []
    for i in ids:
        rows = fd.row_table(np.array([i]), test=True)[0][: fd.test_counts[i]]
        if len(rows):
            p = jax.tree.map(lambda a: a[i], params)
            logits = np.asarray(sim.algorithm.personal_model.apply(p, fd.x[rows])[0])
            accs.append(float(np.mean(logits.argmax(-1) == fd.y[rows])))
    assert whole["teacher_acc_mean"] == pytest.approx(np.mean(accs), abs=1e-6)


def test_no_teacher_is_gathered_without_local_tests(digits):
    fd = fk.federate(digits, partition="dirichlet", num_clients=16, seed=1, alpha=0.5, test_fraction=0.0)
    sim = _sim(fd)
    state, _ = sim.run(sim.put_state(sim.init(0)), sim.put_data(), 1)
    gathered = []
    original = sim.client_states
    sim.client_states = lambda key, ids=None: gathered.append(len(ids)) or original(key, ids)
    out = make_evaluate(sim, np.arange(16))(state)
    assert gathered == [] and not any(k.startswith("teacher_acc") for k in out)
    assert "test_accuracy" in out


def _by_hand(sim, fd, state, ids):
    """Each tested client's personal model on its own local test rows (a numpy loop)."""
    params = sim.algorithm.personal_params(sim.client_states(state.key, ids))
    accs = []
    for k, i in enumerate(ids):
        rows = fd.row_table(np.array([i]), test=True)[0][: fd.test_counts[i]]
        if len(rows):
            p = jax.tree.map(lambda a: a[k], params)
            logits = np.asarray(sim.algorithm.personal_model.apply(p, fd.x[rows])[0])
            accs.append(float(np.mean(logits.argmax(-1) == fd.y[rows])))
    return accs


def test_only_trained_teachers_are_gathered_and_initial_ones_are_kept(digits):
    """Untrained teachers are their seed-defined initial models: evaluated once, never read
    from the store; later evaluations gather only the clients the store holds."""
    fd = fk.federate(digits, partition="dirichlet", num_clients=40, seed=2, alpha=0.5)
    sim = _sim(fd)
    pool = sim.put_data()
    ids = np.arange(40)
    evaluate = make_evaluate(sim, ids, personal_block=8, pool=pool)
    gathered = []
    original = sim.client_states
    sim.client_states = lambda key, i=None: gathered.append(np.unique(i)) or original(key, i)
    state = sim.put_state(sim.init(0))
    for rounds in (1, 3):
        state, _ = sim.run(state, pool, rounds)
        gathered.clear()
        out = evaluate(state)
        tested = ids[fd.test_counts > 0]
        trained = tested[sim.store.touched[tested]]
        assert 0 < len(trained) < len(tested)  # both kinds present
        assert np.array_equal(np.unique(np.concatenate(gathered)), trained)
        sim.client_states = original
        accs = _by_hand(sim, fd, state, ids)
        sim.client_states = lambda key, i=None: gathered.append(np.unique(i)) or original(key, i)
        assert out["teacher_acc_mean"] == pytest.approx(np.mean(accs), abs=1e-6)
        assert out["teacher_acc_p10"] == pytest.approx(np.percentile(accs, 10), abs=1e-6)
