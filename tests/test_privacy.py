"""Privacy inside the round: DP clip and noise, accounting, secure aggregation, HE."""

import math
import os

import dp_accounting as dpa
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedkd_jax as fk
from fedkd_jax.aggregation import ClientIn, ServerIn, chain, mean
from fedkd_jax.config import load_config
from fedkd_jax.errors import ConfigError
from fedkd_jax.privacy import gaussian, secure_aggregation
from fedkd_jax.runner import read_jsonl, run_experiment

STUDENT = dict(num_features=64, num_classes=10, hidden=(16,))


def _cin(state, key=0, weight=1.0, position=0, ids=None, round_key=None):
    ids = jnp.arange(4) if ids is None else ids
    return ClientIn(jax.random.key(key), jnp.int32(0), state, jnp.float32(weight), jnp.float32(weight),
                    jnp.int32(position), ids, (), jnp.int32(position), round_key)


# ------------------------------------------------------------------- clipping
@settings(max_examples=40, deadline=None, derandomize=True)  # the same examples on every run
# no subnormals: XLA:CPU flushes them to zero, so a "tiny payload passes untouched" check would fail on 1e-45
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=32), min_size=1, max_size=30),
       st.floats(1e-3, 1e3), st.integers(0, 3))
def test_every_clipped_payload_has_norm_at_most_s(values, s, split):
    t = gaussian(1.0, s, expected_clients=10)
    v = jnp.asarray(values, jnp.float32)
    payload = {"update": {"a": v[:split], "b": v[split:]}, "aux": v[:1] * 3}
    out, co = t.encode(payload, _cin(t.init(None)))
    norm = math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(out)))
    assert norm <= s * (1 + 1e-5) + 1e-6
    original = math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(payload)))
    if original <= s:  # small payloads pass untouched
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(payload)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the centred bit b - 1/2 (sensitivity 1/2 under add-or-remove-one)
    unclipped = float(co.stats["dp_unclipped"]) + 0.5
    assert unclipped == float(original <= s * (1 + 1e-6)) or abs(original - s) < 1e-3 * s


def test_noise_std_is_z_times_s_over_the_expected_cohort():
    z, s, c = 0.7, 2.0, 8.0
    dp = gaussian(z, s, expected_clients=c)
    avg = mean("uniform", denominator="expected", expected=c)
    total = {"update": {"w": jnp.zeros((20_000,))}, "aux": ()}

    def server(key):
        sin = ServerIn(key, jnp.int32(0), dp.init(None), jnp.float32(c), jnp.float32(c), jnp.float32(c),
                       {"dp_unclipped": jnp.float32(c), "dp_norm": jnp.float32(1.0)}, jnp.arange(8), jnp.ones(8, bool))
        noisy, _, _ = dp.finalize(total, sin)
        out, _, _ = avg.finalize(noisy, sin._replace(state=avg.init(None)))
        return out["update"]["w"]

    sample = np.asarray(server(jax.random.key(3)))
    np.testing.assert_allclose(sample.std(), z * s / c, rtol=0.02)
    assert abs(sample.mean()) < 4 * z * s / c / math.sqrt(len(sample))


def test_dp_with_zero_noise_and_infinite_clip_equals_plain_fedavg_exactly(digits20):
    model = fk.make_model("mlp", **STUDENT)
    alg = fk.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), batch_size=8)
    plain = fk.Simulator(alg, digits20, cohort_size=6, mesh=fk.client_mesh(2), weighting="uniform")
    private = fk.Simulator(alg, digits20, cohort_size=6, mesh=fk.client_mesh(2), aggregator=chain(
        mean("uniform", denominator="expected", expected=6.0), gaussian(0.0, math.inf, expected_clients=6.0)))
    a, _ = plain.run(plain.init(0), plain.put_data(), 3)
    b, m = private.run(private.init(0), private.put_data(), 3)
    for x, y in zip(jax.tree.leaves(a.server), jax.tree.leaves(b.server)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.isinf(np.asarray(m["dp_clip_norm"])).all()


def test_adaptive_clipping_moves_the_norm_toward_the_target_quantile(digits20):
    model = fk.make_model("mlp", **STUDENT)
    alg = fk.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), batch_size=8)
    agg = chain(mean("uniform", denominator="expected", expected=10.0),
                gaussian(0.5, 0.01, expected_clients=10.0, quantile=0.5, learning_rate=0.5, log_raw_norm=True))
    sim = fk.Simulator(alg, digits20, cohort_size=10, mesh=fk.client_mesh(2), aggregator=agg)
    _, m = sim.run(sim.init(0), sim.put_data(), 30)
    clip = np.asarray(m["dp_clip_norm"])
    norms = np.asarray(m["dp_mean_norm"])
    assert clip[0] == pytest.approx(0.01) and clip[-1] > 5 * clip[0]  # far below the norms: it rises
    # it ends near the clients' update norms: about half of them are clipped
    assert 0.3 * norms[-5:].mean() < clip[-1] < 3 * norms[-5:].mean()
    frac = np.asarray(m["dp_unclipped_fraction_noisy"])
    assert abs(frac[-10:].mean() - 0.5) < 0.3


# ----------------------------------------------------------------- accounting
def test_reported_epsilon_equals_dp_accounting_for_the_same_events(tmp_path):
    base = ["algorithm=fedavg", "data.num_clients=40", "run.cohort_size=5", "run.rounds=6", "run.eval_every=6",
            "run.devices=2", "privacy.noise_multiplier=1.1", "privacy.clip_norm=1.0", "privacy.delta=1e-5"]
    for sampling in ("fixed", "poisson"):
        out = tmp_path / sampling
        run_experiment(load_config(None, base + [f"privacy.sampling={sampling}"]), str(out))
        rows = read_jsonl(str(out / "metrics.jsonl"))
        for r in (1, 6):
            gauss = dpa.GaussianDpEvent(1.1)
            if sampling == "fixed":
                # replace-one: v -> -v moves the clipped sum by 2S; noise std 1.1 S: multiplier 0.55
                event = dpa.SampledWithoutReplacementDpEvent(40, 5, dpa.GaussianDpEvent(0.55))
                acct = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
            else:
                event = dpa.PoissonSampledDpEvent(5 / 40, gauss)
                acct = dpa.rdp.RdpAccountant()
            expect = acct.compose(dpa.SelfComposedDpEvent(event, r)).get_epsilon(1e-5)
            assert rows[r - 1]["epsilon"] == pytest.approx(expect, rel=1e-9)
    counts = [r["clients_contributing"] for r in rows]
    assert len(set(counts)) > 1  # Poisson cohorts vary in size


def test_target_epsilon_stops_at_the_last_round_within_budget_and_resume_keeps_the_accountant(tmp_path):
    cfg = load_config(None, ["algorithm=fedavg", "data.num_clients=40", "run.cohort_size=5", "run.rounds=40",
                             "run.eval_every=5", "run.checkpoint_every=5", "run.devices=2",
                             "privacy.noise_multiplier=1.5", "privacy.clip_norm=1.0", "privacy.delta=1e-5",
                             "privacy.target_epsilon=3.0"])
    out = str(tmp_path / "budget")
    res = run_experiment(cfg, out)

    def eps(r):  # DP's default sampling is Poisson (add-or-remove-one), computed with dp-accounting directly
        ev = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(5 / 40, dpa.GaussianDpEvent(1.5)), r)
        return dpa.rdp.RdpAccountant().compose(ev).get_epsilon(1e-5)

    assert eps(res.rounds) <= 3.0 < eps(res.rounds + 1)
    assert res.rounds < 40 and any("privacy budget" in n for n in res.notes)
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert rows[-1]["round"] == res.rounds and rows[-1]["epsilon"] <= 3.0
    # a resume from an earlier checkpoint recomputes the same epsilons
    import shutil

    last = max(int(d) for d in os.listdir(os.path.join(out, "checkpoints")) if d.isdigit())
    shutil.rmtree(os.path.join(out, "checkpoints", str(last)))
    again = run_experiment(cfg, out)
    assert again.resumed_from < res.rounds and again.rounds == res.rounds
    assert [r["epsilon"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))] == [r["epsilon"] for r in rows]


def test_calibrate_cli_reaches_the_target(capsys):
    from fedkd_jax.cli import main
    from fedkd_jax.privacy import Mechanism, epsilon

    assert main(["privacy", "calibrate", "--epsilon", "2", "--delta", "1e-5", "--rounds", "50", "--cohort", "100",
                 "--clients", "10000", "--sampling", "poisson"]) == 0
    z = float(capsys.readouterr().out.split()[1])
    eps = epsilon(Mechanism(z, 10000, 100, "poisson"), 50, 1e-5)
    assert eps <= 2.0 and eps > 1.95  # the smallest noise that reaches it
    assert main(["privacy", "calibrate", "--epsilon", "1e-4", "--delta", "1e-5", "--rounds", "50", "--cohort", "100",
                 "--clients", "100"]) == 2
    assert "privacy.target_epsilon" in capsys.readouterr().err


# ----------------------------------------------------------- secure aggregation
def _secagg_round(values, sent, bits=32, frac=16, n_clients=100):
    """Encode every cohort position, sum the senders modulo 2^bits, finalize."""
    t = secure_aggregation(bits=bits, frac_bits=frac, num_clients=n_clients)
    cp = values.shape[0]
    ids = jnp.arange(cp)
    rkey = jax.random.key(42)
    masked, plain = [], []
    for i in range(cp):
        payload = {"update": {"w": jnp.asarray(values[i])}, "aux": ()}
        out, _ = t.encode(payload, _cin((), key=i, position=i, ids=ids, round_key=rkey))
        masked.append(np.asarray(out["secagg"], np.uint64))
        u = np.asarray(jax.random.uniform(jax.random.key(i), (values.shape[1],)))
        plain.append(np.floor(values[i].astype(np.float32) * np.float32(2.0**frac) + u.astype(np.float32)).astype(np.int64))
    total = sum(m for m, s in zip(masked, sent) if s) % (2**bits)
    sin = ServerIn(rkey, jnp.int32(0), (), 0.0, 0.0, 0.0, {}, ids, jnp.asarray(sent), rkey)
    dec, _, metrics = t.finalize({"secagg": jnp.asarray(total.astype(np.uint32))}, sin)
    expect = sum(p for p, s in zip(plain, sent) if s) / 2.0**frac
    return np.asarray(dec["update"]["w"], np.float64), expect, masked, metrics


def test_secure_sum_equals_the_plaintext_fixed_point_sum_exactly_with_and_without_dropouts():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(6, 50)).astype(np.float32)
    for sent in ([True] * 6, [True, False, True, True, False, True]):
        got, expect, _, metrics = _secagg_round(values, sent)
        np.testing.assert_array_equal(got, expect.astype(np.float32))
        assert float(metrics["dropped"]) == sent.count(False)
    # a smaller ring: the same, modulo 2^16
    got, expect, _, _ = _secagg_round(values * 0.01, [True, True, False, True, True, True], bits=16, frac=8)
    np.testing.assert_array_equal(got, expect.astype(np.float32))


def test_a_single_masked_upload_looks_uniform():
    values = np.zeros((3, 40_000), np.float32)  # a constant payload: all structure comes from the masks
    _, _, masked, _ = _secagg_round(values, [True] * 3)
    top = (masked[1] >> 28).astype(np.int64)  # 16 bins on the top 4 bits
    counts = np.bincount(top, minlength=16)
    chi2 = float(((counts - len(top) / 16) ** 2 / (len(top) / 16)).sum())
    assert chi2 < 37.7  # the chi-square(15) 0.999 quantile
    assert len(np.unique(masked[1])) > 0.99 * len(masked[1])


def test_secure_aggregation_in_the_round_matches_the_plain_clipped_round(digits20):
    model = fk.make_model("mlp", **STUDENT)
    alg = fk.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), batch_size=8)
    clip = gaussian(0.0, 5.0, expected_clients=6.0)
    plain = fk.Simulator(alg, digits20, cohort_size=6, mesh=fk.client_mesh(2),
                         aggregator=chain(clip, mean("uniform")))
    secure = fk.Simulator(alg, digits20, cohort_size=6, mesh=fk.client_mesh(2), aggregator=chain(
        clip, mean("uniform"), secure_aggregation(bits=32, frac_bits=20, num_clients=digits20.num_clients)))
    a, _ = plain.run(plain.init(0), plain.put_data(), 2)
    b, m = secure.run(secure.init(0), secure.put_data(), 2)
    for x, y in zip(jax.tree.leaves(a.server.params), jax.tree.leaves(b.server.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)  # fixed-point rounding only
    d = sum(x.size for x in jax.tree.leaves(a.server.params))
    assert int(np.asarray(m["bytes_up_clients"])[0].max()) == 4 * d + 64 + 80 * 5


# ---------------------------------------------------------- bad settings
@pytest.mark.parametrize("overrides, field", [
    (["privacy.noise_multiplier=-1", "privacy.clip_norm=1"], "privacy.noise_multiplier"),
    (["privacy.noise_multiplier=1", "privacy.clip_norm=0"], "privacy.clip_norm"),
    (["privacy.noise_multiplier=1"], "privacy.clip_norm"),
    (["privacy.noise_multiplier=1", "privacy.clip_norm=1", "privacy.delta=1.5"], "privacy.delta"),
    (["privacy.noise_multiplier=1", "privacy.clip_norm=1", "privacy.delta=0"], "privacy.delta"),
    (["privacy.sampling=sometimes"], "privacy.sampling"),
    (["privacy.noise_multiplier=1", "privacy.clip_norm=1", "privacy.accountant=pld", "privacy.sampling=fixed"],
     "privacy.accountant"),
    (["secagg.enabled=true"], "secagg.enabled"),
    (["secagg.enabled=true", "privacy.clip_norm=1", "algorithm=feddf", "data.proxy_fraction=0.1"], "secagg.enabled"),
    (["secagg.enabled=true", "privacy.clip_norm=1", "secagg.bits=4"], "secagg.bits"),
])
def test_bad_privacy_settings_fail_before_compiling(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert e.value.field == field


def test_unreachable_target_and_a_ring_too_small_fail_before_compiling(tmp_path):
    cases = [
        (["privacy.target_epsilon=0.0001", "privacy.clip_norm=1"], "privacy.target_epsilon"),
        (["algorithm=fedavg", "secagg.enabled=true", "privacy.clip_norm=1000", "secagg.bits=16",
          "run.cohort_size=10"], "secagg.bits"),
    ]
    for overrides, field in cases:
        with pytest.raises(ConfigError) as e:
            run_experiment(load_config(None, overrides), str(tmp_path / "x"))
        assert e.value.field == field
        assert not (tmp_path / "x").exists()


# ------------------------------------------------------------- homomorphic
def test_homomorphic_aggregation_matches_plaintext_within_ckks_precision(digits20):
    from fedkd_jax.privacy import he

    if not he.available():
        pytest.skip("optional extra 'he' (TenSEAL) not installed")
    model = fk.make_model("mlp", **STUDENT)
    alg = fk.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), batch_size=8)
    sim = fk.Simulator(alg, digits20, cohort_size=4, mesh=fk.client_mesh(1))
    pool = sim.put_data()
    plain, _ = he.run_rounds(sim, sim.init(0), pool, 2)
    enc, log = he.run_rounds(sim, sim.init(0), pool, 2, ckks=he.CKKS())
    for x, y in zip(jax.tree.leaves(plain.server), jax.tree.leaves(enc.server)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    assert all(r.max_abs_error < 1e-4 and r.bytes_up_per_client > 0 for r in log)
