"""The field's reference models: parameter counts against the papers and hand formulas,
shapes, an LSTM against numpy, causal masking, vmapping over clients, two federated rounds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedkd_jax as fk
from fedkd_jax.config import load_config
from fedkd_jax.errors import ConfigError
from fedkd_jax.models import MODELS, CharLSTM, functional


def _dense(i, o):
    return i * o + o


def _conv(k, i, o, bias=True):
    return k * k * i * o + (o if bias else 0)


def _lstm(i, h):  # one bias per gate (Keras, flax)
    return 4 * (i * h + h * h + h)


def _resnet18_gn(classes, c=3):
    gn = lambda ch: 2 * ch  # noqa: E731 - scale and offset per channel
    total = _conv(3, c, 64, bias=False) + gn(64)
    cin = 64
    for cout in (64, 128, 256, 512):
        for b in range(2):
            total += _conv(3, cin, cout, False) + gn(cout) + _conv(3, cout, cout, False) + gn(cout)
            if cin != cout:
                total += _conv(1, cin, cout, False) + gn(cout)
            cin = cout
    return total + _dense(512, classes)


def _transformer(V, L, d=128, layers=2):
    block = 2 * (2 * d) + 4 * _dense(d, d) + _dense(d, 4 * d) + _dense(4 * d, d)
    return V * d + L * d + layers * block + 2 * d + _dense(d, V)


IMG28 = dict(num_features=784, image_shape=(28, 28, 1))


@pytest.mark.parametrize("kind,kw,expected", [
    # McMahan et al. 2017, Sec. 3: "1,663,370 total parameters" (10 classes); 62 for FEMNIST.
    ("femnist_cnn", dict(IMG28, num_classes=10), 1_663_370),
    ("femnist_cnn", dict(IMG28, num_classes=62), 1_690_046),
    # Reddi et al. 2021's EMNIST CNN (create_conv_dropout_model): 26x26 -> 24x24 -> pooled 12x12x64.
    ("femnist_cnn_dropout", dict(IMG28, num_classes=62),
     _conv(3, 1, 32) + _conv(3, 32, 64) + _dense(12 * 12 * 64, 128) + _dense(128, 62)),
    ("resnet18_gn", dict(num_features=3072, image_shape=(32, 32, 3), num_classes=100), _resnet18_gn(100)),
    # TFF Shakespeare: 86 characters + pad, OOV, BOS, EOS.
    ("char_lstm", dict(num_features=80, num_classes=90), 90 * 8 + _lstm(8, 256) + _lstm(256, 256) + _dense(256, 90)),
    # Stack Overflow: 10,000 words + pad, OOV, BOS, EOS.
    ("nwp_lstm", dict(num_features=20, num_classes=10_004),
     10_004 * 96 + _lstm(96, 670) + _dense(670, 96) + _dense(96, 10_004)),
    ("transformer", dict(num_features=20, num_classes=10_004), _transformer(10_004, 20)),
])
def test_parameter_counts(kind, kw, expected):
    assert fk.make_model(kind, **kw).num_params == expected


def test_known_totals():
    """The hand formulas above give the figures quoted in the README."""
    assert _resnet18_gn(100) == 11_220_132 and _resnet18_gn(10) == 11_173_962  # the usual CIFAR ResNet-18
    assert 90 * 8 + _lstm(8, 256) + _lstm(256, 256) + _dense(256, 90) == 820_522
    assert 10_004 * 96 + _lstm(96, 670) + _dense(670, 96) + _dense(96, 10_004) == 4_050_748


TINY = {  # kind -> make_model keywords at a tiny size
    "femnist_cnn": dict(num_features=64, num_classes=10, image_shape=(8, 8, 1), width=1 / 16),
    "femnist_cnn_dropout": dict(num_features=64, num_classes=10, image_shape=(8, 8, 1), width=1 / 16),
    "resnet18_gn": dict(num_features=48, num_classes=10, image_shape=(4, 4, 3), width=1 / 32),
    "char_lstm": dict(num_features=7, num_classes=11, width=1 / 32),
    "nwp_lstm": dict(num_features=7, num_classes=13, width=1 / 32),
    "transformer": dict(num_features=7, num_classes=13, width=1 / 16),
}


def _random_params(model, seed=0, scale=0.3):
    """Params of the model's shapes drawn in numpy: no init program to compile."""
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, scale, s.shape), s.dtype), shapes)


def _inputs(kw, shape, seed=0):
    rng = np.random.default_rng(seed)
    if "image_shape" in kw:
        return jnp.asarray(rng.random((*shape, kw["num_features"])), jnp.float32)
    return jnp.asarray(rng.integers(0, kw["num_classes"], (*shape, kw["num_features"])), jnp.float32)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_shapes_and_feature_dim(kind):
    kw = TINY[kind]
    model = fk.make_model(kind, **kw)
    assert model.in_features == kw["num_features"] and model.name == kind
    x = jax.ShapeDtypeStruct((3, kw["num_features"]), jnp.float32)
    logits, feats = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.key(0)), x)
    seq = kind in fk.models.SEQUENCE_MODELS
    assert logits.shape == ((3, kw["num_features"], kw["num_classes"]) if seq else (3, kw["num_classes"]))
    assert feats.shape == (3, model.feature_dim)


def test_default_feature_dims():
    img = dict(num_classes=62, **IMG28)
    assert fk.make_model("femnist_cnn", **img).feature_dim == 512
    assert fk.make_model("femnist_cnn_dropout", **img).feature_dim == 128
    assert fk.make_model("resnet18_gn", num_features=3072, image_shape=(32, 32, 3), num_classes=100).feature_dim == 512
    assert fk.make_model("char_lstm", num_features=80, num_classes=90).feature_dim == 256
    assert fk.make_model("nwp_lstm", num_features=20, num_classes=10_004).feature_dim == 96
    assert fk.make_model("transformer", num_features=20, num_classes=10_004).feature_dim == 128


def _np_lstm(x, kernel_i, kernel_h, bias):
    """h_t = o * tanh(c_t), c_t = f * c_{t-1} + i * g; gates [i, f, g, o] = x W_i + h W_h + b."""
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    B, L, _ = x.shape
    H = kernel_h.shape[0]
    h, c, out = np.zeros((B, H)), np.zeros((B, H)), []
    for t in range(L):
        z = x[:, t] @ kernel_i + h @ kernel_h + bias
        i, f, g, o = sig(z[:, :H]), sig(z[:, H:2 * H]), np.tanh(z[:, 2 * H:3 * H]), sig(z[:, 3 * H:])
        c = f * c + i * g
        h = o * np.tanh(c)
        out.append(h)
    return np.stack(out, 1)


def test_char_lstm_matches_numpy_equations():
    V, L = 7, 5
    model = functional(lambda r: CharLSTM(V, L, embed=3, hidden=4, layers=2, rngs=r))
    params = _random_params(model, seed=1, scale=0.5)
    x = _inputs(dict(num_features=L, num_classes=V), (3,), seed=2)
    logits, feats = jax.jit(model.apply)(params, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = p["embed"]["embedding"][np.asarray(x, np.int64)]
    for i in range(2):
        cell = p["lstms"][i]["cell"]
        h = _np_lstm(h, cell["dense_i"]["kernel"], cell["dense_h"]["kernel"], cell["dense_h"]["bias"])
    np.testing.assert_allclose(logits, h @ p["head"]["kernel"] + p["head"]["bias"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats, h.mean(1), rtol=1e-5, atol=1e-5)


def test_lstm_init_follows_reference():
    """Keras' unit_forget_bias: forget-gate biases start at 1, the other gates at 0."""
    model = fk.make_model("char_lstm", **TINY["char_lstm"])
    bias = np.asarray(model.init(jax.random.key(0))["lstms"][0]["cell"]["dense_h"]["bias"])
    H = bias.shape[0] // 4
    np.testing.assert_array_equal(bias, np.r_[np.zeros(H), np.ones(H), np.zeros(2 * H)])


def test_transformer_is_causal():
    kw = TINY["transformer"]
    model = fk.make_model("transformer", **kw)
    params = _random_params(model, seed=3)
    x = _inputs(kw, (2,), seed=4)
    t = 4
    x2 = x.at[:, t].set((x[:, t] + 1) % kw["num_classes"])
    apply = jax.jit(model.apply)
    (a, _), (b, _) = apply(params, x), apply(params, x2)
    np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(a[:, t:] - b[:, t:])).max() > 1e-4


@pytest.mark.parametrize("kind", ["femnist_cnn", "resnet18_gn", "char_lstm", "transformer"])
def test_vmap_over_clients_equals_separate_applies(kind):
    kw = TINY[kind]
    model = fk.make_model(kind, **kw)
    p0, p1 = _random_params(model, seed=5), _random_params(model, seed=6)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), p0, p1)
    x = _inputs(kw, (2, 3), seed=7)
    logits, feats = jax.jit(jax.vmap(model.apply))(stacked, x)
    apply = jax.jit(model.apply)
    for c, p in enumerate((p0, p1)):
        lc, fc = apply(p, x[c])
        np.testing.assert_allclose(logits[c], lc, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(feats[c], fc, rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(logits)).all()


def test_two_federated_rounds_with_femnist_cnn(digits20):
    model = fk.make_model("femnist_cnn", num_features=64, num_classes=10, image_shape=(8, 8, 1), width=1 / 16)
    alg = fk.fedavg(model, optax.sgd(0.05), optax.sgd(1.0), batch_size=10)
    sim = fk.Simulator(alg, digits20, cohort_size=4, mesh=fk.client_mesh(1))
    data = sim.put_data(digits20)
    state = sim.put_state(sim.init(0))
    before = jax.tree.map(np.asarray, state.server)
    for _ in range(2):
        state, metrics = sim.step(state, data)
    leaves = [np.asarray(a) for a in jax.tree.leaves(state.server)]
    assert all(np.isfinite(a).all() for a in leaves)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(metrics))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), leaves))


def test_config_names_every_model_and_checks_the_data():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.kind=resnet"])
    assert ", ".join(MODELS) in str(e.value)
    for kind in MODELS:
        assert load_config(None, [f"model.kind={kind}"]).model.kind == kind
    with pytest.raises(ConfigError, match="model.width"):
        load_config(None, ["model.width=0"])
    with pytest.raises(ConfigError, match="needs image data"):
        fk.make_model("resnet18_gn", num_features=12, num_classes=3)
    with pytest.raises(ConfigError, match="next-token"):
        fk.make_model("char_lstm", num_features=64, num_classes=10, image_shape=(8, 8, 1))


def test_build_model_reads_width_and_sequence_shape_from_config(digits20):
    from fedkd_jax.builders import build_model

    cfg = load_config(None, ["model.kind=femnist_cnn", "model.width=0.125", "distill.teacher_kind=femnist_cnn"])
    student, teacher = build_model(cfg, digits20), build_model(cfg, digits20, teacher=True)
    assert (student.feature_dim, teacher.feature_dim) == (64, 512)
    tokens = digits20.replace(x=np.zeros((digits20.x.shape[0], 9), np.float32), image_shape=None, num_classes=17)
    lm = build_model(load_config(None, ["model.kind=nwp_lstm", "model.width=0.0625"]), tokens)
    shapes = jax.eval_shape(lm.init, jax.random.key(0))
    out = jax.eval_shape(lm.apply, shapes, jax.ShapeDtypeStruct((2, 9), jnp.float32))
    assert (lm.in_features, out[0].shape) == (9, (2, 9, 17))
