"""FedProx's stragglers as its reference code draws them (litian96/FedProx): the count,
whole epochs with E >= 2, partial work kept or dropped, zero-step stragglers.

Each expected value is computed independently (the reference's formula, counting,
a shorter run), never with the engine's own straggler functions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedkd_jax as fk
from fedkd_jax.algorithms import fedprox
from fedkd_jax.algorithms.base import FULL_WORK, STRAGGLER, ClientData
from fedkd_jax.engine import round_key, sample_cohort
from fedkd_jax.engine.cohort import straggler_flags

STUDENT = dict(num_features=64, num_classes=10, hidden=(16,))


@pytest.fixture(scope="module")
def fd(digits):
    return fk.federate(digits, partition="dirichlet", num_clients=16, seed=0, alpha=0.3, proxy_fraction=0.1)


# --------------------------------------------------------------- stragglers
def _fedprox_reference_count(fraction, cohort):
    """litian96/FedProx, flearn/trainers/fedprox.py: ``round(C * (1 - drop_percent))`` stay active."""
    return cohort - round(cohort * (1 - fraction))


def test_straggler_count_is_exact_every_round():
    key = jax.random.key(3)
    for frac, cohort in ((0.5, 10), (0.9, 10), (0.25, 10), (0.3, 7), (0.1, 5), (0.3, 45)):
        expect = _fedprox_reference_count(frac, cohort)
        for r in range(20):
            flags = np.asarray(straggler_flags(round_key(key, r), cohort, cohort + 2, frac, "fixed"))
            assert (flags[:cohort] == STRAGGLER).sum() == expect, (frac, cohort, r)
            assert (flags[cohort:] == FULL_WORK).all()  # padding never straggles


def test_straggler_count_is_one_integer_on_single_and_swept_paths():
    """Every fraction 0.00..1.00 (step 0.01) x cohort 1..200: the reference's count, the
    single run's and the count a batched sweep traces are one integer."""
    import dataclasses

    from fedkd_jax.config import load_config
    from fedkd_jax.engine.cohort import straggler_count
    from fedkd_jax.sweeps.grid import hparams

    fracs = [i / 100 for i in range(101)]
    cohorts = range(1, 201)
    ref = np.array([[_fedprox_reference_count(f, c) for c in cohorts] for f in fracs])
    single = np.array([[straggler_count(f, c) for c in cohorts] for f in fracs])
    np.testing.assert_array_equal(single, ref)
    # the traced path: the integer travels as the sweep's float32 hyperparameter and
    # the program draws that many stragglers (one program for every pair: a cohort of
    # 200 positions holds any count up to 200)
    hp = ref.astype(np.float32).reshape(-1)
    draw = jax.jit(jax.vmap(lambda k: jnp.sum(
        straggler_flags(jax.random.key(0), 200, 200, jnp.float32(0.5), "fixed", k) == STRAGGLER)))
    np.testing.assert_array_equal(np.asarray(draw(jnp.asarray(hp))).reshape(ref.shape), ref)
    # and the sweep's host side derives the same integer from each run's config
    base = load_config(None, ["algorithm=fedprox", "data.num_clients=200"])
    for c in (1, 7, 45, 50, 199):
        for i, f in enumerate(fracs):
            cfg = dataclasses.replace(base, client=dataclasses.replace(base.client, straggler_fraction=f),
                                      run=dataclasses.replace(base.run, cohort_size=c))
            assert hparams(cfg)["client.straggler_count"] == ref[i, c - 1], (f, c)
    # where the old derivations disagreed with the reference
    assert straggler_count(0.59, 50) == 30 and int(jnp.round(jnp.float32(0.59) * 50)) == 29
    assert straggler_count(0.02, 25) == 1 and round(0.02 * 25) == 0


def test_no_straggler_does_full_work():
    steps = jax.jit(jax.vmap(fk.algorithms.straggler_steps, in_axes=(0, None, None)))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(400))
    for full in (2, 3, 7):
        got = np.asarray(steps(keys, STRAGGLER, full))
        assert got.min() == 1 and got.max() == full - 1  # uniform over 1 .. full-1, all reached
        assert (np.asarray(steps(keys, FULL_WORK, full)) == full).all()
    assert (np.asarray(steps(keys, STRAGGLER, 1)) == 0).all()  # no partial amount of a single step
    # E = 4 epochs of 3 steps: whole epochs 1..3, each reached
    by_epoch = jax.jit(jax.vmap(lambda k: fk.algorithms.straggler_steps(k, STRAGGLER, 12, epochs=4)))
    assert sorted(set(np.asarray(by_epoch(keys)).tolist())) == [3, 6, 9]


def test_fedprox_straggler_trains_whole_epochs_like_a_shorter_run(fd):
    """With E = 2 a straggler's update is exactly a full-work client's update with
    E' = 1 epoch (the reference's randint(1, E)), never a cut inside an epoch (the
    draw over 1 .. E-1 for larger E is counted in test_no_straggler_does_full_work)."""
    model = fk.make_model("mlp", **STUDENT)
    kw = dict(mu=0.01, batch_size=4)
    alg = fedprox(model, optax.sgd(0.1), optax.sgd(1.0), local_epochs=2, **kw)
    one_epoch = fedprox(model, optax.sgd(0.1), optax.sgd(1.0), local_epochs=1, **kw)
    params = model.init(jax.random.key(0))
    c = int(np.argmax(fd.counts))  # a client with several batches per epoch
    rows = fd.row_table(np.array([c]))[0]
    x, y, n = jnp.asarray(fd.x[rows]), jnp.asarray(fd.y[rows]), jnp.asarray(fd.counts[c])
    per_epoch = -(-int(fd.counts[c]) // 4)  # ceil(count / B), counted by hand
    assert per_epoch >= 3

    straggler = jax.jit(lambda k: alg.client_update(params, (), ClientData(x, y, n, STRAGGLER), k))
    reference = jax.jit(lambda k: one_epoch.client_update(params, (), ClientData(x, y, n, FULL_WORK), k))
    for i in range(3):
        key = jax.random.key(100 + i)
        out = straggler(key)
        assert int(out.metrics["steps"]) == per_epoch  # one whole epoch of two
        ref = reference(key)
        for a, b in zip(jax.tree.leaves(out.update), jax.tree.leaves(ref.update)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
        assert float(out.weight) == float(fd.counts[c])  # FedProx keeps it


def test_fedprox_keeps_partial_work_of_exactly_the_stragglers(fd):
    import itertools
    import math

    model = fk.make_model("mlp", **STUDENT)
    alg = fedprox(model, optax.sgd(0.1), optax.sgd(1.0), mu=0.01, batch_size=4, local_epochs=2)
    sim = fk.Simulator(alg, fd, cohort_size=8, mesh=fk.client_mesh(1), straggler_fraction=0.5)
    state = sim.init(0)
    _, m = sim.step(state, sim.put_data(fd))
    assert int(m["clients_contributing"]) == 8  # FedProx keeps everyone
    cohort = sample_cohort(state.key, 0, fd.num_clients, 8)
    w = fd.counts[cohort].astype(np.float64)
    per_epoch = np.array([math.ceil(n / 4) for n in fd.counts[cohort]])  # by hand
    # E = 2: a straggler trains exactly 1 epoch, the others 2; exactly 8 - round(8 * 0.5) = 4
    # straggle. Some set of 4 must explain the reported mean steps, whichever the draw chose.
    got = float(m["client_steps"])
    means = [(w * per_epoch * np.where(np.isin(np.arange(8), s), 1, 2)).sum() / w.sum()
             for s in itertools.combinations(range(8), 4)]
    assert min(abs(v - got) for v in means) < 1e-4 * got
    assert abs((w * per_epoch * 2).sum() / w.sum() - got) > 0.5  # not everyone did full work


def test_straggler_with_zero_steps_contributes_nothing(fd):
    """E = 1 and one batch per client: a straggler's work (1 .. full-1 steps) is empty,
    so it is neither counted, nor averaged in as a zero delta, nor billed."""
    model = fk.make_model("mlp", **STUDENT)
    b = int(fd.max_examples)  # every client's epoch is a single batch
    per_client = fk.engine.tree_bytes(model.init(jax.random.key(0)))
    frac, cohort = 0.5, 6
    alg = fedprox(model, optax.sgd(0.1), optax.sgd(1.0), mu=0.01, batch_size=b, local_epochs=1)
    sim = fk.Simulator(alg, fd, cohort_size=cohort, mesh=fk.client_mesh(1), straggler_fraction=frac)
    _, m = sim.step(sim.init(0), sim.put_data(fd))
    active = round(cohort * (1 - frac))  # the reference's count of active clients
    assert int(m["clients_contributing"]) == active == 3
    assert sorted(np.asarray(m["bytes_up_clients"]).tolist()) == [0] * (cohort - active) + [per_client] * active
    assert float(m["client_steps"]) == 1.0  # the mean holds only the clients that trained
