"""Distillation losses against numpy references and their advertised properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedkd_jax.losses import cross_entropy, fedkd_mutual, hint_loss, kd_loss, kd_mix


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kl(t, s, temp=1.0):
    lt, ls = _np_log_softmax(t / temp), _np_log_softmax(s / temp)
    return (np.exp(lt) * (lt - ls)).sum(-1)


def _np_ce(z, y):
    return -_np_log_softmax(z)[np.arange(len(y)), y]


rng = np.random.default_rng(0)
S = rng.normal(size=(6, 5)).astype(np.float32)
T = rng.normal(size=(6, 5)).astype(np.float32) * 2
Y = rng.integers(0, 5, 6)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0, 8.0])
def test_kd_is_zero_for_equal_logits_and_matches_numpy(temp):
    assert abs(float(kd_loss(jnp.asarray(S), jnp.asarray(S), temperature=temp)[0])) < 1e-6
    got = float(kd_loss(jnp.asarray(S), jnp.asarray(T), temperature=temp)[0])
    np.testing.assert_allclose(got, temp**2 * _np_kl(T, S, temp).mean(), rtol=1e-5)


def test_alpha_one_reduces_to_cross_entropy():
    mix, _ = kd_mix(jnp.asarray(S), jnp.asarray(T), jnp.asarray(Y), alpha=1.0, temperature=3.0)
    ce, _ = cross_entropy(jnp.asarray(S), jnp.asarray(Y))
    np.testing.assert_allclose(float(mix), float(ce), rtol=1e-6)
    np.testing.assert_allclose(float(ce), _np_ce(S, Y).mean(), rtol=1e-5)
    half, _ = kd_mix(jnp.asarray(S), jnp.asarray(T), jnp.asarray(Y), alpha=0.25, temperature=3.0)
    np.testing.assert_allclose(float(half), 0.25 * _np_ce(S, Y).mean() + 0.75 * 9 * _np_kl(T, S, 3.0).mean(), rtol=1e-5)


def test_t_squared_keeps_soft_gradient_magnitude_roughly_constant():
    s = jnp.asarray(rng.normal(size=(64, 10)).astype(np.float32))
    t = jnp.asarray(rng.normal(size=(64, 10)).astype(np.float32))
    scaled, raw = [], []
    for temp in (1.0, 2.0, 4.0, 8.0):
        g = jax.grad(lambda z: kd_loss(z, t, temperature=temp)[0])(s)
        scaled.append(float(jnp.linalg.norm(g)))
        raw.append(scaled[-1] / temp**2)
    assert max(scaled) / min(scaled) < 2.0  # with T^2: within a factor 2 over T = 1..8
    assert max(raw) / min(raw) > 30.0  # without it the soft gradient vanishes like 1/T^2


def test_masked_rows_contribute_nothing():
    where = jnp.array([True, True, False, True, False, True])
    keep = np.asarray(where)
    junk_s = S.copy()
    junk_s[~keep] = 1e3
    for fn in (
        lambda s, w: kd_loss(s, jnp.asarray(T), temperature=2.0, where=w)[0],
        lambda s, w: kd_mix(s, jnp.asarray(T), jnp.asarray(Y), alpha=0.3, temperature=2.0, where=w)[0],
        lambda s, w: cross_entropy(s, jnp.asarray(Y), where=w)[0],
    ):
        a = float(fn(jnp.asarray(S), where))
        b = float(fn(jnp.asarray(junk_s), where))
        np.testing.assert_allclose(a, b, rtol=1e-6)
        g = jax.grad(lambda s: fn(s, where))(jnp.asarray(S))
        assert not np.asarray(g)[~keep].any()
    np.testing.assert_allclose(
        float(kd_loss(jnp.asarray(S), jnp.asarray(T), where=where)[0]), _np_kl(T[keep], S[keep]).mean(), rtol=1e-5
    )
    # an all-padded batch gives zero loss and zero gradient
    none = jnp.zeros(6, bool)
    assert float(cross_entropy(jnp.asarray(S), jnp.asarray(Y), where=none)[0]) == 0.0


def test_hint_loss_is_mse_and_only_trains_the_student_side():
    ps = rng.normal(size=(6, 4)).astype(np.float32)
    tf = rng.normal(size=(6, 4)).astype(np.float32)
    got = float(hint_loss(jnp.asarray(ps), jnp.asarray(tf))[0])
    np.testing.assert_allclose(got, ((ps - tf) ** 2).mean(), rtol=1e-5)
    g_t = jax.grad(lambda t: hint_loss(jnp.asarray(ps), t)[0])(jnp.asarray(tf))
    assert not np.asarray(g_t).any()


def test_fedkd_mutual_matches_numpy_reference():
    tf = rng.normal(size=(6, 4)).astype(np.float32)
    ps = rng.normal(size=(6, 4)).astype(np.float32)
    where = jnp.array([True, True, True, False, True, True])
    keep = np.asarray(where)
    (lt, ls), m = fedkd_mutual(jnp.asarray(T), jnp.asarray(S), jnp.asarray(Y), jnp.asarray(tf), jnp.asarray(ps), where=where)
    t, s, y, a, b = T[keep], S[keep], Y[keep], tf[keep], ps[keep]
    ce_t, ce_s = _np_ce(t, y).mean(), _np_ce(s, y).mean()
    h = ((a - b) ** 2).mean()
    w = 1.0 / (ce_t + ce_s)
    np.testing.assert_allclose(float(lt), ce_t + w * _np_kl(s, t).mean() + w * h, rtol=1e-5)
    np.testing.assert_allclose(float(ls), ce_s + w * _np_kl(t, s).mean() + w * h, rtol=1e-5)
    np.testing.assert_allclose(float(m["kd_weight"]), w, rtol=1e-5)


def test_fedkd_mutual_carries_t_squared_against_numpy():
    tf = rng.normal(size=(6, 4)).astype(np.float32)
    ps = rng.normal(size=(6, 4)).astype(np.float32)
    temp = 3.0
    (lt, ls), _ = fedkd_mutual(jnp.asarray(T), jnp.asarray(S), jnp.asarray(Y), jnp.asarray(tf), jnp.asarray(ps),
                               temperature=temp)
    ce_t, ce_s = _np_ce(T, Y).mean(), _np_ce(S, Y).mean()
    h = ((tf - ps) ** 2).mean()
    w = 1.0 / (ce_t + ce_s)
    np.testing.assert_allclose(float(lt), ce_t + w * temp**2 * _np_kl(S, T, temp).mean() + w * h, rtol=1e-5)
    np.testing.assert_allclose(float(ls), ce_s + w * temp**2 * _np_kl(T, S, temp).mean() + w * h, rtol=1e-5)


def test_fedkd_mutual_soft_gradient_scale_is_invariant_to_temperature():
    # Hinton et al. 2015: for logits small next to T, d KL_T / d s ~ (s - t) / (K T^2), so
    # only the T^2 factor keeps the distillation gradient's scale independent of T.
    # Matched logits: CE terms (and so the adaptive weight) are identical across T.
    s = jnp.asarray(rng.normal(size=(32, 10)).astype(np.float32) * 0.5)
    t = jnp.asarray(rng.normal(size=(32, 10)).astype(np.float32) * 0.5)
    y = jnp.asarray(rng.integers(0, 10, 32))
    feat = jnp.zeros((32, 3))

    def soft_grad(temp):
        def kd_part(z):
            (_, ls), m = fedkd_mutual(t, z, y, feat, feat, temperature=temp)
            return ls - m["ce_student"]  # the distillation term of L_s (hidden term is 0)
        return jax.grad(kd_part)(s)

    norms = {temp: float(jnp.linalg.norm(soft_grad(temp))) for temp in (4.0, 8.0, 16.0)}
    assert max(norms.values()) / min(norms.values()) < 1.1, norms
    # the same gradient direction too: cosine close to 1
    g4, g16 = soft_grad(4.0).ravel(), soft_grad(16.0).ravel()
    assert float(g4 @ g16 / (jnp.linalg.norm(g4) * jnp.linalg.norm(g16))) > 0.99


def test_fedkd_mutual_routes_gradients():
    tf = jnp.asarray(rng.normal(size=(6, 4)).astype(np.float32))
    ps = jnp.asarray(rng.normal(size=(6, 4)).astype(np.float32))
    t, s, y = jnp.asarray(T), jnp.asarray(S), jnp.asarray(Y)

    def only(which):
        def f(tl, sl, tfe, pse):
            (lt, ls), _ = fedkd_mutual(tl, sl, y, tfe, pse)
            return lt if which == "t" else ls
        return jax.grad(f, argnums=(0, 1, 2, 3))(t, s, tf, ps)

    gt = only("t")  # teacher loss: teacher logits and features only
    assert np.asarray(gt[0]).any() and np.asarray(gt[2]).any()
    assert not np.asarray(gt[1]).any() and not np.asarray(gt[3]).any()
    gs = only("s")  # student loss: student logits and projected features only
    assert np.asarray(gs[1]).any() and np.asarray(gs[3]).any()
    assert not np.asarray(gs[0]).any() and not np.asarray(gs[2]).any()
