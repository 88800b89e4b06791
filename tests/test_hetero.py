"""Architecture groups: assignment, stratified cohorts, the one-program round, FD and FedProto."""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

import fedkd_jax as fk
from fedkd_jax.config import load_config
from fedkd_jax.errors import ConfigError
from fedkd_jax.hetero.fd import fd
from fedkd_jax.hetero.fedproto import fedproto
from fedkd_jax.hetero.grouped import grouped
from fedkd_jax.hetero.groups import assign_groups, group_layout
from fedkd_jax.runner import read_jsonl

TIMING = ("round_time", "wall_time", "eval_time", "eval_seconds", "checkpoint_seconds")


@pytest.fixture(scope="module")
def pop(digits):
    return fk.federate(digits, partition="dirichlet", num_clients=12, seed=1, alpha=1.0)


def _mlp(hidden):
    return fk.make_model("mlp", num_features=64, num_classes=10, hidden=hidden)


# ------------------------------------------------------------ assignment
def test_assign_groups_has_exact_shares_and_depends_on_the_seed():
    m = assign_groups(103, [0.5, 0.3, 0.2], seed=0)
    # Hamilton by hand: 51.5, 30.9, 20.6 -> floors 51, 30, 20; the 2 left go to .9 and .6
    assert np.bincount(m).tolist() == [51, 31, 21]
    assert np.array_equal(m, assign_groups(103, [0.5, 0.3, 0.2], seed=0))
    assert not np.array_equal(m, assign_groups(103, [0.5, 0.3, 0.2], seed=1))
    e = assign_groups(20, [None, 0.5, 0.5], seed=0, clients=[[0, 1, 2], None, None])
    assert e[:3].tolist() == [0, 0, 0] and np.bincount(e).tolist() == [3, 9, 8]  # 17 left: 8.5 / 8.5 -> 9, 8
    with pytest.raises(ConfigError, match="model.groups"):
        assign_groups(5, None, seed=0, clients=[[0, 1], [1, 2, 3, 4]])


def test_stratified_cohorts_sample_each_group_uniformly(pop):
    member = assign_groups(12, [0.5, 0.25, 0.25], seed=0)
    alg = fk.fedavg(_mlp((8,)), optax.sgd(0.1), optax.sgd(1.0), batch_size=5)
    sim = fk.Simulator(alg, pop, cohort_size=4, mesh=fk.client_mesh(2), groups=member)
    lay = sim.layout
    # C_g: 1 slot each, then the 1 left by population (6, 3, 3) -> group 0: (2, 1, 1)
    assert lay.cohort == (2, 1, 1) and lay.slots == (1, 1, 1) and sim.padded_cohort == 6
    plan = sim.plan(jax.random.key(0), 0, 300)
    hits = np.zeros(12)
    for ids in plan.ids:
        blocks = ids.reshape(2, 3)  # [device, group slot]
        for g in range(3):
            real = blocks[:, g][blocks[:, g] < 12]
            assert len(real) == lay.cohort[g] and np.all(member[real] == g)
        real = ids[ids < 12]
        assert len(np.unique(real)) == 4
        hits[real] += 1
    expect = np.array([lay.cohort[g] / np.sum(member == g) for g in member]) * 300
    assert np.all(np.abs(hits - expect) < 5 * np.sqrt(expect))  # binomial: within 5 sigma


# ------------------------------------------------------ one group == today
def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _run(alg, data, groups, rounds=3, cohort=5):
    sim = fk.Simulator(alg, data, cohort_size=cohort, mesh=fk.client_mesh(2), groups=groups)
    st = sim.put_state(sim.init(0))
    st, m = sim.run(st, sim.put_data(), rounds)
    clients = sim.client_states(st.key) if sim.stateful else ()
    return jax.device_get((st, clients, m))


def test_one_group_is_exactly_the_ungrouped_engine(pop):
    one = np.zeros(12, np.int32)
    avg = fk.fedavg(_mlp((8,)), optax.sgd(0.1, momentum=0.5), optax.sgd(1.0), batch_size=5)
    a, b = _run(avg, pop, None), _run(avg, pop, one)
    _leaves_equal(a[0], b[0])
    kd = fk.algorithms.fedkd(_mlp((8,)), _mlp((16,)), optax.sgd(0.1), optax.sgd(0.1), optax.sgd(1.0), batch_size=5)
    a, b = _run(kd, pop, None), _run(grouped([kd]), pop, one)
    _leaves_equal(a[0], b[0])
    _leaves_equal(a[1], b[1][0])  # the one slot of every client's state: the same teachers
    assert np.array_equal(a[2]["train_loss"], b[2]["train_loss"])


# ------------------------------------------------------------ FD, FedProto
def _cohort_rows(sim, data, key):
    ids = sim.plan(key, 0, 1).ids[0]
    ids = ids[ids < data.num_clients]
    return ids, [data.client_rows(int(i)) for i in ids]


def test_fd_server_logits_are_numpy_per_label_means(pop):
    models = [_mlp((8,)), _mlp((16, 16))]
    member = assign_groups(12, [0.5, 0.5], seed=0)
    alg = fd(models, optax.sgd(0.0), num_classes=10, batch_size=5, local_epochs=1)
    sim = fk.Simulator(alg, pop, cohort_size=6, mesh=fk.client_mesh(2), groups=member)
    assert sim.bytes_up_per_client == (10 * 10 + 10) * 4 == sim.bytes_down_per_client
    st = sim.put_state(sim.init(0))
    st, _ = sim.run(st, sim.put_data(), 1)
    ids, rows = _cohort_rows(sim, pop, st.key)
    sums, counts = np.zeros((10, 10)), np.zeros(10)
    states = sim.client_states(st.key, ids)  # lr 0: the models every logit came from
    for j, (i, r) in enumerate(zip(ids, rows)):
        g = member[i]
        params = jax.tree.map(lambda a: a[j], states[g].params)
        logits = np.asarray(models[g].apply(params, pop.x[r])[0], np.float64)
        for row, label in zip(logits, pop.y[r]):  # one epoch: every row once
            sums[label] += row
            counts[label] += 1
    have = counts > 0
    np.testing.assert_allclose(np.asarray(st.server.logits)[have], (sums[have].T / counts[have]).T, atol=1e-4)
    assert np.array_equal(np.asarray(st.server.valid) > 0, have)


def test_fd_clipping_applies_to_the_per_label_upload(pop):
    """DP's clip acts on what FD uploads (logit sums and counts, one vector per client)."""
    from fedkd_jax.aggregation import chain, mean
    from fedkd_jax.privacy import gaussian

    models = [_mlp((8,)), _mlp((16, 16))]
    member = assign_groups(12, [0.5, 0.5], seed=0)
    alg = fd(models, optax.sgd(0.0), num_classes=10, batch_size=5)
    clip = 5.0
    agg = chain(gaussian(0.0, clip, expected_clients=6.0), mean("examples"))
    sim = fk.Simulator(alg, pop, cohort_size=6, mesh=fk.client_mesh(2), groups=member, aggregator=agg)
    st = sim.put_state(sim.init(0))
    st, _ = sim.run(st, sim.put_data(), 1)
    ids, rows = _cohort_rows(sim, pop, st.key)
    states = sim.client_states(st.key, ids)
    sums, counts = np.zeros((10, 10)), np.zeros(10)
    for j, (i, r) in enumerate(zip(ids, rows)):
        g = member[i]
        params = jax.tree.map(lambda a: a[j], states[g].params)
        logits = np.asarray(models[g].apply(params, pop.x[r])[0], np.float64)
        s_c, n_c = np.zeros((10, 10)), np.zeros(10)
        for row, label in zip(logits, pop.y[r]):
            s_c[label] += row
            n_c[label] += 1
        f = min(1.0, clip / np.sqrt(np.sum(s_c**2) + np.sum(n_c**2)))  # the joint L2 clip
        assert f < 1  # the clip binds
        sums += f * s_c
        counts += f * n_c
    have = counts > 0
    np.testing.assert_allclose(np.asarray(st.server.logits)[have], (sums[have].T / counts[have]).T, atol=1e-4)


def test_fedproto_prototypes_are_numpy_count_weighted_class_means(pop):
    models = [_mlp((8,)), _mlp((16,))]  # feature widths 8 and 16: projected to 6
    member = assign_groups(12, [0.5, 0.5], seed=0)
    alg = fedproto(models, optax.sgd(0.0), num_classes=10, batch_size=5, proto_dim=6)
    sim = fk.Simulator(alg, pop, cohort_size=6, mesh=fk.client_mesh(2), groups=member)
    st = sim.put_state(sim.init(0))
    st, _ = sim.run(st, sim.put_data(), 1)
    ids, rows = _cohort_rows(sim, pop, st.key)
    sums, counts = np.zeros((10, 6)), np.zeros(10)
    states = sim.client_states(st.key, ids)
    for j, (i, r) in enumerate(zip(ids, rows)):
        g = member[i]
        params = jax.tree.map(lambda a: a[j], states[g].params)
        h = np.maximum(pop.x[r] @ params["body"]["hidden"][0]["kernel"] + params["body"]["hidden"][0]["bias"], 0)
        z = h @ params["proj"]["kernel"] + params["proj"]["bias"]  # the projection, by hand in numpy
        for row, label in zip(np.asarray(z, np.float64), pop.y[r]):
            sums[label] += row
            counts[label] += 1
    have = counts > 0
    np.testing.assert_allclose(np.asarray(st.server.protos)[have], (sums[have].T / counts[have]).T, atol=1e-4)


def test_fedmd_consensus_is_the_numpy_mean_of_the_models_logits(pop):
    from fedkd_jax.hetero.fedmd import fedmd

    models = [_mlp((8,)), _mlp((16, 16))]
    member = assign_groups(12, [0.5, 0.5], seed=0)
    public = np.asarray(pop.global_x[:40], np.float32)
    alg = fedmd(models, optax.sgd(0.0), public, np.asarray(pop.global_y[:40]), num_classes=10, batch_size=5,
                public_subset=16)
    sim = fk.Simulator(alg, pop, cohort_size=6, mesh=fk.client_mesh(2), groups=member)
    assert sim.bytes_up_per_client == 16 * 10 * 4 == sim.bytes_down_per_client
    st0 = sim.put_state(sim.init(0))
    st, _ = sim.run(st0, sim.put_data(), 1)
    idx = np.asarray(st.server.idx)
    assert np.array_equal(idx, np.asarray(st0.server.next_idx)) and len(np.unique(idx)) == 16
    ids, _ = _cohort_rows(sim, pop, st.key)
    states = sim.client_states(st.key, ids)
    per_model = []
    for j, i in enumerate(ids):
        g = member[i]
        w = jax.tree.map(lambda a: np.asarray(a[j], np.float64), states[g].params)
        h = public[idx]
        for q in sorted(w["hidden"]):  # the MLP by hand in numpy
            layer = w["hidden"][q]
            h = np.maximum(h @ layer["kernel"] + layer["bias"], 0)
        per_model.append(h @ w["head"]["kernel"] + w["head"]["bias"])
    np.testing.assert_allclose(np.asarray(st.server.consensus), np.mean(per_model, axis=0), atol=1e-4)


def test_feddf_across_architectures_averages_within_each_group(pop):
    """One full-batch SGD step per client on linear models: FedAvg per group by hand in numpy."""
    from fedkd_jax.hetero.feddf import feddf_hetero

    models = [_mlp(()), _mlp(())]
    member = assign_groups(12, [0.5, 0.5], seed=0)
    proxy = np.asarray(pop.global_x[:30], np.float32)
    alg = feddf_hetero(models, optax.sgd(0.1), optax.sgd(1.0), proxy, batch_size=1000, distill_lr=0.0,
                       distill_steps=2, val_fraction=0.0)
    sim = fk.Simulator(alg, pop, cohort_size=6, mesh=fk.client_mesh(2), groups=member)
    st0 = sim.put_state(sim.init(0))
    st, m = sim.run(st0, sim.put_data(), 1)
    ids, rows = _cohort_rows(sim, pop, st.key)
    for g in range(2):
        w0 = np.asarray(st0.server.params[g]["head"]["kernel"], np.float64)
        b0 = np.asarray(st0.server.params[g]["head"]["bias"], np.float64)
        num_w, num_b, total = 0.0, 0.0, 0
        for i, r in zip(ids, rows):
            if member[i] != g:
                continue
            x, y = pop.x[r].astype(np.float64), pop.y[r]
            z = x @ w0 + b0
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(y)), y] -= 1.0  # d mean CE / d logits, times n
            num_w = num_w + len(y) * (-0.1 * x.T @ p / len(y))
            num_b = num_b + len(y) * (-0.1 * p.mean(0))
            total += len(y)
        np.testing.assert_allclose(np.asarray(st.server.params[g]["head"]["kernel"]), w0 + num_w / total, atol=2e-5)
        np.testing.assert_allclose(np.asarray(st.server.params[g]["head"]["bias"]), b0 + num_b / total, atol=2e-5)


def _numpy_mlp_step(w1, b1, w2, b2, x, y, lr):
    """One full-batch SGD step of mean cross-entropy on a one-hidden-layer ReLU MLP, by hand."""
    h = np.maximum(x @ w1 + b1, 0)
    z = h @ w2 + b2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    dz = p / len(y)
    dh = (dz @ w2.T) * (h > 0)
    return -lr * (x.T @ dh), -lr * dh.sum(0), -lr * (h.T @ dz), -lr * dz.sum(0)


@pytest.mark.parametrize("rule", ["heterofl", "fedrolex"])
def test_width_sliced_rounds_equal_a_numpy_masked_average(pop, rule):
    """Widths 1 and 1/2 of an MLP 64-8-10, one full-batch step per client, two rounds: the global
    model by hand (sub-model indices written out, count-weighted per coordinate)."""
    from fedkd_jax.hetero.heterofl import width_sliced

    member = assign_groups(12, [0.5, 0.5], seed=0)
    alg = width_sliced("mlp", [1.0, 0.5], optax.sgd(0.1), optax.sgd(1.0), rule=rule, batch_size=1000,
                       num_features=64, num_classes=10, hidden=(8,))
    sim = fk.Simulator(alg, pop, cohort_size=6, mesh=fk.client_mesh(2), groups=member)
    st = sim.put_state(sim.init(0))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(st.server.params))
    w1, b1, w2, b2 = p["hidden"][0]["kernel"], p["hidden"][0]["bias"], p["head"]["kernel"], p["head"]["bias"]
    for r in range(2):
        ids = sim.plan(st.key, r, 1).ids[0]
        ids = ids[ids < 12]
        sums = [np.zeros_like(w1), np.zeros_like(b1), np.zeros_like(w2), np.zeros_like(b2)]
        cnts = [np.zeros_like(w1), np.zeros_like(b1), np.zeros_like(w2), np.zeros_like(b2)]
        for i in ids:
            rows = pop.client_rows(int(i))
            x, y, n = pop.x[rows].astype(np.float64), pop.y[rows], len(rows)
            k = 8 if member[i] == 0 else 4
            idx = np.arange(k) if (rule == "heterofl" or k == 8) else (r + np.arange(k)) % 8
            d = _numpy_mlp_step(w1[:, idx], b1[idx], w2[idx], b2, x, y, 0.1)
            for s_, c_, sl, dv in zip(sums, cnts, [np.s_[:, idx], np.s_[idx], np.s_[idx], np.s_[:]], d):
                s_[sl] += n * dv
                c_[sl] += n
        w1, b1, w2, b2 = [v + np.where(c > 0, s_ / np.maximum(c, 1), 0) for v, s_, c in
                          zip((w1, b1, w2, b2), sums, cnts)]
        st, _ = sim.run(st, sim.put_data(), 1)
        got = jax.device_get(st.server.params)
        for want, have in zip((w1, b1, w2, b2), (got["hidden"][0]["kernel"], got["hidden"][0]["bias"],
                                                 got["head"]["kernel"], got["head"]["bias"])):
            np.testing.assert_allclose(have, want, atol=2e-5, err_msg=f"round {r}")


def test_every_width_one_is_fedavg(pop):
    from fedkd_jax.hetero.heterofl import width_sliced

    model = _mlp((8,))
    avg = fk.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), batch_size=5)
    het = width_sliced("mlp", [1.0], optax.sgd(0.1), optax.sgd(1.0), rule="heterofl", batch_size=5,
                       num_features=64, num_classes=10, hidden=(8,))
    a, b = _run(avg, pop, None), _run(het, pop, np.zeros(12, np.int32))
    for x, y in zip(jax.tree.leaves(a[0].server.params), jax.tree.leaves(b[0].server.params)):
        # the same arithmetic up to XLA's fusion of the masked division (float32 rounding)
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b[2]["train_loss"], a[2]["train_loss"], rtol=1e-5)


def test_fedproto_needs_a_shared_prototype_width():
    with pytest.raises(ConfigError, match="model.proto_dim"):
        fedproto([_mlp((8,)), _mlp((16,))], optax.sgd(0.1), num_classes=10, batch_size=5)


# ------------------------------------------------------------ config errors
GROUPS = "model.groups=[{kind: mlp, hidden: [8], share: 0.5}, {kind: cnn, hidden: [16], channels: [4], share: 0.5}]"


@pytest.mark.parametrize("sets, field", [
    (["algorithm=fd", "model.groups=[{kind: mlp, share: 0.5}, {kind: mlp, share: 0.4}]"], "model.groups"),
    (["algorithm=fd", "model.groups=[{kind: lenet, share: 1.0}]"], "model.groups[0].kind"),
    (["algorithm=fd", "model.groups=[{kind: femnist_cnn, width: 0, share: 1.0}]"], "model.groups[0].width"),
    (["algorithm=fd", "model.groups=[{kind: mlp, share: 0.5, clients: [1]}, {kind: mlp, share: 0.5}]"],
     "model.groups[0]"),
    (["algorithm=fedavg", GROUPS], "model.groups"),
    (["algorithm=fedrolex", "model.groups=[{width: 0.5, share: 1.0}]", "privacy.noise_multiplier=1.0", "privacy.clip_norm=1.0"], "privacy"),
    (["algorithm=fd", GROUPS, "compression.downlink=topk"], "compression.downlink"),
    (["algorithm=feddf", "data.proxy_fraction=0.1", GROUPS, "compression.method=quant8"], "compression.method"),

    (["algorithm=heterofl", "model.groups=[{width: 1.5, share: 1.0}]"], "model.groups[0].width"),
    (["algorithm=fedrolex", GROUPS], "model.groups[0]"),
    (["algorithm=heterofl", "model.groups=[{width: 0.5, share: 1.0}]", "secagg.enabled=true"], "secagg.enabled"),
    (["algorithm=fedmd", "data.proxy_fraction=0", GROUPS], "data.proxy_fraction"),
])
def test_bad_group_configs_fail_before_anything_runs(sets, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, sets)
    assert e.value.field == field


def test_a_cohort_smaller_than_the_groups_is_refused(pop):
    alg = fd([_mlp((8,))] * 3, optax.sgd(0.1), num_classes=10, batch_size=5)
    with pytest.raises(ConfigError, match="run.cohort_size"):
        fk.Simulator(alg, pop, cohort_size=2, groups=np.arange(12) % 3)


# ----------------------------------------------------- run, resume, sweep
RUN = ["algorithm=fd", "data.num_clients=12", "run.cohort_size=6", "run.rounds=10", "run.eval_every=3",
       "run.checkpoint_every=2", "run.rounds_per_dispatch=1", "run.progress=false",
       "model.groups=[{kind: mlp, hidden: [8], share: 0.5}, {kind: mlp, hidden: [16, 16], share: 0.25},"
       " {kind: mlp, hidden: [12], share: 0.25}]"]


def _cmd(*args):
    return [sys.executable, "-m", "fedkd_jax.cli", *args, *[x for s in RUN for x in ("--set", s)], "--no-progress"]


def _rows(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(os.path.join(out, "metrics.jsonl"))]


def test_heterogeneous_run_resumes_exactly_after_kill_9(tmp_path):
    env = dict(os.environ, FEDKD_CPU_DEVICES="2")
    ref = str(tmp_path / "ref")
    p = subprocess.run(_cmd("run", "--out", ref), env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "per group: g0 test" in p.stdout
    rows = _rows(ref)
    assert len(rows) == 10 and {"g0_test_accuracy", "g2_local_acc_mean", "group_acc_spread"} <= set(rows[-1])
    out = str(tmp_path / "killed")
    proc = subprocess.Popen(_cmd("run", "--out", out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target, t0 = random.Random(7).randint(3, 8), time.time()
    path = os.path.join(out, "metrics.jsonl")
    while proc.poll() is None and time.time() - t0 < 120:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= target:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    p = subprocess.run([sys.executable, "-m", "fedkd_jax.cli", "resume", out, "--no-progress"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert _rows(out) == rows


def test_heterogeneous_sweep_runs_equal_their_single_runs(tmp_path):
    sets = [s for s in RUN if not s.startswith(("run.rounds=", "model.groups="))] + [
        "run.rounds=4", "model.groups=[{kind: mlp, hidden: [8], share: 0.5}, {kind: mlp, hidden: [16], share: 0.5}]"]
    swept = fk.sweep(load_config(None, sets), {"client.lr": [0.05, 0.1]}, seeds=1, out=str(tmp_path / "sweep"))
    single = fk.run(load_config(None, sets + ["client.lr=0.1"]), out=str(tmp_path / "single"))
    got = [r for r in swept.rows if r["client.lr"] == 0.1][-1]
    other = [r for r in swept.rows if r["client.lr"] == 0.05][-1]
    assert got["train_loss"] != other["train_loss"]  # the two runs did differ
    for k in ("train_loss", "test_accuracy", "g0_test_accuracy", "g1_local_acc_mean", "g1_cum_bytes_up"):
        np.testing.assert_allclose(got[k], single.rows[-1][k], rtol=1e-5, atol=1e-5, err_msg=k)
