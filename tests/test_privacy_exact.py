"""The reported privacy guarantee is the real one: sensitivities, adaptive clipping,
secure aggregation's ring and threshold, the noise source, and the checks before compiling.

Expected values come from hand computations (the analytic Gaussian mechanism of
Balle & Wang 2018 with scipy, numpy sums), never from the engine's own helpers.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import norm

import fedkd_jax as fk
from fedkd_jax.aggregation import ClientIn, ServerIn, chain, mean
from fedkd_jax.config import load_config
from fedkd_jax.errors import ConfigError
from fedkd_jax.privacy import Mechanism, epsilon, gaussian, secure_aggregation

STUDENT = dict(num_features=64, num_classes=10, hidden=(8,))


def exact_delta(eps: float, mu: float) -> float:
    """The Gaussian mechanism's exact delta at ``eps`` for sensitivity / noise std = ``mu``
    (Balle & Wang 2018, Thm. 8)."""
    return norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu)


@pytest.mark.parametrize("z", [1.0, 2.0, 4.0])
def test_reported_epsilon_holds_for_the_true_sensitivity_of_each_sampling(z):
    """With the whole population in the cohort there is no amplification: one round is a plain
    Gaussian mechanism. Replace-one moves the clipped sum by up to 2S (v -> -v), add-or-remove by
    S; the noise std is z*S. The reported epsilon must satisfy the exact delta for that shift."""
    delta = 1e-5
    fixed = epsilon(Mechanism(z, 10, 10, "fixed"), 1, delta)
    assert exact_delta(fixed, 2.0 / z) <= delta
    poisson = epsilon(Mechanism(z, 10, 10, "poisson"), 1, delta)
    assert exact_delta(poisson, 1.0 / z) <= delta
    # the old accounting (multiplier z under replace-one) reported the add-or-remove figure,
    # which the replace-one mechanism violates
    assert exact_delta(poisson, 2.0 / z) > 10 * delta
    assert fixed > 1.5 * poisson


def test_the_issues_example_replace_one_epsilon():
    import dp_accounting as dpa

    got = epsilon(Mechanism(1.0, 50, 10, "fixed"), 30, 1e-5)
    acct = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    event = dpa.SampledWithoutReplacementDpEvent(50, 10, dpa.GaussianDpEvent(0.5))
    assert got == pytest.approx(acct.compose(dpa.SelfComposedDpEvent(event, 30)).get_epsilon(1e-5), rel=1e-9)
    assert got > 50  # it was reported as 15.0


# ------------------------------------------------------------ adaptive clipping
def _sin(state, unclipped_centred, *, c=10.0, key=0, rnd=0):
    return ServerIn(jax.random.key(key), jnp.int32(rnd), state, jnp.float32(c), jnp.float32(c), jnp.float32(c),
                    {"dp_unclipped": jnp.float32(unclipped_centred)}, jnp.arange(10), jnp.ones(10, bool))


def _cin(state, key=0):
    return ClientIn(jax.random.key(key), jnp.int32(0), state, jnp.float32(1), jnp.float32(1), jnp.int32(0),
                    jnp.arange(4), (), jnp.int32(0), None)


def test_each_client_reports_a_centred_bit_and_the_fraction_is_recovered_and_clamped():
    t = gaussian(0.0, 1.0, expected_clients=10.0, quantile=0.5, learning_rate=0.2, count_stddev=1e-9)
    st = t.init(None)
    small = {"update": {"w": jnp.full((4,), 0.1)}, "aux": ()}
    big = {"update": {"w": jnp.full((4,), 10.0)}, "aux": ()}
    assert float(t.encode(small, _cin(st))[1].stats["dp_unclipped"]) == 0.5
    assert float(t.encode(big, _cin(st))[1].stats["dp_unclipped"]) == -0.5
    total = {"update": {"w": jnp.zeros(3)}, "aux": ()}
    for k in range(11):  # k of 10 clients unclipped: the centred sum is k - 5
        _, _, m = t.finalize(total, _sin(st, k - 5.0))
        assert float(m["unclipped_fraction_noisy"]) == pytest.approx(k / 10, abs=1e-6)
    noisy = gaussian(0.5, 1.0, expected_clients=10.0, quantile=0.5, count_stddev=100.0)
    fr = [float(noisy.finalize(total, _sin(noisy.init(None), 0.0, key=i))[2]["unclipped_fraction_noisy"])
          for i in range(20)]
    assert min(fr) >= 0.0 and max(fr) <= 1.0 and len({0.0, 1.0} & set(fr)) == 2  # clamped, both ends hit


def test_update_and_count_noise_together_cost_one_gaussian_of_multiplier_z():
    z, sigma_b = 0.9, 0.5  # cohort 10 with the default count noise 10/20
    t = gaussian(z, 1.0, expected_clients=10.0, quantile=0.5, count_stddev=sigma_b)
    total = {"update": {"w": jnp.zeros(200_000)}, "aux": ()}
    out, _, _ = t.finalize(total, _sin(t.init(None), 0.0))
    z_update = float(np.std(np.asarray(out["update"]["w"])))  # S = 1
    # add-or-remove: the update moves by S (noise z_update*S), the centred count by 1/2 (noise sigma_b)
    combined = (1 / z_update**2 + (0.5 / sigma_b) ** 2) ** -0.5
    assert combined == pytest.approx(z, rel=0.01)


def test_a_noise_multiplier_that_leaves_the_update_no_budget_is_refused_with_what_to_change():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["privacy.noise_multiplier=1.0", "privacy.clip_norm=0.1", "privacy.adaptive_quantile=0.5",
                           "run.cohort_size=10"])
    assert e.value.field == "privacy.noise_multiplier"
    assert "lower privacy.noise_multiplier or raise privacy.count_stddev" in e.value.message
    load_config(None, ["privacy.noise_multiplier=1.0", "privacy.clip_norm=0.1", "privacy.adaptive_quantile=0.5",
                       "run.cohort_size=10", "privacy.count_stddev=0.6"])  # the fix it names works


def test_the_adaptive_norm_never_exceeds_its_cap():
    t = gaussian(0.0, 1.0, expected_clients=10.0, quantile=0.9, learning_rate=5.0, count_stddev=1e-9,
                 max_clip_norm=3.0)
    total = {"update": {"w": jnp.zeros(3)}, "aux": ()}
    _, st, _ = t.finalize(total, _sin(t.init(None), -5.0))  # nobody unclipped: the norm jumps up
    assert float(st["clip_norm"]) == 3.0


# -------------------------------------------------------- secure aggregation
def _secagg_sum(t, values, sent):
    ids = jnp.arange(values.shape[0])
    rkey = jax.random.key(7)
    total = None
    for i in range(values.shape[0]):
        cin = ClientIn(jax.random.key(i), jnp.int32(0), (), jnp.float32(1), jnp.float32(1), jnp.int32(i), ids, (),
                       jnp.int32(i), rkey)
        out, _ = t.encode({"update": {"w": jnp.asarray(values[i])}, "aux": ()}, cin)
        if sent[i]:
            y = np.asarray(out["secagg"], np.uint64)
            total = y if total is None else (total + y) % 2**32
    sin = ServerIn(rkey, jnp.int32(0), (), 0.0, 0.0, 0.0, {}, ids, jnp.asarray(sent), rkey)
    dec, _, m = t.finalize({"secagg": jnp.asarray(total.astype(np.uint32))}, sin)
    return np.asarray(dec["update"]["w"]), m


def test_secure_aggregation_with_adaptive_clipping_is_sized_for_the_norm_the_run_can_reach(digits20):
    from fedkd_jax.builders import build_aggregator

    cfg = load_config(None, ["algorithm=fedavg", "secagg.enabled=true", "privacy.noise_multiplier=0.5",
                             "privacy.clip_norm=0.1", "privacy.adaptive_quantile=0.5", "run.cohort_size=10",
                             "data.num_clients=20"])
    agg = build_aggregator(cfg, digits20, 10)
    dp = next(t for t in agg.transforms if t.name == "dp")
    sec = next(t for t in agg.transforms if t.name == "secagg")
    # the adaptive norm may grow to its cap (100 x 0.1); ten uploads of 0.3 each sum to 3.0
    values = np.full((10, 1), 0.3, np.float32)
    got, m = _secagg_sum(sec, values, [True] * 10)
    assert got[0] == pytest.approx(3.0, abs=1e-4)
    total = {"update": {"w": jnp.zeros(1)}, "aux": ()}
    _, st, _ = dp.finalize(total, _sin({"clip_norm": jnp.float32(9.9)}, -5.0))
    assert float(st["clip_norm"]) <= 10.0 + 1e-6


def test_secure_aggregation_below_its_threshold_aborts_and_the_round_is_empty(digits20):
    t = secure_aggregation(bits=32, frac_bits=16, num_clients=100, threshold=6)
    values = np.random.default_rng(0).normal(size=(10, 5)).astype(np.float32)
    got, m = _secagg_sum(t, values, [True] + [False] * 9)  # one survivor: its update must not come out
    assert float(m["aborted"]) == 1.0 and np.all(got == 0)
    got, m = _secagg_sum(t, values, [True] * 6 + [False] * 4)
    assert float(m["aborted"]) == 0.0
    np.testing.assert_allclose(got, values[:6].sum(0), atol=1e-3)
    # in the round: every client drops, the server stays as it was and reports an empty round
    model = fk.make_model("mlp", **STUDENT)
    alg = fk.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), batch_size=8)
    agg = chain(gaussian(0.0, 5.0, expected_clients=6.0), mean("uniform"),
                secure_aggregation(bits=32, frac_bits=16, num_clients=20, dropout_rate=0.6, threshold=6))
    sim = fk.Simulator(alg, digits20, cohort_size=6, mesh=fk.client_mesh(1), aggregator=agg)
    s0 = sim.init(0)
    s1, m = sim.run(s0, sim.put_data(), 3)
    m = jax.device_get(m)
    assert (m["secagg_aborted"] == 1).any()
    for r in np.flatnonzero(m["secagg_aborted"] == 1):
        assert m["clients_contributing"][r] == 0 and np.isnan(m["train_loss"][r])
    if (m["secagg_aborted"] == 1).all():
        for x, y in zip(jax.tree.leaves(s0.server), jax.tree.leaves(s1.server)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("overrides, field", [
    (["secagg.enabled=true", "privacy.clip_norm=1", "run.cohort_size=1"], "run.cohort_size"),
    (["secagg.enabled=true", "privacy.clip_norm=1", "run.cohort_size=4", "secagg.threshold=5"], "secagg.threshold"),
    (["secagg.enabled=true", "privacy.clip_norm=1", "run.cohort_size=4", "secagg.threshold=1"], "secagg.threshold"),
    (["privacy.noise_multiplier=1", "privacy.clip_norm=inf"], "privacy.clip_norm"),
    (["privacy.noise_multiplier=1", "privacy.clip_norm=1", "privacy.delta=0.5"], "privacy.delta"),
    (["privacy.noise_multiplier=1", "privacy.clip_norm=1", "privacy.max_clip_norm=0.5"], "privacy.max_clip_norm"),
])
def test_more_bad_privacy_settings_fail_before_compiling(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert e.value.field == field


def test_settings_that_fail_only_against_the_data_fail_before_compiling(tmp_path):
    from fedkd_jax.runner import run_experiment

    cases = [
        (["privacy.target_epsilon=0.000001", "privacy.noise_multiplier=1", "privacy.clip_norm=1"],
         "privacy.target_epsilon"),
        (["algorithm=fedavg", "secagg.enabled=true", "privacy.clip_norm=1", "secagg.frac_bits=-1"],
         "secagg.frac_bits"),
    ]
    for overrides, field in cases:
        with pytest.raises(ConfigError) as e:
            run_experiment(load_config(None, overrides), str(tmp_path / "x"))
        assert e.value.field == field
        assert not (tmp_path / "x").exists()
    with pytest.warns(UserWarning, match="above 1/N"):
        from fedkd_jax.runner.context import privacy_setup

        privacy_setup(load_config(None, ["privacy.noise_multiplier=1", "privacy.clip_norm=1",
                                         "privacy.delta=0.05"]), 50)


# ------------------------------------------------------------- noise source
def test_noise_is_reproducible_from_the_seed_unless_drawn_from_os_entropy(digits20):
    model = fk.make_model("mlp", **STUDENT)
    alg = fk.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), batch_size=8)

    def run(secure):
        agg = chain(mean("uniform", denominator="expected", expected=4.0),
                    gaussian(1.0, 1.0, expected_clients=4.0, secure_noise=secure))
        sim = fk.Simulator(alg, digits20, cohort_size=4, mesh=fk.client_mesh(1), aggregator=agg)
        s, _ = sim.run(sim.init(0), sim.put_data(), 1)
        return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(s.server.params)])

    np.testing.assert_array_equal(run(False), run(False))
    a, b = run(True), run(True)
    assert not np.allclose(a, b)
    assert 0.5 < np.std(a - b) / np.std(run(False) - a) < 2.0  # fresh noise of the same size


def test_raw_update_norms_are_logged_only_when_asked():
    total = {"update": {"w": jnp.zeros(3)}, "aux": ()}
    for asked in (False, True):
        t = gaussian(1.0, 1.0, expected_clients=10.0, log_raw_norm=asked)
        st = t.init(None)
        _, co = t.encode({"update": {"w": jnp.ones(3)}, "aux": ()}, _cin(st))
        sin = _sin(st, 0.0)._replace(stats=dict(co.stats))
        _, _, m = t.finalize(total, sin)
        assert ("mean_norm" in m) is asked and ("dp_norm" in co.stats) is asked


# ----------------------------------------------- FedDF / server-teacher KD
def test_feddf_uploads_logits_relative_to_the_global_model(digits20):
    """A client that did not move uploads zero logits: DP's joint clip scales only what it changed."""
    model = fk.make_model("mlp", **STUDENT)
    proxy = np.asarray(digits20.x[:30])
    alg = fk.algorithms.feddf(model, optax.sgd(0.1), optax.sgd(1.0), proxy, batch_size=8, distill_steps=2)
    state = alg.init(jax.random.key(0))
    params = alg.broadcast(state)
    sdata = {k: jnp.asarray(v) for k, v in alg.server_data.items()}
    zero = jax.tree.map(jnp.zeros_like, params)
    np.testing.assert_array_equal(np.asarray(alg.aux_from_update(params, zero, sdata)), 0.0)
    moved = jax.tree.map(lambda a: a + 0.01, params)
    delta = jax.tree.map(jnp.subtract, moved, params)
    expect = np.asarray(model.apply(moved, proxy)[0]) - np.asarray(model.apply(params, proxy)[0])
    np.testing.assert_allclose(np.asarray(alg.aux_from_update(params, delta, sdata)), expect, atol=1e-5)


def test_runs_without_dp_never_import_the_accountant():
    """dp-accounting (with scipy, ~0.7 s) loads only when a run accounts."""
    import subprocess
    import sys

    code = ("import sys; import fedkd_jax; from fedkd_jax.config import load_config; "
            "from fedkd_jax.plan import make_plan; make_plan(load_config(None, [])); "
            "assert 'dp_accounting' not in sys.modules, 'imported eagerly'; "
            "from fedkd_jax.privacy import Mechanism, epsilon; epsilon(Mechanism(1.0, 100, 10, 'poisson'), 3, 1e-5); "
            "assert 'dp_accounting' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "failed to converge" not in out.stderr  # dp-accounting's per-order notices are filtered
