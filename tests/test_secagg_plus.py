"""SecAgg+ (Bell et al. 2020): the sparse masking graph, its parameters, exact recovery,
the per-neighbourhood abort rule, bytes, and the complete graph left as it was."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import hypergeom

import fedkd_jax as fk
from fedkd_jax.aggregation import ClientIn, ServerIn
from fedkd_jax.config import from_dict, load_config, to_dict, upgrade_saved
from fedkd_jax.engine import round_key
from fedkd_jax.errors import ConfigError
from fedkd_jax.privacy import secagg
from fedkd_jax.privacy.secagg_params import auto_parameters, secagg_parameters
from fedkd_jax.settings import secagg_neighbors, secagg_threshold

N = 100  # population: ids >= N pad the cohort
_graph = jax.jit(secagg.masking_graph, static_argnames=("num_clients", "neighbors"))


# ------------------------------------------------------------------ helpers
def _upload_fn(t, ids, rkey):
    def f(v, i):
        cin = ClientIn(jax.random.key(i), jnp.int32(0), (), jnp.float32(1), jnp.float32(1), i, ids, (), i, rkey)
        out, co = t.encode({"update": {"w": v}, "aux": ()}, cin)
        return out["secagg"], co.weight, co.payload_bytes

    return jax.jit(f)


def _finalize_fn(t, ids, rkey):
    def f(total, sent):
        dec, _, m = t.finalize({"secagg": total}, ServerIn(rkey, jnp.int32(0), (), 0.0, 0.0, 0.0, {}, ids, sent, rkey))
        return dec["update"]["w"], m

    return jax.jit(f)


def _fixed_point(values, i, frac):
    """Client i's plaintext in fixed point, with its stochastic rounding (numpy)."""
    u = np.asarray(jax.random.uniform(jax.random.key(i), (values.shape[1],)), np.float32)
    return np.floor(values[i].astype(np.float32) * np.float32(2.0**frac) + u).astype(np.int64)


def _neighbour_sets(nb, valid):
    nb, valid = np.asarray(nb), np.asarray(valid)
    return [set(int(j) for j, ok in zip(nb[i], valid[i]) if ok) for i in range(nb.shape[0])]


def _hash_words(key, d):
    """The counter-mode hash PRG in numpy (uint64 arithmetic, reduced to 32 bits)."""
    k0, k1 = (int(w) for w in np.asarray(jax.random.key_data(key)).reshape(-1)[:2])
    m32 = 0xFFFFFFFF

    def mix(x):
        x ^= x >> 16
        x = (x * 0x21F0AAAD) & m32
        x ^= x >> 15
        x = (x * 0x735A2D97) & m32
        return x ^ (x >> 15)

    c = np.arange(d, dtype=np.uint64)
    return mix(mix((c * 0x9E3779B9 + k0) & m32) ^ k1).astype(np.int64)


def _expected_upload(values, i, peers, rkey, bits, frac, prg_name="threefry"):
    """Client i's masked upload by hand: fixed point + signed pair masks + self mask (mod 2^bits)."""
    d, mod = values.shape[1], 2**bits

    def prg(key):
        if prg_name == "hash":
            return _hash_words(key, d) % mod
        return np.asarray(jax.random.bits(key, (d,), jnp.uint32), np.int64) % mod

    y = _fixed_point(values, i, frac) % mod
    for j in sorted(peers):
        lo, hi = min(i, j), max(i, j)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rkey, secagg._PAIR), lo), hi)
        y = y + (prg(key) if i < j else -prg(key))
    y = y + prg(jax.random.fold_in(jax.random.fold_in(rkey, secagg._SELF), i))
    return y % mod


# -------------------------------------------------------------- parameters
# Degrees and thresholds published with the SecAgg+ reference implementation
# (google-parfait federated-compute, fcp/secagg/server/graph_parameter_finder_test.cc),
# semi-honest server, sigma = 40, eta = 20: (n, gamma, delta, k, t at most).
REFERENCE = [(100, 0.45, 0.45, 92, 46), (1000, 0.33, 0.33, 286, 150), (10_000, 0.33, 0.33, 422, 221),
             (100, 0.05, 0.33, 28, 6), (1000, 0.05, 0.33, 72, 24), (100_000, 0.05, 0.33, 96, 32),
             (1000, 0.33, 0.05, 78, 60)]


@pytest.mark.parametrize("n, gamma, delta, k, t", REFERENCE)
def test_parameters_match_the_reference_implementation(n, gamma, delta, k, t):
    p = secagg_parameters(n, corrupt=gamma, dropout=delta, correctness_bits=20)
    assert p.neighbors == k and 2 <= p.threshold <= t


@pytest.mark.parametrize("n", [100, 1000])
def test_auto_parameters_meet_the_bounds_and_no_smaller_degree_does(n):
    k, t = auto_parameters(n, 0.0)  # gamma = 0.05, delta = 1/3, sigma = 40, eta = 30
    assert (k, t) == {100: (30, 6), 1000: (84, 26)}[n]
    corrupt, survivors = math.floor(0.05 * n), math.ceil(n - n / 3)
    assert hypergeom(n, corrupt, k).sf(t - 1) <= 2.0**-41 / n  # P[t or more corrupt neighbours]
    assert hypergeom(n, survivors, k).cdf(t - 1) <= 2.0**-30 / n  # P[fewer than t surviving neighbours]
    k2 = k - 2  # one step smaller: no threshold is both secure and correct, or the graph may split
    ok = [s for s in range(2, k2 + 1) if hypergeom(n, corrupt, k2).sf(s - 1) <= 2.0**-41 / n
          and hypergeom(n, survivors, k2).cdf(s - 1) <= 2.0**-30 / n]
    removed = corrupt + math.floor(n / 3)
    split = (math.log(n * (n - k2 - 1) / 2) + math.lgamma(removed + 1) + math.lgamma(n - k2 + 1)
             - math.lgamma(n + 1) - math.lgamma(removed - k2 + 1))
    assert not ok or split >= -41 * math.log(2)


# ------------------------------------------------------------------- graph
def test_the_graph_is_k_regular_symmetric_fresh_each_round_and_deterministic():
    k = 4
    ids = jnp.asarray([5, N, 7, 1, 9, N, 2, 3, 8, 4, 6, N])  # padding inside the cohort too
    real = [i for i, c in enumerate(np.asarray(ids)) if c < N]
    base = jax.random.key(11)
    graphs = []
    for r in range(3):
        sets = _neighbour_sets(*_graph(round_key(base, jnp.int32(r)), ids, num_clients=N, neighbors=k))
        for i in range(len(sets)):
            if i in real:
                assert len(sets[i]) == k and i not in sets[i] and sets[i] <= set(real)
                assert all(i in sets[j] for j in sets[i])  # symmetric: both ends hold the edge
            else:
                assert sets[i] == set() and all(i not in s for s in sets)
        graphs.append(sets)
    assert graphs[0] != graphs[1] and graphs[1] != graphs[2]  # a fresh graph every round
    again = _neighbour_sets(*_graph(round_key(jax.random.key(11), jnp.int32(1)), ids, num_clients=N,
                                                  neighbors=k))
    assert again == graphs[1]  # a function of (seed, round)
    other = _neighbour_sets(*_graph(round_key(jax.random.key(12), jnp.int32(1)), ids, num_clients=N,
                                                  neighbors=k))
    assert other != graphs[1]


def _ring(sets, start):
    """The ring order of H(4, n) from its neighbour sets: nodes next to each other on the
    ring share two neighbours (two apart, one)."""
    ring = [start]
    while True:
        here = ring[-1]
        nxt = [j for j in sorted(sets[here]) if len(sets[here] & sets[j]) == 2 and j not in ring]
        if not nxt:
            return ring
        ring.append(nxt[0])


def test_the_graph_is_a_harary_ring_and_small_cohorts_get_the_complete_graph():
    rkey = jax.random.key(0)
    sets = _neighbour_sets(*_graph(rkey, jnp.arange(9), num_clients=N, neighbors=4))
    ring = _ring(sets, 0)  # H(4, 9): each node's neighbours are the two before and after it on a ring
    assert sorted(ring) == list(range(9))
    for p, i in enumerate(ring):
        assert sets[i] == {ring[(p + o) % 9] for o in (-2, -1, 1, 2)}
    ids = jnp.asarray([0, 1, 2, N, N, N, N, N])  # 3 real clients <= k = 4: the complete graph on them
    sets = _neighbour_sets(*_graph(rkey, ids, num_clients=N, neighbors=4))
    assert sets[:3] == [{1, 2}, {0, 2}, {0, 1}] and sets[3:] == [set()] * 5


# -------------------------------------------------- uploads, sum, abort rule
@pytest.mark.parametrize("bits, frac, neighbors, prg", [(32, 16, 4, "hash"), (16, 8, 4, "threefry"),
                                                      (32, 16, None, "threefry")])
def test_uploads_match_a_per_client_computation_and_the_sum_is_exact_with_dropouts(bits, frac, neighbors, prg):
    ids = jnp.asarray([4, 9, N, 1, 7, 3, 8, 0, N, 2, 6, 5])
    real = np.asarray(ids) < N
    rkey = jax.random.key(42)
    values = np.random.default_rng(0).normal(size=(12, 30)).astype(np.float32) * (0.01 if bits == 16 else 1)
    t = secagg.secure_aggregation(bits=bits, frac_bits=frac, num_clients=N, neighbors=neighbors, threshold=2,
                                  prg=prg)
    upload = _upload_fn(t, ids, rkey)
    if neighbors is None:
        peers = [set(np.flatnonzero(real)) - {i} if real[i] else set() for i in range(12)]
    else:
        peers = _neighbour_sets(*_graph(rkey, ids, num_clients=N, neighbors=neighbors))
    ups = []
    for i in range(12):
        y, _, nbytes = upload(jnp.asarray(values[i]), jnp.int32(i))
        if real[i]:  # padding uploads nothing (the engine zeroes it)
            expect = _expected_upload(values, i, peers[i], rkey, bits, frac, prg)
            np.testing.assert_array_equal(np.asarray(y, np.int64), expect)
            assert float(nbytes) == math.ceil(30 * bits / 8) + 64 + 80 * len(peers[i])
        ups.append(np.asarray(y, np.uint64))
    finalize = _finalize_fn(t, ids, rkey)
    for dropped in ([], [1, 5], [0, 3, 9]):
        sent = real.copy()
        sent[dropped] = False
        total = sum(u for u, s in zip(ups, sent) if s) % 2**bits
        got, m = finalize(jnp.asarray(total.astype(np.uint32)), jnp.asarray(sent))
        expect = sum(_fixed_point(values, i, frac) for i in np.flatnonzero(sent)) / 2.0**frac
        assert float(m["aborted"]) == 0 and float(m["dropped"]) == len(dropped)
        np.testing.assert_array_equal(np.asarray(got), expect.astype(np.float32))


@pytest.mark.parametrize("prg", ["hash", "threefry"])
def test_a_single_sparse_masked_upload_looks_uniform(prg):
    ids, rkey = jnp.arange(5), jax.random.key(3)
    t = secagg.secure_aggregation(bits=32, frac_bits=16, num_clients=N, neighbors=2, prg=prg)
    y, _, _ = _upload_fn(t, ids, rkey)(jnp.zeros(40_000), jnp.int32(1))  # constant payload: structure = masks
    y = np.asarray(y, np.uint64)
    counts = np.bincount((y >> 28).astype(np.int64), minlength=16)  # 16 bins on the top 4 bits
    chi2 = float(((counts - len(y) / 16) ** 2 / (len(y) / 16)).sum())
    assert chi2 < 37.7  # the chi-square(15) 0.999 quantile
    assert len(np.unique(y)) > 0.99 * len(y)


def _abort_reasons(sets, real, sent, t):
    """Why the round must abort, by hand: keys the server needs with fewer than t surviving holders."""
    if not sent.any():
        return {"no survivor"}
    reasons = set()
    for i in np.flatnonzero(real):
        holders = sum(bool(sent[j]) for j in sets[i])
        if sent[i] and holders < t:
            reasons.add("survivor")  # its self mask cannot be rebuilt
        if not sent[i] and 0 < holders < t:
            reasons.add("dropped")  # its masks stay in a survivor's upload and cannot be rebuilt
    return reasons


def test_a_neighbourhood_that_loses_too_many_aborts_the_round():
    ids = jnp.asarray(list(range(14)) + [N, N])
    real = np.asarray(ids) < N
    rkey, k, t = jax.random.key(8), 4, 2
    sets = _neighbour_sets(*_graph(rkey, ids, num_clients=N, neighbors=k))
    agg = secagg.secure_aggregation(bits=32, frac_bits=16, num_clients=N, neighbors=k, threshold=t)
    values = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
    upload = _upload_fn(agg, ids, rkey)
    ups = [np.asarray(upload(jnp.asarray(values[i]), jnp.int32(i))[0], np.uint64) for i in range(16)]
    finalize = _finalize_fn(agg, ids, rkey)
    ring = _ring(sets, 0)
    assert len(ring) == 14
    survivor_short = real.copy()  # ring[5] keeps one surviving neighbour of four
    survivor_short[[ring[3], ring[4], ring[6]]] = False
    dropped_short = real.copy()  # ring[5] and ring[4] dropped, each with one surviving neighbour
    dropped_short[[ring[3], ring[4], ring[5], ring[6]]] = False
    rng = np.random.default_rng(2)
    cases = [survivor_short, dropped_short, np.zeros(16, bool)]
    cases += [real & (rng.random(16) > p) for p in (0.15, 0.3, 0.45, 0.6) for _ in range(6)]
    seen = []
    for sent in cases:
        total = sum((u for u, s in zip(ups, sent) if s), np.zeros(8, np.uint64)) % 2**32
        got, m = finalize(jnp.asarray(total.astype(np.uint32)), jnp.asarray(sent))
        reasons = _abort_reasons(sets, real, sent, t)
        assert float(m["aborted"]) == float(bool(reasons)), (sent.astype(int), reasons)
        seen.append(frozenset(reasons))
        if reasons:
            assert np.all(np.asarray(got) == 0)  # nothing is released
        else:
            plain = sum(_fixed_point(values, i, 16) for i in np.flatnonzero(sent)) / 2.0**16
            np.testing.assert_array_equal(np.asarray(got), plain.astype(np.float32))
    assert seen[0] == {"survivor"} and seen[1] == {"dropped"}  # each rule aborts a round on its own
    assert {frozenset(), frozenset({"survivor"}), frozenset({"dropped"}), frozenset({"no survivor"})} <= set(seen)


# ------------------------------------------------------------------ wiring
def test_auto_gives_the_same_training_as_the_complete_graph_bit_for_bit(digits20, tmp_path):
    from fedkd_jax.builders import build_aggregator

    model = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(8,))
    alg = fk.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), batch_size=8)
    base = ["algorithm=fedavg", "secagg.enabled=true", "privacy.clip_norm=5", "run.cohort_size=8",
            "data.num_clients=20", "secagg.dropout_rate=0.25"]
    out = {}
    for graph in ("full", "auto"):
        cfg = load_config(None, base + [f"secagg.neighbors={graph}"])
        sim = fk.Simulator(alg, digits20, cohort_size=8, mesh=fk.client_mesh(1),
                           aggregator=build_aggregator(cfg, digits20, 8))
        out[graph] = sim.run(sim.init(0), sim.put_data(), 1)
    (a, ma), (b, mb) = out["full"], out["auto"]
    k = secagg_neighbors(cfg)
    assert k == 4 and secagg_threshold(cfg) == 2  # auto at cohort 8
    assert np.asarray(ma["secagg_dropped"]).sum() > 0 and not np.asarray(mb["secagg_aborted"]).any()
    for x, y in zip(jax.tree.leaves(a.server), jax.tree.leaves(b.server)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    d = sum(x.size for x in jax.tree.leaves(a.server.params))
    sent_full, sent_auto = np.asarray(ma["bytes_up_clients"]), np.asarray(mb["bytes_up_clients"])
    assert set(sent_full[sent_full > 0].tolist()) == {4 * d + 64 + 80 * 7}
    assert set(sent_auto[sent_auto > 0].tolist()) == {4 * d + 64 + 80 * k}
    assert secagg.upload_bytes(d, 32, 8, neighbors=k) == 4 * d + 64 + 80 * k


@pytest.mark.parametrize("overrides, field", [
    (["secagg.neighbors=3"], "secagg.neighbors"),
    (["secagg.neighbors=0"], "secagg.neighbors"),
    (["secagg.neighbors=some"], "secagg.neighbors"),
    (["secagg.neighbors=2.5"], "secagg.neighbors"),
    (["secagg.enabled=true", "privacy.clip_norm=1", "secagg.neighbors=4", "secagg.threshold=5"], "secagg.threshold"),
    (["secagg.enabled=true", "privacy.clip_norm=1", "secagg.threshold=7"], "secagg.threshold"),  # auto: k = 6
])
def test_bad_neighbour_settings_fail_before_compiling(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert e.value.field == field


def test_thresholds_by_graph_and_runs_saved_before_secagg_plus_resume_on_the_complete_graph():
    on = ["secagg.enabled=true", "privacy.clip_norm=1", "run.cohort_size=10"]
    assert secagg_threshold(load_config(None, on + ["secagg.neighbors=full"])) == 6  # a majority of the cohort
    assert secagg_threshold(load_config(None, on + ["secagg.neighbors=4"])) == 3  # a majority of the neighbours
    assert secagg_threshold(load_config(None, on + ["secagg.neighbors=20"])) == 5  # ... of the 9 there can be
    auto = load_config(None, on)
    assert (secagg_neighbors(auto), secagg_threshold(auto)) == tuple(auto_parameters(10, 0.0))
    assert secagg_neighbors(load_config(None, on[:2] + ["run.cohort_size=4"])) is None  # too small for sparse
    old = to_dict(load_config(None, on))
    del old["secagg"]["neighbors"]
    assert from_dict(upgrade_saved(old)).secagg.neighbors == "full"
