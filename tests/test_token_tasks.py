"""Next-token tasks: labels [R, L] with padding, per-token loss and accuracy (Reddi et al. 2021),
checked against numpy, and padding that changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedkd_jax as fk
from fedkd_jax.engine import make_evaluator
from fedkd_jax.losses import cross_entropy

V, L, E = 7, 5, 4  # vocabulary, sequence length, embedding


def bigram_model():
    """logits[b, l] = emb[x[b, l]] @ W + c: a next-token model small enough to check by hand."""

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"emb": jax.random.normal(k1, (V, E)) * 0.5, "w": jax.random.normal(k2, (E, V)) * 0.5,
                "c": jnp.zeros((V,))}

    def apply(p, x):
        h = p["emb"][x.astype(jnp.int32)]  # [B, L, E]
        return h @ p["w"] + p["c"], jnp.mean(h, axis=1)

    return fk.Model(init, apply, V * E + E * V + V, E, "bigram", L)


def token_data(num_clients=6, seed=0):
    """Clients of a few sequences each, ragged lengths padded with label -1 (x 0 there)."""
    rng = np.random.default_rng(seed)
    xs, ys, tx, ty = [], [], [], []
    for c in range(num_clients):
        for dst_x, dst_y, n in ((xs, ys, 3 + c % 3), (tx, ty, 2)):
            seqs = rng.integers(0, V, (n, L + 1))
            lengths = rng.integers(2, L + 1, n)
            x, y = seqs[:, :L].astype(np.float32), seqs[:, 1:].astype(np.int32)
            for i, n_tok in enumerate(lengths):
                x[i, n_tok:], y[i, n_tok:] = 0, -1
            dst_x.append(x)
            dst_y.append(y)
    counts = np.array([len(a) for a in xs])
    tcounts = np.array([len(a) for a in tx])
    x, y = np.concatenate(xs + tx), np.concatenate(ys + ty)
    n_train = counts.sum()
    return fk.FederatedData(
        x=x, y=y,
        train_rows=np.arange(n_train, dtype=np.int32), train_offsets=np.concatenate([[0], np.cumsum(counts)]),
        test_rows=np.arange(n_train, len(x), dtype=np.int32), test_offsets=np.concatenate([[0], np.cumsum(tcounts)]),
        global_x=x[n_train:], global_y=y[n_train:], num_classes=V, accuracy_ignore=(3,),
    )


def np_token_stats(params, x, y, ignore=()):
    logits = np.asarray(bigram_model().apply(params, jnp.asarray(x))[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    real = y >= 0
    nll = -np.take_along_axis(logp, np.maximum(y, 0)[..., None], -1)[..., 0]
    scored = real & ~np.isin(y, ignore)
    hits = (logits.argmax(-1) == y) & scored
    return nll[real].mean(), hits.sum() / scored.sum(), hits, scored


def test_token_cross_entropy_averages_real_tokens_only():
    fd = token_data()
    p = bigram_model().init(jax.random.key(0))
    x, y = fd.x[:8], fd.y[:8]
    logits, _ = bigram_model().apply(p, jnp.asarray(x))
    where = jnp.asarray(y >= 0)
    loss, m = cross_entropy(logits, jnp.asarray(y), where=where)
    ref_loss, _, hits, _ = np_token_stats(p, x, y)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert float(m["accuracy"]) == pytest.approx(hits.sum() / (y >= 0).sum(), rel=1e-6)


def test_token_evaluation_matches_numpy_with_ignored_ids():
    fd = token_data()
    model = bigram_model()
    p = model.init(jax.random.key(1))
    sim = fk.Simulator(fk.fedavg(model, optax.sgd(0.5), optax.sgd(1.0), batch_size=2), fd, cohort_size=3,
                       mesh=fk.client_mesh(1))
    ev = make_evaluator(model.apply, ignore=fd.accuracy_ignore)(p, sim.eval_data())
    ref_loss, ref_acc, _, _ = np_token_stats(p, fd.global_x, fd.global_y, ignore=(3,))
    assert float(ev["test_loss"]) == pytest.approx(ref_loss, rel=1e-5)
    assert float(ev["test_accuracy"]) == pytest.approx(ref_acc, rel=1e-6)
    for c in range(fd.num_clients):  # each client's local test tokens
        rows = fd.test_rows[fd.test_offsets[c]:fd.test_offsets[c + 1]]
        _, _, hits, scored = np_token_stats(p, fd.x[rows], fd.y[rows], ignore=(3,))
        assert float(ev["client_accuracy"][c]) == pytest.approx(hits.sum() / scored.sum(), rel=1e-6)


def test_padding_tokens_change_nothing_in_training():
    """Whatever sits at padded positions (inputs and labels -1) leaves the trained model unchanged."""
    fd = token_data()
    noisy_x = fd.x.copy()
    noisy_x[fd.y < 0] = np.random.default_rng(5).integers(0, V, int((fd.y < 0).sum()))
    outs = []
    for data in (fd, fd.replace(x=noisy_x)):
        sim = fk.Simulator(fk.fedavg(bigram_model(), optax.sgd(0.5), optax.sgd(1.0), batch_size=2), data,
                           cohort_size=3, mesh=fk.client_mesh(1))
        state, m = sim.run(sim.put_state(sim.init(0)), sim.put_data(), 3)
        outs.append((jax.device_get(state.server), np.asarray(m["train_loss"])))
    for a, b in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(outs[1][0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    assert np.all(np.isfinite(outs[0][1])) and outs[0][1][-1] < outs[0][1][0]  # it learns


def test_token_datasets_refuse_label_partitions_and_bad_ids():
    from fedkd_jax.data.datasets import Dataset
    from fedkd_jax.errors import DataError

    x = np.zeros((40, L), np.float32)
    y = np.full((40, L), 2, np.int32)
    clients = np.repeat(np.arange(4), 10)
    special = {"pad": 0, "oov": 5, "bos": 1, "eos": 6}
    ds = Dataset("toks", x, y, V, None, clients, task="next_token", special_tokens=special)
    fd = fk.federate(ds, partition="natural", num_clients=4, seed=0)
    assert fd.num_clients == 4 and fd.y.shape == (40, L)
    assert sorted(fd.accuracy_ignore) == [5, 6]  # next-word accuracy leaves out OOV and EOS (Reddi et al. 2021)
    with pytest.raises(DataError, match="data.partition.*next-token"):
        fk.federate(ds, partition="dirichlet", num_clients=4, seed=0)
    y[7, 3] = V  # out of the vocabulary
    with pytest.raises(DataError, match="row 7 has 7"):
        fk.federate(ds._replace(y=y), partition="natural", num_clients=4, seed=0)


def test_fedkd_trains_on_tokens_and_scores_teachers_per_token():
    from fedkd_jax.runner.evaluate import make_evaluate

    fd = token_data()
    alg = fk.algorithms.fedkd(bigram_model(), bigram_model(), optax.sgd(0.5), optax.sgd(0.5), optax.sgd(1.0),
                              batch_size=2)
    sim = fk.Simulator(alg, fd, cohort_size=6, mesh=fk.client_mesh(1), store="host")
    state, m = sim.run(sim.put_state(sim.init(0)), sim.put_data(), 3)
    assert np.all(np.isfinite(np.asarray(m["train_loss"])))
    out = make_evaluate(sim, np.arange(fd.num_clients))(state)
    teachers = sim.algorithm.personal_params(sim.client_states(state.key, np.arange(fd.num_clients)))
    accs = []
    for c in range(fd.num_clients):  # each teacher on its own client's test tokens, by numpy
        rows = fd.test_rows[fd.test_offsets[c]:fd.test_offsets[c + 1]]
        _, _, hits, scored = np_token_stats(jax.tree.map(lambda a: a[c], teachers), fd.x[rows], fd.y[rows], ignore=(3,))
        accs.append(hits.sum() / scored.sum())
    assert out["teacher_acc_mean"] == pytest.approx(np.mean(accs), abs=1e-6)


@pytest.mark.parametrize("kind", ["char_lstm", "transformer"])
def test_reference_sequence_models_train_on_token_data(kind):
    fd = token_data()
    model = fk.make_model(kind, num_features=L, num_classes=V, width=1 / 32)
    sim = fk.Simulator(fk.fedavg(model, optax.adam(0.05), optax.sgd(1.0), batch_size=2), fd, cohort_size=6,
                       mesh=fk.client_mesh(1))
    state, m = sim.run(sim.put_state(sim.init(0)), sim.put_data(), 4)
    loss = np.asarray(m["train_loss"])
    assert np.all(np.isfinite(loss)) and loss[-1] < loss[0]
    ev = make_evaluator(model.apply, ignore=fd.accuracy_ignore)(jax.device_get(state.server.params), sim.eval_data())
    assert 0.0 <= float(ev["test_accuracy"]) <= 1.0 and np.isfinite(float(ev["test_loss"]))
