"""The algorithms behave as their papers say (issue: faithful algorithms).

Each expected value is computed independently: by a per-client loop, numpy's
SVD, or by counting.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedkd_jax as fk
from fedkd_jax.algorithms import feddf, fedkd, server_teacher_kd
from fedkd_jax.algorithms.base import ClientData
from fedkd_jax.engine import client_key, round_key, sample_cohort

STUDENT = dict(num_features=64, num_classes=10, hidden=(16,))
TEACHER = dict(num_features=64, num_classes=10, hidden=(32,))


@pytest.fixture(scope="module")
def fd(digits):
    return fk.federate(digits, partition="dirichlet", num_clients=16, seed=0, alpha=0.3, proxy_fraction=0.1)


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------------- empty rounds
def test_empty_round_leaves_server_bit_identical_and_reports_nan(fd):
    model = fk.make_model("mlp", **STUDENT)
    alg = fk.fedavg(model, optax.sgd(0.1), fk.algorithms.server_optimizer("fedadam"), batch_size=8)
    sim = fk.Simulator(alg, fd, cohort_size=6, mesh=fk.client_mesh(2), straggler_fraction=1.0)
    state = sim.put_state(sim.init(0))
    new, m = sim.step(state, sim.put_data(fd))
    assert _leaves_equal(state.server, new.server)  # params *and* Adam moments / step count
    assert int(new.round) == 1
    assert np.isnan(float(m["train_loss"])) and np.isnan(float(m["client_accuracy"]))
    assert int(m["clients_contributing"]) == 0
    assert int(np.sum(m["bytes_up_clients"])) == 0


def test_dropped_stragglers_upload_nothing_and_the_rest_count_exactly(fd):
    model = fk.make_model("mlp", **STUDENT)
    alg = fk.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), batch_size=8)
    sim = fk.Simulator(alg, fd, cohort_size=10, mesh=fk.client_mesh(1), straggler_fraction=0.3)
    _, m = sim.run(sim.init(0), sim.put_data(fd), 3)
    per_client = fk.engine.tree_bytes(model.init(jax.random.key(0)))
    for r in range(3):
        assert int(m["clients_contributing"][r]) == 7
        assert sorted(np.asarray(m["bytes_up_clients"][r]).tolist()) == [0] * 3 + [per_client] * 7


def test_run_log_of_empty_rounds_has_no_zero_loss(tmp_path):
    from fedkd_jax.config import load_config
    from fedkd_jax.runner import read_jsonl, run_experiment

    cfg = load_config(None, ["algorithm=fedavg", "data.num_clients=10", "run.cohort_size=4", "run.rounds=3",
                             "run.eval_every=3", "run.devices=1", "client.straggler_fraction=1.0"])
    out = tmp_path / "run"
    run_experiment(cfg, str(out), progress=False)
    rows = read_jsonl(str(out / "metrics.jsonl"))
    assert len(rows) == 3
    for r in rows:
        assert r["train_loss"] is None and r["clients_contributing"] == 0 and r["bytes_up"] == 0


# ------------------------------------------------------------------- FedDF
def test_feddf_target_is_the_uniform_mean_of_the_cohorts_logits(fd):
    model = fk.make_model("mlp", **STUDENT)
    base = feddf(model, optax.sgd(0.1), optax.sgd(1.0), fd.proxy_x, batch_size=8, distill_steps=5)
    alg = base._replace(server_update=lambda state, md, ml, key, sdata: (state, {"target": ml}))
    sim = fk.Simulator(alg, fd, cohort_size=6, mesh=fk.client_mesh(2))
    state = sim.init(0)
    _, m = sim.step(state, sim.put_data(fd))
    rkey = round_key(state.key, state.round)
    cohort = sample_cohort(state.key, 0, fd.num_clients, 6)
    params = state.server.params
    logits = []
    for c in cohort:  # the server's view of each upload, one client at a time
        rows = fd.row_table(np.array([c]))[0]
        cd = ClientData(jnp.asarray(fd.x[rows]), jnp.asarray(fd.y[rows]), jnp.asarray(fd.counts[c]), 0)
        out = alg.client_update(params, (), cd, client_key(rkey, int(c)))
        new = jax.tree.map(jnp.add, params, out.update)
        logits.append(np.asarray(model.apply(new, jnp.asarray(fd.proxy_x))[0], np.float64))
    uniform = np.mean(logits, axis=0)
    # uploads are logits relative to the global model's (so DP clips only what a client changed)
    target = np.asarray(m["server_target"]) + np.asarray(model.apply(params, jnp.asarray(fd.proxy_x))[0])
    np.testing.assert_allclose(target, uniform, atol=1e-4)
    weighted = np.average(logits, axis=0, weights=fd.counts[cohort])
    assert np.abs(weighted - uniform).max() > 1e-2  # the two weightings differ here


def test_feddf_batches_cover_the_proxy_without_replacement_each_pass():
    from fedkd_jax.algorithms.server_distill import pass_batches

    key = jax.random.key(0)
    n, b = 23, 5  # 5 batches per pass, the last holds 3 rows
    for q in range(3):
        rows = []
        for j in range(5):
            idx, mask = pass_batches(key, jnp.int32(q * 5 + j), n, b)
            rows += np.asarray(idx)[np.asarray(mask)].tolist()
        assert sorted(rows) == list(range(n)), q


def test_feddf_early_stopping_keeps_the_best_validated_model(fd):
    from fedkd_jax.algorithms.server_distill import distill_on_proxy

    model = fk.make_model("mlp", **STUDENT)
    p0 = model.init(jax.random.key(1))
    target = model.apply(model.init(jax.random.key(2)), jnp.asarray(fd.proxy_x))[0]
    opt = optax.adam(1e-2)
    calls = []

    # a validation score that gets worse after the start: the start must be kept
    def score(p):
        d = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p0)))
        return d

    params, _, m = distill_on_proxy(model.apply, p0, opt.init(p0), opt, jnp.asarray(fd.proxy_x), target,
                                    jax.random.key(3), steps=200, batch_size=16, temperature=1.0,
                                    val_score=score, val_every=10, patience=3)
    del calls
    assert _leaves_equal(params, p0)
    assert float(m["distill_steps"]) == 30.0  # 3 checks without improvement, then stop


# -------------------------------------------------------------------- FedKD
def test_fedkd_downlink_bytes_equal_the_compressed_factors(fd):
    s = fk.make_model("mlp", **STUDENT)
    t = fk.make_model("mlp", **TEACHER)
    alg = fedkd(s, t, optax.sgd(0.1), optax.sgd(0.1), optax.sgd(1.0), batch_size=8)
    thr = 0.7
    down = fk.compression.make_compressor("svd", rounds=10, energy_start=thr, energy_end=thr)
    plain = fk.Simulator(alg, fd, cohort_size=5, mesh=fk.client_mesh(1))
    comp = fk.Simulator(alg, fd, cohort_size=5, mesh=fk.client_mesh(1), downlink=down)
    state = plain.init(0)
    data = plain.put_data(fd)
    exact, _ = plain.step(state, data)
    sent, m = comp.step(state, data)
    expect_bytes = 0
    for old, new, got in zip(jax.tree.leaves(state.server.params), jax.tree.leaves(exact.server.params),
                             jax.tree.leaves(sent.server.params)):
        delta = np.asarray(new, np.float64) - np.asarray(old, np.float64)
        if delta.ndim == 2:
            u, sv, vt = np.linalg.svd(delta, full_matrices=False)
            energy = np.cumsum(sv**2) / np.sum(sv**2)
            k = int(np.argmax(energy >= thr * (1 - 1e-6))) + 1
            m_, n_ = delta.shape
            if k * (m_ + n_ + 1) < m_ * n_ and k < len(sv):
                expect_bytes += 4 * k * (m_ + n_ + 1)
                recon = (u[:, :k] * sv[:k]) @ vt[:k]
            else:
                expect_bytes += 4 * m_ * n_
                recon = delta
        else:
            expect_bytes += 4 * delta.size
            recon = delta
        np.testing.assert_allclose(np.asarray(got) - np.asarray(old), recon, atol=1e-5)
    assert int(m["bytes_down_client"]) == expect_bytes
    assert expect_bytes < fk.engine.tree_bytes(state.server.params)  # something was compressed


def test_downlink_ledger_charges_missed_deltas_or_the_whole_model():
    from fedkd_jax.runner.downlink import DownlinkLedger

    led = DownlinkLedger(4, model_bytes=100)
    deltas = [30, 50, 60, 10, 40]
    cohorts = [[0, 1], [1, 2], [0, 3], [1, 2], [0, 1]]
    # by hand: a client pays 100 when it holds nothing, else the deltas since the round
    # whose model it holds, capped at 100
    # r0: 0 new, 1 new                          -> 100 + 100
    # r1: 1 holds r0 (missed D0 = 30), 2 new    -> 30 + 100
    # r2: 0 holds r0 (D0 + D1 = 80), 3 new      -> 80 + 100
    # r3: 1, 2 hold r1 (D1 + D2 = 110 -> 100)   -> 100 + 100
    # r4: 0 holds r2 (D2 + D3 = 70), 1 holds r3 (D3 = 10) -> 70 + 10
    expect = [200, 130, 180, 200, 80]
    assert [led.charge(t, np.array(c), d) for t, (c, d) in enumerate(zip(cohorts, deltas))] == expect
    # every client in every round: the whole model once, then the previous round's delta
    full = DownlinkLedger(3, model_bytes=100)
    got = [full.charge(t, np.arange(3), d) for t, d in enumerate(deltas)]
    assert got == [300] + [3 * d for d in deltas[:-1]]
    # a resumed run replays its logged rows and continues exactly
    from types import SimpleNamespace

    from fedkd_jax.runner.downlink import RunDownlink

    sim = SimpleNamespace(num_clients=5, cohort_size=2, sampling="fixed", bytes_down_per_client=100)
    whole = RunDownlink(sim, (1, 2))
    rows = [{"round": t + 1, "bytes_down_delta": d, "bytes_down": whole.charge(t, d)[0]} for t, d in enumerate(deltas)]
    resumed = RunDownlink(sim, (1, 2))
    resumed.replay(rows[:3])
    assert [resumed.charge(t, deltas[t])[0] for t in (3, 4)] == [rows[3]["bytes_down"], rows[4]["bytes_down"]]


def test_run_log_charges_each_sampled_client_what_it_needs(tmp_path):
    from fedkd_jax.config import load_config
    from fedkd_jax.runner import read_jsonl, run_experiment

    n, c = 6, 2
    cfg = load_config(None, ["algorithm=fedavg", f"data.num_clients={n}", f"run.cohort_size={c}", "run.rounds=6",
                             "run.eval_every=6", "run.devices=1", "model.hidden=[8]", "compression.downlink=svd",
                             "compression.energy_start=0.5", "compression.energy_end=0.5"])
    out = tmp_path / "run"
    res = run_experiment(cfg, str(out), progress=False)
    rows = read_jsonl(str(out / "metrics.jsonl"))
    model_bytes = 4 * (64 * 8 + 8 + 8 * 10 + 10)  # the 64-8-10 MLP, float32, counted by hand
    held, got_deltas = {}, []  # an independent replay: client -> deltas it is missing (absent: holds nothing)
    for r in rows:
        t = r["round"] - 1
        cohort = sample_cohort(res.state.key, t, n, c)
        need = sum(model_bytes if held.get(int(k)) is None else min(model_bytes, sum(held[int(k)]))
                   for k in cohort)
        assert r["bytes_down"] == need, t
        assert r["bytes_down_per_round"] == c * r["bytes_down_delta"]
        for k in cohort:  # they now hold this round's model ...
            held[int(k)] = []
        for k in held:  # ... and everyone holding a model misses this round's delta
            held[k].append(r["bytes_down_delta"])
        got_deltas.append(r["bytes_down_delta"])
    assert 0 < min(got_deltas) and max(got_deltas) < model_bytes  # compressed
    assert rows[-1]["cum_bytes_down"] == sum(r["bytes_down"] for r in rows)
    assert rows[-1]["cum_bytes_down_per_round"] == c * sum(got_deltas)
    assert res.final["cum_bytes_down_per_round"] == rows[-1]["cum_bytes_down_per_round"]


# ------------------------------------------------------- server-teacher KD
def test_server_teacher_is_not_a_target_before_warmup(fd):
    s = fk.make_model("mlp", **STUDENT)
    t = fk.make_model("mlp", **TEACHER)
    alg = server_teacher_kd(s, t, optax.sgd(0.1), optax.sgd(1.0), fd.proxy_x, alpha=0.5, temperature=2.0,
                            batch_size=8, distill_steps=5, warmup="rounds", warmup_rounds=2)
    sim = fk.Simulator(alg, fd, cohort_size=4, mesh=fk.client_mesh(1))
    _, m = sim.run(sim.init(0), sim.put_data(fd), 3)
    loss, ce = np.asarray(m["train_loss"]), np.asarray(m["client_ce"])
    np.testing.assert_allclose(loss[:2], ce[:2], rtol=1e-6)  # alpha = 1 while warming up
    assert abs(loss[2] - ce[2]) > 1e-3  # the KD term joins once the teacher had 2 updates


def test_server_teacher_labeled_warmup_trains_the_teacher_before_round_zero(fd):
    s = fk.make_model("mlp", **STUDENT)
    t = fk.make_model("mlp", **TEACHER)
    alg = server_teacher_kd(s, t, optax.sgd(0.1), optax.sgd(1.0), fd.proxy_x, alpha=0.5, temperature=2.0,
                            batch_size=8, distill_steps=5, warmup="labeled", warmup_steps=150,
                            proxy_y=fd.proxy_y)
    state = jax.jit(alg.init)(jax.random.key(0))
    sim = fk.Simulator(alg, fd, cohort_size=4, mesh=fk.client_mesh(1))
    ev = fk.engine.make_evaluator(t.apply)(state.teacher, sim.eval_data())
    assert float(ev["test_accuracy"]) > 0.6  # a random teacher scores about 0.1
    assert bool(alg.broadcast(state)[2])  # usable as a target from round 0


# ---------------------------------------------------------------- defaults
def _reddi_algorithm2(x0, deltas, variant, *, lr, b1, b2, tau):
    """Reddi et al. 2021, Algorithm 2, transcribed in float64 numpy (server side only)."""
    x = np.asarray(x0, np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)  # v_{-1} = tau^2, m_{-1} = 0
    for d in deltas:
        d = np.asarray(d, np.float64)
        m = b1 * m + (1 - b1) * d
        if variant == "adam":
            v = b2 * v + (1 - b2) * d**2
        else:  # yogi
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        x = x + lr * m / (np.sqrt(v) + tau)  # no bias correction
    return x


@pytest.mark.parametrize("name,variant", [("fedadam", "adam"), ("fedyogi", "yogi")])
def test_fedadam_fedyogi_default_to_reddi_algorithm_2(name, variant):
    from fedkd_jax.algorithms import server_optimizer

    rng = np.random.default_rng(0)
    x0 = {"b": rng.normal(size=3).astype(np.float32), "w": rng.normal(size=(4, 5)).astype(np.float32)}
    # deltas both well below and well above tau, and a sign change of v - delta^2 for Yogi
    scales = (3e-4, 0.5, 2e-3, 0.05)
    deltas = [{k: (s * rng.normal(size=v.shape)).astype(np.float32) for k, v in x0.items()} for s in scales]
    hp = dict(lr=0.03, b1=0.9, b2=0.99, tau=1e-3)
    opt = server_optimizer(name, **hp)  # form="reddi" is the default
    params = jax.tree.map(jnp.asarray, x0)
    state = opt.init(params)
    for d in deltas:
        upd, state = jax.jit(opt.update)(jax.tree.map(lambda a: -jnp.asarray(a), d), state, params)
        params = optax.apply_updates(params, upd)
    for k in x0:
        expect = _reddi_algorithm2(x0[k], [d[k] for d in deltas], variant, **hp)
        np.testing.assert_allclose(np.asarray(params[k]), expect, rtol=2e-6, atol=1e-7)
    # optax's form (bias-corrected) differs measurably after these steps
    opt2 = server_optimizer(name, form="optax", **hp)
    p2, st2 = jax.tree.map(jnp.asarray, x0), opt2.init(jax.tree.map(jnp.asarray, x0))
    for d in deltas:
        upd, st2 = opt2.update(jax.tree.map(lambda a: -jnp.asarray(a), d), st2, p2)
        p2 = optax.apply_updates(p2, upd)
    assert np.abs(np.asarray(p2["w"]) - np.asarray(params["w"])).max() > 1e-3


def test_server_optimizer_defaults_follow_reddi_and_explicit_values_win():
    from fedkd_jax.algorithms import SERVER_DEFAULTS, ReddiState, server_optimizer
    from fedkd_jax.builders import build_algorithm, build_data, build_model
    from fedkd_jax.config import load_config, resolve_defaults

    params = {"w": jnp.ones(3)}
    g = {"w": jnp.array([0.5, -2.0, 0.0])}

    def first_update(opt):
        return np.asarray(opt.update(g, opt.init(params), params)[0]["w"])

    # the optax form stays reachable by name
    np.testing.assert_allclose(first_update(server_optimizer("fedadam", form="optax")),
                               first_update(optax.adam(1e-2, b1=0.9, b2=0.99, eps=1e-3)), rtol=1e-6)
    np.testing.assert_allclose(first_update(server_optimizer("fedyogi", lr=0.3, form="optax")),
                               first_update(optax.yogi(0.3, b1=0.9, b2=0.99, eps=1e-3)), rtol=1e-6)
    assert SERVER_DEFAULTS["fedavgm"]["momentum"] == 0.9
    cfg = resolve_defaults(load_config(None, ["server.optimizer=fedadam"]))
    assert (cfg.server.lr, cfg.server.tau, cfg.server.b2, cfg.server.adaptive_form) == (1e-2, 1e-3, 0.99, "reddi")
    cfg = resolve_defaults(load_config(None, ["server.optimizer=fedadam", "server.lr=0.05"]))
    assert cfg.server.lr == 0.05
    # the config's form reaches the built algorithm's server state
    small = ["algorithm=fedavg", "server.optimizer=fedyogi", "data.num_clients=4", "run.cohort_size=2",
             "model.hidden=[4]"]
    for form in ("reddi", "optax"):
        c = load_config(None, small + [f"server.adaptive_form={form}"])
        data = build_data(c)
        st = build_algorithm(c, build_model(c, data), data).init(jax.random.key(0))
        assert isinstance(st.opt_state, ReddiState) == (form == "reddi")
    with pytest.raises(fk.errors.ConfigError) as e:
        load_config(None, ["server.adaptive_form=paper"])
    assert e.value.field == "server.adaptive_form"


def test_runs_saved_before_adaptive_form_resume_with_optax(tmp_path):
    import json

    from fedkd_jax.config import load_config, to_dict
    from fedkd_jax.runner.resume import saved_config

    d = to_dict(load_config(None, ["server.optimizer=fedadam"]))
    del d["server"]["adaptive_form"]  # a config.json written before the key existed
    d["data"]["min_examples"] = 2  # then every partition's default
    (tmp_path / "config.json").write_text(json.dumps(d))
    for old in (saved_config(str(tmp_path)), load_config(None, [], base=str(tmp_path / "config.json"))):
        assert old.server.adaptive_form == "optax" and old.data.min_examples is None
    assert load_config(None, []).server.adaptive_form == "reddi"
    d["server"]["adaptive_form"] = "reddi"  # a config saved today keeps an explicit 2
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert saved_config(str(tmp_path)).data.min_examples == 2


# -------------------------------------------------------------- partitions
def test_dirichlet_client_gives_equal_sizes_and_skewed_classes(digits):
    rng = np.random.default_rng(0)
    y = digits.y
    parts = fk.data.dirichlet_client(y, 20, 0.1, rng)
    size = len(y) // 20
    assert all(len(p) == size for p in parts)
    allrows = np.concatenate(parts)
    assert len(np.unique(allrows)) == len(allrows)  # without replacement
    top_share = np.mean([np.bincount(y[p], minlength=10).max() / size for p in parts])
    assert top_share > 0.6  # alpha = 0.1: clients hold few classes
    iidish = fk.data.dirichlet_client(y, 20, 1000.0, np.random.default_rng(0))
    assert np.mean([np.bincount(y[p], minlength=10).max() / size for p in iidish]) < 0.25


def _niid_bench_labeldir(y, n_parties, beta, rng, min_require_size=10):
    """Xtra-Computing/NIID-Bench utils.py, partition 'noniid-labeldir', transcribed
    (np.random replaced by the generator ``rng``)."""
    min_size, N = 0, y.shape[0]
    while min_size < min_require_size:
        idx_batch = [[] for _ in range(n_parties)]
        for k in np.unique(y):
            idx_k = np.where(y == k)[0]
            rng.shuffle(idx_k)
            proportions = rng.dirichlet(np.repeat(beta, n_parties))
            proportions = np.array([p * (len(idx_j) < N / n_parties) for p, idx_j in zip(proportions, idx_batch)])
            proportions = proportions / proportions.sum()
            proportions = (np.cumsum(proportions) * len(idx_k)).astype(int)[:-1]
            idx_batch = [idx_j + idx.tolist() for idx_j, idx in zip(idx_batch, np.split(idx_k, proportions))]
            min_size = min([len(idx_j) for idx_j in idx_batch])
    return idx_batch


def test_dirichlet_balanced_is_niid_benchs_partition(digits):
    y = digits.y
    for n, alpha, seed in ((10, 0.5, 0), (20, 0.1, 1), (30, 0.3, 2)):
        got = fk.data.dirichlet_balanced(y, n, alpha, np.random.default_rng(seed))
        ref = _niid_bench_labeldir(y, n, alpha, np.random.default_rng(seed))
        assert [sorted(p.tolist()) for p in got] == [sorted(r) for r in ref], (n, alpha)
        assert got.sizes.min() >= 10
    # the balancing step changes the split: the plain per-class draw leaves larger extremes
    plain = fk.data.dirichlet(y, 20, 0.1, np.random.default_rng(1), min_examples=10)
    bal = fk.data.dirichlet_balanced(y, 20, 0.1, np.random.default_rng(1))
    assert bal.sizes.max() < plain.sizes.max()
    assert fk.data.default_min_examples("dirichlet_balanced") == 10
    assert fk.data.default_min_examples("dirichlet") == fk.data.default_min_examples("quantity") == 2
    # unset min_examples: the partition's default reaches the split
    fd = fk.federate(digits, partition="dirichlet_balanced", num_clients=20, seed=0, alpha=0.5, test_fraction=0.0)
    assert fd.counts.min() >= 10
    with pytest.raises(fk.errors.DataError) as e:  # NIID-Bench's minimum is out of reach here
        fk.federate(digits, partition="dirichlet_balanced", num_clients=140, seed=0, alpha=0.5)
    assert e.value.field == "data.min_examples"


def test_local_steps_mode_reshuffles_every_pass():
    from fedkd_jax.algorithms import batch_schedule

    count, b = 6, 3  # two steps per pass
    idx, mask = batch_schedule(jax.random.key(0), jnp.int32(count), 8, b, steps=12)
    idx = np.asarray(idx)
    assert mask.all()
    passes = idx.reshape(6, count)  # 6 passes of the 6 real rows
    for p in passes:
        assert sorted(p.tolist()) == list(range(count))  # each pass visits every real row once
    assert len({tuple(p) for p in passes}) > 1  # and the order changes between passes
    # a batch larger than the client spans several passes, each still a permutation
    idx, _ = batch_schedule(jax.random.key(1), jnp.int32(2), 8, 5, steps=2)
    flat = np.asarray(idx).reshape(-1)
    for q in range(5):
        assert sorted(flat[2 * q:2 * q + 2].tolist()) == [0, 1]


# ------------------------------------------------------------------- proxy
def test_out_of_domain_proxy_is_resized_to_the_task(digits):
    px = fk.data.load_proxy("mnist5k", num_features=64, image_shape=(8, 8, 1), size=50, seed=0)
    assert px.shape == (50, 64) and px.dtype == np.float32
    assert 0.0 <= px.min() and px.max() <= 1.0 + 1e-5 and px.std() > 0.05
    noise = fk.data.load_proxy("noise", num_features=64, image_shape=None, size=10, seed=0)
    assert noise.shape == (10, 64)
