"""Width slicing (HeteroFL, FedRolex) against independent numpy references.

The references below write each model's index sets out by hand (which
hidden units a sub-model keeps, where a channel lands after the CNN's
channel-last flatten, the LSTM's four gate blocks) and aggregate with
explicit loops over clients and coordinates; none of them calls the
module under test except to get the arrays it is checked on.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedkd_jax.hetero as H
from fedkd_jax.aggregation.base import ClientIn, ServerIn
from fedkd_jax.aggregation.mean import mean
from fedkd_jax.errors import ConfigError
from fedkd_jax.models import make_model

MLP = dict(num_features=64, num_classes=10, hidden=(8, 6))
CNN = dict(num_features=64, num_classes=10, image_shape=(8, 8, 1), channels=(4, 6), hidden=(12,))
RATIOS = (1.0, 0.5, 0.25, 0.5, 1.0, 0.25)  # the mixed population of the aggregation test


# ---------------------------------------------------------------------------- numpy references

def window(n, k, rule, rnd, direction=1):
    """The kept indices of one width dimension, written from the papers' and code's descriptions."""
    if rule == "heterofl" or k == n:
        return np.arange(k)
    if direction == 1:  # the window advances one index per round
        return np.array([(rnd + j) % n for j in range(k)])
    return np.roll(np.arange(n), rnd)[:k]  # FedRolex's reference code: torch.roll(arange(n), rounds % n)[:k]


def sub_width(n, r):
    return max(1, int(round(n * r)))


def mlp_maps(r, rule, rnd, *, d=64, hidden=(8, 6), classes=10, direction=1):
    """{path: per-axis global indices} of an MLP sub-model of ratio r."""
    sel = [window(h, sub_width(h, r), rule, rnd, direction) for h in hidden]
    maps, prev = {}, np.arange(d)
    for i, s in enumerate(sel):
        maps[("hidden", i, "kernel")] = (prev, s)
        maps[("hidden", i, "bias")] = (s,)
        prev = s
    maps[("head", "kernel")] = (prev, np.arange(classes))
    maps[("head", "bias")] = (np.arange(classes),)
    return maps


def cnn_maps(r, rule, rnd, *, channels=(4, 6), dense=12, classes=10, spatial=2 * 2, direction=1):
    """The CNN on 8x8x1: two 3x3 convs, each pooled 2x2 (8 -> 4 -> 2), flatten of 2x2xC, dense, head."""
    c0, c1 = (window(c, sub_width(c, r), rule, rnd, direction) for c in channels)
    sd = window(dense, sub_width(dense, r), rule, rnd, direction)
    k3, ar = np.arange(3), np.arange
    # channel-last flatten: position p of the 2x2 grid, channel c -> row p * C + c
    rows = np.array([p * channels[1] + c for p in range(spatial) for c in c1])
    return {
        ("convs", 0, "kernel"): (k3, k3, ar(1), c0), ("convs", 0, "bias"): (c0,),
        ("convs", 1, "kernel"): (k3, k3, c0, c1), ("convs", 1, "bias"): (c1,),
        ("dense", "kernel"): (rows, sd), ("dense", "bias"): (sd,),
        ("head", "kernel"): (sd, ar(classes)), ("head", "bias"): (ar(classes),),
    }


def femnist_maps(r, rule, rnd, *, c=(8, 16), dense=128, classes=10, spatial=7 * 7):
    """FemnistCNN (width 0.25) on 28x28x1: 5x5 convs, SAME pools 28 -> 14 -> 7, flatten of 7x7xC2."""
    s1, s2, sd = (window(n, sub_width(n, r), rule, rnd) for n in (*c, dense))
    k5, ar = np.arange(5), np.arange
    rows = np.array([p * c[1] + ch for p in range(spatial) for ch in s2])
    return {
        ("conv1", "kernel"): (k5, k5, ar(1), s1), ("conv1", "bias"): (s1,),
        ("conv2", "kernel"): (k5, k5, s1, s2), ("conv2", "bias"): (s2,),
        ("dense", "kernel"): (rows, sd), ("dense", "bias"): (sd,),
        ("head", "kernel"): (sd, ar(classes)), ("head", "bias"): (ar(classes),),
    }


def lstm_maps(r, rule, rnd, *, vocab=12, embed=1, hidden=32):
    """CharLSTM (width 0.125): embedding [V, E], two LSTMs with fused gates [.., 4H] (i, f, g, o), head."""
    se = window(embed, sub_width(embed, r), rule, rnd)
    sh = window(hidden, sub_width(hidden, r), rule, rnd)
    gates = np.array([g * hidden + i for g in range(4) for i in sh])
    maps = {("embed", "embedding"): (np.arange(vocab), se)}
    for layer, prev in ((0, se), (1, sh)):
        maps[("lstms", layer, "cell", "dense_i", "kernel")] = (prev, gates)
        maps[("lstms", layer, "cell", "dense_h", "kernel")] = (sh, gates)
        maps[("lstms", layer, "cell", "dense_h", "bias")] = (gates,)
    maps[("head", "kernel")] = (sh, np.arange(vocab))
    maps[("head", "bias")] = (np.arange(vocab),)
    return maps


def rand_params(model, seed):
    """Random params of ``model``'s shapes (numpy: no eager init), biases nonzero, kernels ~ 1/sqrt(fan-in)."""
    rng = np.random.default_rng(seed)

    def one(s):
        fan = np.prod(s.shape[:-1]) if len(s.shape) > 1 else 4.0
        return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(fan), jnp.float32)

    return jax.tree.map(one, jax.eval_shape(model.init, jax.random.key(0)))


def flat(tree):
    """{path: numpy leaf} of a nested params dict."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[tuple(k.key for k in path)] = np.asarray(leaf, np.float64)
    return out


def masked_average_ref(old, subs, maps, weights):
    """Per coordinate: weighted mean over the clients whose sub-model holds it, else the old value."""
    out = {}
    for path, g in old.items():
        ref = np.empty_like(g)
        for coord in np.ndindex(*g.shape):
            num = den = 0.0
            for sub, m, w in zip(subs, maps, weights):
                idx = m[path]
                if all(c in idx[a] for a, c in enumerate(coord)):
                    pos = tuple(int(np.flatnonzero(idx[a] == c)[0]) for a, c in enumerate(coord))
                    num += w * sub[path][pos]
                    den += w
            ref[coord] = num / den if den > 0 else g[coord]
        out[path] = ref
    return out


def assert_tree_close(tree, ref, **tol):
    got = flat(tree)
    assert set(got) == set(ref)
    for p in ref:
        np.testing.assert_allclose(got[p], ref[p], err_msg=str(p), **tol)


@functools.lru_cache(maxsize=None)
def cached_slice(kind, ratio, rule, direction, kwargs):
    return H.width_slice(kind, ratio, rule=rule, direction=direction, **dict(kwargs))


def population(kind_kwargs, kind, rule, ratios, seed, direction=1):
    """Global params, and per client: its WidthSlice, random 'trained' sub-params, a weight."""
    glob = rand_params(make_model(kind, **kind_kwargs), seed)
    slices = [cached_slice(kind, r, rule, direction, tuple(kind_kwargs.items())) for r in ratios]
    subs = [rand_params(s.model, seed + 1 + i) for i, s in enumerate(slices)]
    weights = np.random.default_rng(seed).integers(1, 9, len(ratios)).astype(np.float32)
    return glob, slices, subs, weights


# each jitted once per spec (specs compare by value, so equal specs share a compilation); round traced
@functools.partial(jax.jit, static_argnums=0)
def _slices(specs, glob, rnd):
    return tuple(H.slice_params(glob, spec, rnd) for spec in specs)


@functools.partial(jax.jit, static_argnums=0)
def _aggregate(specs, glob, subs, weights, rnd):
    total = None
    for spec, sub, w in zip(specs, subs, weights):
        up = H.scatter_sum(sub, spec, rnd, weight=w)
        total = up if total is None else jax.tree.map(jnp.add, total, up)
    return H.masked_average(*total, glob), total[1]


def aggregate(glob, slices, subs, weights, rnd):
    """The engine's path: every client's fixed-shape payload, summed, then divided. Returns (new, counts)."""
    return _aggregate(tuple(s.spec for s in slices), glob, subs, jnp.asarray(weights), jnp.int32(rnd))


@jax.jit
def fedavg(subs, weights):
    """Today's FedAvg aggregator: encode (weigh), sum (the all-reduce), finalize (divide by the summed weight)."""
    agg, total = mean(), None
    for sub, w in zip(subs, weights):
        up, _ = agg.encode({"update": sub, "aux": {}}, ClientIn(None, None, (), w, w, None, None, None, None))
        total = up if total is None else jax.tree.map(jnp.add, total, up)
    ws = functools.reduce(jnp.add, list(weights))
    return agg.finalize(total, ServerIn(None, None, (), ws, ws, None, {}, None, None))[0]["update"]


# ---------------------------------------------------------------------------- (a) width 1.0 is FedAvg

@pytest.mark.parametrize("kind,kw,rule", [("mlp", MLP, "heterofl"), ("cnn", CNN, "fedrolex")])
def test_full_width_is_identity_and_fedavg(kind, kw, rule):
    glob, slices, subs, weights = population(kw, kind, rule, (1.0,) * 4, seed=3)
    for rnd in (0, 5):
        (sliced,) = _slices((slices[0].spec,), glob, jnp.int32(rnd))
        for a, b in zip(jax.tree.leaves(sliced), jax.tree.leaves(glob)):
            np.testing.assert_array_equal(a, b)
    new, counts = aggregate(glob, slices, subs, weights, rnd=5)
    for c in jax.tree.leaves(counts):
        np.testing.assert_array_equal(c, np.full(c.shape, weights.sum()))
    ref = {p: sum(np.float64(w) * s[p] for w, s in zip(weights, map(flat, subs))) / weights.sum() for p in flat(glob)}
    assert_tree_close(new, ref, rtol=1e-6, atol=1e-7)
    # today's FedAvg aggregator, to float32 rounding: bit equality between two differently
    # fused XLA programs is not promised (XLA CPU contracts multiply-adds and turns a division
    # by a broadcast scalar into a multiplication by its reciprocal)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(fedavg(subs, jnp.asarray(weights)))):
        np.testing.assert_allclose(a, b, rtol=3e-7, atol=1e-8)


# ---------------------------------------------------------------------------- (b) masked aggregation

@pytest.mark.parametrize("kind,rule,direction,rounds", [
    ("mlp", "fedrolex", 1, (0, 5, 11)), ("cnn", "heterofl", 1, (7,)), ("cnn", "fedrolex", 1, (0, 5, 11))])
def test_masked_aggregation_matches_per_coordinate_reference(kind, rule, direction, rounds):
    """Ratios 1, 1/2, 1/4 mixed; weights are example counts; one compilation serves every round."""
    kw, maps_fn = {"mlp": (MLP, mlp_maps), "cnn": (CNN, cnn_maps)}[kind]
    glob, slices, subs, weights = population(kw, kind, rule, RATIOS, seed=11, direction=direction)
    for rnd in rounds:
        maps = [maps_fn(r, rule, rnd, direction=direction) for r in RATIOS]
        new, _ = aggregate(glob, slices, subs, weights, rnd)
        ref = masked_average_ref(flat(glob), [flat(s) for s in subs], maps, weights)
        assert_tree_close(new, ref, rtol=2e-6, atol=1e-7)


def test_uncovered_coordinates_keep_their_value_and_payload_is_vmappable():
    """Only quarter-width clients: most coordinates untouched; a group batch vmaps over its clients."""
    glob = rand_params(make_model("mlp", **MLP), 0)
    s = H.width_slice("mlp", 0.25, rule="fedrolex", **MLP)
    subs = jax.tree.map(lambda *x: jnp.stack(x), *[rand_params(s.model, i) for i in (1, 2, 3)])
    w = jnp.array([1.0, 2.0, 5.0])

    @jax.jit
    def group(subs, w, glob):
        sums, counts = jax.vmap(lambda p, wi: H.scatter_sum(p, s.spec, 2, weight=wi))(subs, w)
        sums, counts = jax.tree.map(lambda x: x.sum(0), (sums, counts))
        return H.masked_average(sums, counts, glob), counts

    new, counts = group(subs, w, glob)
    m = mlp_maps(0.25, "fedrolex", 2)
    subs_np = [flat(jax.tree.map(lambda x, i=i: x[i], subs)) for i in range(3)]
    assert_tree_close(new, masked_average_ref(flat(glob), subs_np, [m] * 3, np.asarray(w)), rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(new["hidden"][0]["kernel"][:, 4:], glob["hidden"][0]["kernel"][:, 4:])
    np.testing.assert_array_equal(counts["hidden"][0]["bias"], [0, 0, 8, 8, 0, 0, 0, 0])


# ---------------------------------------------------------------------------- (c) a valid sub-network

@pytest.mark.parametrize("rule,rnd,direction,expected", [("heterofl", 6, 1, [0, 1, 2, 3]),
                                                         ("fedrolex", 6, 1, [6, 7, 0, 1]),
                                                         ("fedrolex", 1, -1, [7, 0, 1, 2])])
def test_tiny_mlp_sub_model_logits_by_hand(rule, rnd, direction, expected):
    kw = dict(num_features=5, num_classes=3, hidden=(8,))
    glob = rand_params(make_model("mlp", **kw), 4)
    s = H.width_slice("mlp", 0.5, rule=rule, direction=direction, **kw)
    assert s.model.num_params == 5 * 4 + 4 + 4 * 3 + 3
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    logits, feats = jax.jit(lambda g, x: s.model.apply(H.slice_params(g, s.spec, rnd), x))(glob, jnp.asarray(x))
    g = flat(glob)
    w1, b1 = g["hidden", 0, "kernel"][:, expected], g["hidden", 0, "bias"][expected]
    w2, b2 = g["head", "kernel"][expected, :], g["head", "bias"]
    h = np.maximum(x @ w1 + b1, 0)
    np.testing.assert_allclose(feats, h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, h @ w2 + b2, rtol=1e-5, atol=1e-6)


def _dead_units(kind, kw, maps, rule, rnd, x, ratio=0.5):
    """The sub-model's forward equals the full model's with every coordinate outside the maps zeroed."""
    full = make_model(kind, **kw)
    glob = rand_params(full, 7)
    s = H.width_slice(kind, ratio, rule=rule, **kw)
    masks = {p: _mask(g.shape, maps[p]) for p, g in flat(glob).items()}
    masked = jax.tree.unflatten(jax.tree.structure(glob), [jnp.asarray(masks[p] * g, jnp.float32)
                                                           for p, g in flat(glob).items()])

    @jax.jit
    def run(glob, masked, x):
        return (full.apply(masked, x)[0], s.model.apply(H.slice_params(glob, s.spec, rnd), x)[0],
                H.coverage(s.spec, rnd))

    want, got, cover = run(glob, masked, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert_tree_close(cover, masks, rtol=0, atol=0)  # the spec's own mask is the same


def _mask(shape, idx):
    m = np.zeros(shape)
    m[np.ix_(*idx)] = 1.0
    return m


def test_cnn_sub_model_equals_full_model_with_dead_channels():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 64)), jnp.float32)
    _dead_units("cnn", CNN, cnn_maps(0.5, "fedrolex", 5), "fedrolex", 5, x)


def test_femnist_cnn_on_mnist_size_dead_channels():
    kw = dict(num_features=784, num_classes=10, image_shape=(28, 28, 1), width=0.25)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 784)), jnp.float32)
    _dead_units("femnist_cnn", kw, femnist_maps(0.5, "fedrolex", 13), "fedrolex", 13, x)


def test_char_lstm_gate_blocks_dead_units():
    kw = dict(num_features=5, num_classes=12, width=0.125)
    x = jnp.asarray(np.random.default_rng(3).integers(0, 12, size=(3, 5)), jnp.float32)
    _dead_units("char_lstm", kw, lstm_maps(0.5, "fedrolex", 30), "fedrolex", 30, x)


# ---------------------------------------------------------------------------- (d) FedRolex's window rolls

def test_fedrolex_window_rolls_and_wraps():
    s = H.width_slice("mlp", 0.5, rule="fedrolex", num_features=5, num_classes=3, hidden=(8,)).spec
    idx = lambda rnd: np.asarray(H.dim_indices(s, rnd)["hidden0"]).tolist()  # noqa: E731
    assert idx(0) == [0, 1, 2, 3]
    assert idx(1) == [1, 2, 3, 4]
    assert idx(5) == [5, 6, 7, 0]
    assert idx(8) == idx(0) and idx(9) == idx(1)
    code = s._replace(direction=-1)  # the reference code's torch.roll(arange(n), round)[:k]
    assert np.asarray(H.dim_indices(code, 1)["hidden0"]).tolist() == [7, 0, 1, 2]
    static = s._replace(rule="heterofl")
    assert np.asarray(H.dim_indices(static, 5)["hidden0"]).tolist() == [0, 1, 2, 3]
    glob = rand_params(make_model("mlp", num_features=5, num_classes=3, hidden=(8,)), 0)
    k0 = _slices((s,), glob, jnp.int32(0))[0]["hidden"][0]["kernel"]
    k1 = _slices((s,), glob, jnp.int32(1))[0]["hidden"][0]["kernel"]
    assert not np.array_equal(k0, k1)
    np.testing.assert_array_equal(k1[:, :3], k0[:, 1:])


def test_round_is_traced_one_compile():
    s = H.width_slice("cnn", 0.5, rule="fedrolex", **CNN)
    glob = rand_params(make_model("cnn", **CNN), 0)
    traces = []

    @jax.jit
    def round_trip(glob, rnd):
        traces.append(1)
        sub = H.slice_params(glob, s.spec, rnd)
        return H.masked_average(*H.scatter_sum(sub, s.spec, rnd, weight=4.0), glob)

    for rnd in range(4):
        back = round_trip(glob, jnp.int32(rnd))
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(glob)):
            np.testing.assert_array_equal(a, b)
    assert len(traces) == 1


# ---------------------------------------------------------------------------- the rest of the zoo

ZOO = [
    ("femnist_cnn_dropout", dict(num_features=784, num_classes=10, image_shape=(28, 28, 1), width=0.25)),
    ("resnet18_gn", dict(num_features=8 * 8 * 3, num_classes=10, image_shape=(8, 8, 3), width=0.125)),
    ("nwp_lstm", dict(num_features=5, num_classes=12, width=0.125)),
    ("transformer", dict(num_features=5, num_classes=12, width=0.125)),
]


@pytest.mark.parametrize("kind,kw", ZOO)
def test_every_zoo_model_slices_to_its_scaled_model(kind, kw):
    """The index sets select, from the global leaves, arrays of the scaled model's shapes, each index
    within range and distinct (slice_params itself is checked on mlp, cnn, femnist_cnn and char_lstm)."""
    s = cached_slice(kind, 0.5, "fedrolex", 1, tuple(kw.items()))
    glob = jax.eval_shape(make_model(kind, **kw).init, jax.random.key(0))
    want = jax.eval_shape(s.model.init, jax.random.key(0))  # the sub-model make_model builds
    idx = jax.tree.leaves(jax.jit(lambda: H.index_arrays(s.spec, 3))(), is_leaf=lambda t: isinstance(t, tuple))
    for g, w, i in zip(jax.tree.leaves(glob), jax.tree.leaves(want), idx):
        assert tuple(len(a) for a in i) == w.shape
        for a, size in zip(i, g.shape):
            a = np.asarray(a)
            assert len(set(a.tolist())) == len(a) and a.min() >= 0 and a.max() < size


def test_resnet_residual_ties():
    """A block without a projection adds its input to its output, so both axes name one width;
    a projecting block starts a new one, shared by its shortcut; GroupNorm follows its conv."""
    spec = cached_slice("resnet18_gn", 0.5, "fedrolex", 1, tuple(dict(ZOO)["resnet18_gn"].items())).spec
    paths = [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(
        jax.tree.unflatten(spec.treedef, [0] * len(spec.axes)))[0]]
    dim = {p: tuple(a and a.dim for a in ax) for p, ax in zip(paths, spec.axes)}
    stem = dim["stem", "kernel"][3]
    assert dim["blocks", 0, "conv1", "kernel"][2] == dim["blocks", 0, "conv2", "kernel"][3] == stem
    assert dim["blocks", 1, "conv2", "kernel"][3] == stem and dim["stem_gn", "scale"] == (stem,)
    new = dim["blocks", 2, "conv2", "kernel"][3]
    assert new != stem and dim["blocks", 2, "short", "kernel"][2:] == (stem, new)
    assert dim["blocks", 2, "conv1", "kernel"][2] == stem and dim["blocks", 2, "short_gn", "bias"] == (new,)
    mid = dim["blocks", 2, "conv1", "kernel"][3]
    assert dim["blocks", 2, "gn1", "scale"] == (mid,) and dim["blocks", 2, "conv2", "kernel"][2] == mid
    assert dim["head", "kernel"] == (dim["blocks", 7, "conv2", "kernel"][3], None)


# ---------------------------------------------------------------------------- (e) bad inputs

@pytest.mark.parametrize("ratio", [0, 0.0, -0.5, 1.5, math.nan, math.inf, True, "0.5", None])
def test_bad_width_is_a_config_error(ratio):
    with pytest.raises(ConfigError) as e:
        H.width_slice("mlp", ratio, **MLP)
    assert e.value.field == "model.groups" and "width" in e.value.message


@pytest.mark.parametrize("kind", ["vgg", "MLP"])
def test_unknown_kind_is_a_config_error(kind):
    with pytest.raises(ConfigError) as e:
        H.width_slice(kind, 0.5, **MLP)
    assert e.value.field == "model.groups"
    assert "mlp, cnn, femnist_cnn" in e.value.message and kind in e.value.message


def test_bad_rule_and_mismatched_models():
    with pytest.raises(ConfigError, match="rule"):
        H.width_slice("mlp", 0.5, rule="fedavg", **MLP)
    g = jax.eval_shape(make_model("mlp", **MLP).init, jax.random.key(0))
    wider = jax.eval_shape(make_model("mlp", **{**MLP, "hidden": (16, 6)}).init, jax.random.key(0))
    with pytest.raises(ConfigError, match="sub-model width 16"):
        H.width_spec("mlp", g, wider)
    other = jax.eval_shape(make_model("cnn", **CNN).init, jax.random.key(0))
    with pytest.raises(ConfigError, match="structure"):
        H.width_spec("mlp", g, other)


def test_public_api():
    for name in H.__all__:
        assert hasattr(H, name), name
    assert set(H.SLICEABLE) >= {"mlp", "cnn", "femnist_cnn"}
