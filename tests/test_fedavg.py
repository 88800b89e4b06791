"""FedAvg against hand-computed and per-client reference results."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedkd_jax as fk
from fedkd_jax.algorithms import epoch_order
from fedkd_jax.engine import client_key, round_key
from tests.conftest import make_fd


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def test_fedavg_linear_matches_hand_computed_weighted_mean():
    rng = np.random.default_rng(0)
    counts, d, k, lr = [2, 3, 1], 4, 3, 0.1
    xs = [rng.normal(size=(n, d)).astype(np.float32) for n in counts]
    ys = [rng.integers(0, k, n) for n in counts]
    fd = make_fd(xs, ys, k)
    model = fk.make_model("mlp", num_features=d, num_classes=k, hidden=())
    # batch >= every client's size and one epoch: one full-batch gradient step per client
    alg = fk.fedavg(model, optax.sgd(lr), optax.sgd(1.0), batch_size=4)
    sim = fk.Simulator(alg, fd, cohort_size=3, mesh=fk.client_mesh(1))
    state = sim.init(0)
    w0 = np.asarray(state.server.params["head"]["kernel"], np.float64)
    b0 = np.asarray(state.server.params["head"]["bias"], np.float64)
    new, metrics = sim.step(state, sim.put_data(fd))

    ws, bs = [], []
    for x, y in zip(xs, ys):
        g = _softmax(x @ w0 + b0) - np.eye(k)[y]  # dCE/dlogits per row
        ws.append(w0 - lr * x.T @ g / len(x))
        bs.append(b0 - lr * g.mean(0))
    n = np.array(counts, np.float64)
    w_expect = sum(c * w for c, w in zip(n, ws)) / n.sum()
    b_expect = sum(c * b for c, b in zip(n, bs)) / n.sum()
    np.testing.assert_allclose(new.server.params["head"]["kernel"], w_expect, atol=1e-6)
    np.testing.assert_allclose(new.server.params["head"]["bias"], b_expect, atol=1e-6)
    assert float(metrics["weight_sum"]) == sum(counts)
    assert int(new.round) == 1


def _reference_round(model, params, fd, cohort, rkey, *, lr, momentum, batch, epochs):
    """Per-client Python loop on unpadded data: no masks anywhere."""
    opt = optax.sgd(lr, momentum=momentum)

    def loss(p, x, y):
        logits, _ = model.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grad = jax.jit(jax.grad(loss))
    total = jax.tree.map(jnp.zeros_like, params)
    weight = 0.0
    for cid in cohort:
        n = int(fd.counts[cid])
        x, y = (jnp.asarray(a) for a in fd.client(int(cid)))
        p, s = params, opt.init(params)
        ckey = client_key(rkey, cid)
        for e in range(epochs):
            order = np.asarray(epoch_order(jax.random.fold_in(ckey, e), n, fd.max_examples))[:n]
            for start in range(0, n, batch):
                idx = order[start : start + batch]
                u, s = opt.update(grad(p, x[idx], y[idx]), s, p)
                p = optax.apply_updates(p, u)
        total = jax.tree.map(lambda t, a, b: t + n * (a - b), total, p, params)
        weight += n
    return jax.tree.map(lambda p0, t: p0 + t / weight, params, total)


@pytest.mark.parametrize("group_size", [1, 3])
def test_padded_masked_training_equals_unpadded_reference(digits20, group_size):
    fd = digits20
    assert fd.counts.min() < fd.max_examples  # padding is exercised
    model = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(16,))
    lr, momentum, batch, epochs = 0.05, 0.9, 7, 2
    alg = fk.fedavg(model, optax.sgd(lr, momentum=momentum), optax.sgd(1.0), batch_size=batch, local_epochs=epochs)
    sim = fk.Simulator(alg, fd, cohort_size=12, mesh=fk.client_mesh(2), group_size=group_size)
    state = sim.init(1)
    new, _ = sim.step(state, sim.put_data(fd))

    rkey = round_key(state.key, state.round)
    cohort = fk.engine.sample_cohort(state.key, 0, fd.num_clients, 12)
    expect = _reference_round(model, state.server.params, fd, cohort, rkey, lr=lr, momentum=momentum, batch=batch, epochs=epochs)
    for a, b in zip(jax.tree.leaves(new.server.params), jax.tree.leaves(expect)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_fixed_local_steps_mode_runs_the_requested_steps(digits20):
    model = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(8,))
    alg = fk.fedavg(model, optax.sgd(0.05), optax.sgd(1.0), batch_size=5, local_steps=3)
    sim = fk.Simulator(alg, digits20, cohort_size=4, mesh=fk.client_mesh(1))
    _, m = sim.step(sim.init(0), sim.put_data(digits20))
    assert float(m["client_steps"]) == 3.0


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_server_optimizers_apply_optax_to_negated_mean_delta(digits20, name):
    model = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(8,))
    server_opt = fk.algorithms.server_optimizer(name, lr=0.5)
    plain = fk.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), batch_size=10)
    alg = fk.fedavg(model, optax.sgd(0.1), server_opt, batch_size=10)
    data = fk.Simulator(plain, digits20, cohort_size=5, mesh=fk.client_mesh(1)).put_data(digits20)
    s_plain = fk.Simulator(plain, digits20, cohort_size=5, mesh=fk.client_mesh(1))
    s_alg = fk.Simulator(alg, digits20, cohort_size=5, mesh=fk.client_mesh(1))
    st = s_alg.init(0)
    new_plain, _ = s_plain.step(s_plain.init(0), data)
    new, _ = s_alg.step(st, data)
    # Same seed -> same cohort and client training; plain FedAvg exposes the mean delta.
    delta = jax.tree.map(lambda a, b: a - b, new_plain.server.params, st.server.params)
    grads = jax.tree.map(lambda d: -d, delta)
    upd, _ = server_opt.update(grads, server_opt.init(st.server.params), st.server.params)
    expect = optax.apply_updates(st.server.params, upd)
    for a, b in zip(jax.tree.leaves(new.server.params), jax.tree.leaves(expect)):
        np.testing.assert_allclose(a, b, atol=1e-5)
