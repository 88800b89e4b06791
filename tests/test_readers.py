"""Readers of the formats federated datasets ship in (issue 17): fixtures written in
each exact format by the format's own library (tests/readers_fixtures.py); the
client partition, shapes and values read back; an error naming file and field
for each malformed file; one end-to-end run on a LEAF fixture."""

import os
import pickle
import sqlite3
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import fedkd_jax as fk
from fedkd_jax.config import load_config
from fedkd_jax.data.readers import load_cifar, load_hf, load_leaf, load_tff, parse_example, text
from fedkd_jax.data.readers.tf_example import DecodeError
from fedkd_jax.errors import ConfigError, DataError
from tests import readers_fixtures as fx


def _rows(ds, client_name_order, i):
    """Rows of the i-th client name (ids follow sorted names)."""
    cid = sorted(client_name_order).index(client_name_order[i])
    return np.flatnonzero(ds.client_ids == cid)


# ------------------------------------------------------------------ tf.train.Example
def test_example_decoder_matches_protobuf_encoder():
    rec = fx.encode_example(pixels=np.array([0.5, -1.25, 3.0], np.float32), label=np.array([7, -3, 2**40]),
                            snippets=[b"to be", b""])
    out = parse_example(rec)
    np.testing.assert_array_equal(out["pixels"], np.array([0.5, -1.25, 3.0], np.float32))
    np.testing.assert_array_equal(out["label"], [7, -3, 2**40])
    assert out["snippets"] == [b"to be", b""]
    # unpacked repeated numbers (legal on the wire; hand-encoded): float 1.5 and int64 -2 one per field
    float_list = b"\x0d" + np.float32(1.5).tobytes()
    int_list = b"\x08" + b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01"
    entry = lambda key, feat: b"\x0a" + bytes([len(key)]) + key + b"\x12" + bytes([len(feat)]) + feat
    f1, f2 = b"\x12" + bytes([len(float_list)]) + float_list, b"\x1a" + bytes([len(int_list)]) + int_list
    ea, eb = entry(b"a", f1), entry(b"b", f2)
    feats = b"\x0a" + bytes([len(ea)]) + ea + b"\x0a" + bytes([len(eb)]) + eb
    out = parse_example(b"\x0a" + bytes([len(feats)]) + feats)
    assert out["a"].tolist() == [1.5] and out["b"].tolist() == [-2]
    for junk in (b"\x0a\x50abc", b"\x0f", b"\x0a\x02\x0a"):
        with pytest.raises(DecodeError):
            parse_example(junk)


# ------------------------------------------------------------------ LEAF
def test_leaf_femnist_keeps_writers_and_its_test_split(tmp_path):
    root, train, test = fx.leaf_femnist_dir(tmp_path / "femnist", np.random.default_rng(0))
    ds = load_leaf(root)
    assert ds.name == "leaf-femnist" and ds.num_classes == 62 and ds.image_shape == (28, 28, 1)
    assert ds.x.shape == (36 + 9, 784) and ds.task == "classification"
    names = sorted(train)  # ids follow sorted writer names
    for k, u in enumerate(names):
        rows = np.flatnonzero((ds.client_ids == k) & ~ds.is_test)
        np.testing.assert_allclose(ds.x[rows], np.asarray(train[u][0], np.float32))
        np.testing.assert_array_equal(ds.y[rows], train[u][1])
        assert (ds.is_test[ds.client_ids == k]).sum() == len(test[u][1])
    fd = fk.federate(ds, partition="natural", num_clients=None, seed=0)
    assert fd.num_clients == 3
    np.testing.assert_array_equal(fd.counts, [len(train[u][1]) for u in names])
    np.testing.assert_array_equal(fd.test_counts, [len(test[u][1]) for u in names])
    assert len(fd.global_y) == 9  # the file's test split, not test_fraction
    # a seeded subset of the writers, and the papers' per-client cap
    two = fk.federate(ds, partition="natural", num_clients=2, seed=0, max_examples_per_client=10)
    assert two.num_clients == 2 and two.counts.max() <= 10 and len(two.global_y) == 9
    with pytest.raises(DataError, match="has 3 clients"):
        fk.federate(ds, partition="natural", num_clients=4, seed=0)


def test_leaf_shakespeare_is_next_character_prediction(tmp_path):
    window = ("To be, or not to be: that is the question" * 2)[:80]
    users = {"HAMLET": ([window, window[1:] + "x"], ["x", "~"]), "OPHELIA": ([window], ["T"])}
    path = fx.leaf_file(tmp_path / "shakespeare.json", users)
    ds = load_leaf(path)
    assert ds.task == "next_token" and ds.num_classes == 81 and ds.x.shape == (3, 80) and ds.y.shape == (3, 80)
    ids = text.leaf_char_ids(window)
    r = _rows(ds, list(users), 0)
    np.testing.assert_array_equal(ds.x[r[0]], ids)
    np.testing.assert_array_equal(ds.y[r[0]], np.append(ids[1:], text.LEAF_LETTERS.index("x")))
    assert ds.y[r[1], -1] == text.LEAF_OOV  # "~" is outside LEAF's 80 letters
    with pytest.raises(DataError, match="set data.task=next_token") as e:
        fk.data.load_dataset("leaf", path=path)
    assert e.value.field == "data.task"
    with pytest.raises(DataError, match="80-character windows"):
        load_leaf(path, seq_len=20)


def test_leaf_sent140_is_a_bag_of_words(tmp_path):
    row = lambda t: ["1467810369", "Mon Apr 06 22:19:45 PDT 2009", "NO_QUERY", "user", t]
    users = {"alice": ([row("good good day"), row("bad day")], [1, 0]), "bob": ([row("good night")], [1])}
    ds = load_leaf(fx.leaf_file(tmp_path / "sent140.json", users), vocab_size=3)
    # vocabulary: the 3 words most users use: good (2 users), day, bad/night by count then name -> bad
    assert ds.num_classes == 2 and ds.x.shape == (3, 3)
    r = _rows(ds, list(users), 0)
    np.testing.assert_array_equal(ds.x[r[0]], [2, 1, 0])  # good, day, bad
    np.testing.assert_array_equal(ds.y[r], [1, 0])


@pytest.mark.parametrize("case, words", [
    ("no_user_data", "lacks field 'user_data'"),
    ("count", "num_samples says 5"),
    ("json", "is not a JSON file"),
    ("missing_user", "has no entry in 'user_data'"),
])
def test_leaf_malformed_files_name_file_and_field(tmp_path, case, words):
    p = tmp_path / "bad.json"
    users = fx.femnist_users(np.random.default_rng(0), ["u1"], [3])
    if case == "no_user_data":
        fx.leaf_file(p, users, drop="user_data")
    elif case == "count":
        p.write_text('{"users": ["u1"], "num_samples": [5], "user_data": {"u1": {"x": [[1.0]], "y": [0]}}}')
    elif case == "json":
        p.write_text("{not json")
    else:
        p.write_text('{"users": ["u1", "u2"], "user_data": {"u1": {"x": [[1.0]], "y": [0]}}}')
    with pytest.raises(DataError, match=words) as e:
        load_leaf(str(p))
    assert e.value.field == "data.path" and "bad.json" in str(e.value)


# ------------------------------------------------------------------ TFF SQLite / HDF5, FedJAX SQLite
def _emnist_records(rng, n):
    px = rng.random((n, 28, 28)).astype(np.float32)
    lab = rng.integers(0, 62, n)
    return px, lab, [fx.encode_example(pixels=p, label=[v]) for p, v in zip(px, lab)]


def test_tff_sqlite_emnist_reads_all_train_and_all_test(tmp_path):
    rng = np.random.default_rng(1)
    tr = {c: _emnist_records(rng, n) for c, n in (("f0001_14", 5), ("f0000_10", 4))}
    te = {c: _emnist_records(rng, 2) for c in tr}
    digits = {"f0000_10": _emnist_records(rng, 3)}  # another split in the same file, not read
    path = fx.tff_sqlite(tmp_path / "emnist_all.sqlite", {
        "all_train": {c: r[2] for c, r in tr.items()}, "all_test": {c: r[2] for c, r in te.items()},
        "digits_only_train": {c: r[2] for c, r in digits.items()}})
    ds = load_tff(str(tmp_path))  # the directory holding the one file
    assert ds.name == "tff-emnist" and ds.num_classes == 62 and ds.image_shape == (28, 28, 1)
    assert len(ds.y) == 9 + 4 and ds.is_test.sum() == 4
    k = 1  # "f0001_14" sorts second
    rows = np.flatnonzero((ds.client_ids == k) & ~ds.is_test)
    np.testing.assert_array_equal(ds.x[rows], tr["f0001_14"][0].reshape(5, 784))
    np.testing.assert_array_equal(ds.y[rows], tr["f0001_14"][1])
    fd = fk.federate(ds, partition="natural", num_clients=None, seed=0)
    assert fd.num_clients == 2 and fd.test_counts.tolist() == [2, 2]
    assert load_tff(path).x.shape == ds.x.shape


def test_tff_stackoverflow_vocabulary_and_sequences(tmp_path):
    sent = {"u1": [b"how do i sort a list", b"sort it"], "u2": [b"a list of lists ?"]}
    path = fx.tff_sqlite(tmp_path / "stackoverflow.sqlite", {
        "train": {u: [fx.encode_example(tokens=[s], title=[b"t"], score=[1]) for s in ss] for u, ss in sent.items()},
        "test": {"u2": [fx.encode_example(tokens=[b"sort unknownword"], title=[b"t"], score=[0])]},
        "heldout": {"u3": [fx.encode_example(tokens=[b"x"], title=[b"t"], score=[0])]}})
    ds = load_tff(path, vocab_size=4, seq_len=5)
    # the 4 words most users use: a, list (2 users each); then sort (used twice); then by name ("?" < "do")
    vocab = {w: i + 1 for i, w in enumerate(text.build_vocab(sent.values(), 4))}
    assert list(vocab) == ["a", "list", "sort", "?"]
    t = text.word_tokens(4)
    assert ds.task == "next_token" and ds.num_classes == 8 and ds.special_tokens == t
    assert ds.x.shape == (4, 5) and len(np.unique(ds.client_ids)) == 2  # heldout not read
    r = _rows(ds, ["u1", "u2"], 0)
    # "sort it": [bos, sort, oov(it), eos, pad, pad] -> x = first 5, y = last 5 with pad -> -1
    np.testing.assert_array_equal(ds.x[r[1]], [t["bos"], vocab["sort"], t["oov"], t["eos"], 0])
    np.testing.assert_array_equal(ds.y[r[1]], [vocab["sort"], t["oov"], t["eos"], -1, -1])
    # a sentence longer than seq_len keeps its first 5 words and no end token
    np.testing.assert_array_equal(ds.y[r[0]], [t["oov"], t["oov"], t["oov"], vocab["sort"], vocab["a"]])


def test_tff_hdf5_shakespeare_and_cifar100_with_separate_test_clients(tmp_path):
    pytest.importorskip("h5py")
    fx.tff_hdf5(tmp_path / "shakespeare_train.h5", {"THE_TEMPEST_ARIEL": {"snippets": [b"All hail, great master!"]},
                                                    "KING_LEAR_FOOL": {"snippets": [b"Nuncle", b"Marry"]}})
    fx.tff_hdf5(tmp_path / "shakespeare_test.h5", {"KING_LEAR_FOOL": {"snippets": [b"Fool"]}})
    ds = load_tff(str(tmp_path / "shakespeare_train.h5"), seq_len=10)
    assert ds.task == "next_token" and ds.num_classes == 90 and ds.x.shape[1] == 10
    # "All hail, great master!" = 23 chars + bos + eos = 25 -> padded to 33 = 3 rows of 11
    assert (ds.client_ids == 1).sum() == 3 and ds.is_test.sum() == 1
    tok = text.TFF_CHAR_TOKENS
    r = np.flatnonzero(ds.client_ids == 1)[0]
    assert ds.x[r, 0] == tok["bos"] and ds.x[r, 1] == text.TFF_CHARS.index("A") + 1 and ds.y[r, 0] == ds.x[r, 1]

    rng = np.random.default_rng(2)
    img = {c: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for c, n in (("0", 3), ("1", 2))}
    fx.tff_hdf5(tmp_path / "fed_cifar100_train.h5",
                {c: {"image": v, "label": np.arange(len(v)), "coarse_label": np.zeros(len(v), int)}
                 for c, v in img.items()})
    fx.tff_hdf5(tmp_path / "fed_cifar100_test.h5", {"0": {"image": img["1"], "label": [5, 6], "coarse_label": [0, 0]}})
    ds = load_tff(str(tmp_path / "fed_cifar100_train.h5"))
    assert ds.name == "tff-cifar100" and ds.num_classes == 100 and ds.image_shape == (32, 32, 3)
    np.testing.assert_allclose(ds.x[ds.client_ids == 0], img["0"].reshape(3, -1) / 255.0, rtol=1e-6)
    # test client "0" is not training client "0": its rows are global test rows only
    fd = fk.federate(ds, partition="natural", num_clients=None, seed=0)
    assert fd.num_clients == 2 and fd.test_counts.sum() == 0 and fd.global_y.tolist() == [5, 6]


def test_fedjax_sqlite_emnist_with_its_test_file(tmp_path):
    rng = np.random.default_rng(3)
    train = {"a": {"pixels": rng.random((4, 28, 28)).astype(np.float32), "label": np.array([0, 1, 2, 3], np.int32)},
             "b": {"pixels": rng.random((2, 28, 28)).astype(np.float32), "label": np.array([4, 5], np.int32)}}
    fx.fedjax_sqlite(tmp_path / "federated_emnist_digitsonly_train.sqlite", train)
    fx.fedjax_sqlite(tmp_path / "federated_emnist_digitsonly_test.sqlite",
                     {"a": {"pixels": np.zeros((1, 28, 28), np.float32), "label": np.array([9], np.int32)}})
    ds = load_tff(str(tmp_path / "federated_emnist_digitsonly_train.sqlite"))
    assert ds.num_classes == 10 and len(ds.y) == 7 and ds.is_test.sum() == 1
    np.testing.assert_array_equal(ds.x[:4], train["a"]["pixels"].reshape(4, -1))
    np.testing.assert_array_equal(ds.y[ds.is_test], [9])


def test_tff_malformed_files(tmp_path):
    p = tmp_path / "x.sqlite"
    con = sqlite3.connect(p)
    con.execute("CREATE TABLE other (a TEXT)")
    con.commit()
    con.close()
    with pytest.raises(DataError, match="tables 'examples' and 'client_metadata'.*it has tables \\['other'\\]"):
        load_tff(str(p))
    q = tmp_path / "y" / "emnist.sqlite"
    q.parent.mkdir()
    fx.tff_sqlite(q, {"train": {"c": [b"\x0a\x50garbage"]}})
    with pytest.raises(DataError, match="row 1 of table 'examples'.*not a tf.train.Example"):
        load_tff(str(q))
    con = sqlite3.connect(q)
    con.execute("ALTER TABLE examples RENAME COLUMN serialized_example_proto TO proto")
    con.commit()
    con.close()
    with pytest.raises(DataError, match="lacks column\\(s\\) \\['serialized_example_proto'\\]"):
        load_tff(str(q))
    (tmp_path / "z.sqlite").write_bytes(b"not a database at all" * 10)
    with pytest.raises(DataError, match="is not an SQLite database"):
        load_tff(str(tmp_path / "z.sqlite"))


def test_tff_hdf5_malformed_and_h5py_missing(tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "fed_train.h5", "w") as f:
        f.create_dataset("pixels", data=np.zeros(3))
    with pytest.raises(DataError, match="examples/<client_id>/<feature>.*\\['pixels'\\]") as e:
        load_tff(str(tmp_path / "fed_train.h5"))
    assert "fed_train.h5" in str(e.value)
    fx.tff_hdf5(tmp_path / "odd_train.h5", {"c": {"words": [b"a"]}})
    with pytest.raises(DataError, match="match none of EMNIST"):
        load_tff(str(tmp_path / "odd_train.h5"))
    monkeypatch.setitem(sys.modules, "h5py", None)  # as if not installed
    with pytest.raises(DataError, match="needs the 'h5py' package: pip install 'fedkd_jax\\[formats\\]'"):
        load_tff(str(tmp_path / "odd_train.h5"))


# ------------------------------------------------------------------ Hugging Face / Flower
def _image_table(rng, n, users):
    import pyarrow as pa

    imgs = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, n)
    table = pa.table({"img": [{"bytes": fx.png(a), "path": None} for a in imgs], "label": labels,
                      "client_id": users})
    features = {"img": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": ["a", "b", "c"]},
                "client_id": {"dtype": "string", "_type": "Value"}}
    return imgs, labels, table, features


def test_hf_saved_dataset_dict_with_client_column_and_images(tmp_path):
    rng = np.random.default_rng(4)
    imgs, labels, train, feats = _image_table(rng, 6, ["w2", "w1", "w2", "w1", "w2", "w3"])
    timgs, tlabels, test, _ = _image_table(rng, 2, ["w1", "w9"])
    path = fx.hf_dataset_dict(tmp_path / "ds", {"train": (train, feats), "test": (test, feats)})
    ds = load_hf(path)
    assert ds.num_classes == 3 and ds.image_shape == (4, 4, 3) and ds.x.shape == (8, 48)
    w2 = np.flatnonzero((ds.client_ids == 1) & ~ds.is_test)  # sorted: w1, w2, w3, w9
    np.testing.assert_allclose(ds.x[w2], imgs[[0, 2, 4]].reshape(3, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y[w2], labels[[0, 2, 4]])
    fd = fk.federate(ds, partition="natural", num_clients=None, seed=0)
    assert fd.num_clients == 3 and fd.test_counts.tolist() == [1, 0, 0] and len(fd.global_y) == 2
    with pytest.raises(DataError, match="no column 'speaker'") as e:
        load_hf(path, client_column="speaker")
    assert e.value.field == "data.client_column"


def test_hf_parquet_and_flower_partitions(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.table({"user_id": [3, 1, 3], "x": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], "y": [0, 1, 1]})
    pq.write_table(t, tmp_path / "train-00000-of-00001.parquet")
    ds = load_hf(str(tmp_path / "train-00000-of-00001.parquet"))
    assert ds.x[ds.client_ids == 1].tolist() == [[1, 2], [5, 6]] and ds.x[ds.client_ids == 0].tolist() == [[3, 4]]
    # a table without a client column: no natural partition
    pq.write_table(t.drop(["user_id"]), tmp_path / "plain.parquet")
    assert load_hf(str(tmp_path / "plain.parquet")).client_ids is None
    # Flower: one saved dataset per partition directory (tabular columns)
    for i, n in enumerate([3, 2]):
        tab = pa.table({"f1": np.arange(n, dtype=np.float32), "f2": np.full(n, i, np.float32), "label": [i] * n})
        fx.hf_saved(tmp_path / "flower" / f"partition_{i}", tab)
    ds = load_hf(str(tmp_path / "flower"))
    assert ds.x.shape == (5, 2) and np.bincount(ds.client_ids).tolist() == [3, 2] and ds.num_classes == 2
    np.testing.assert_array_equal(ds.x[ds.client_ids == 1, 1], [1, 1])


def test_hf_malformed(tmp_path):
    import pyarrow as pa

    d = fx.hf_saved(tmp_path / "a", pa.table({"x": [1.0], "label": [0]}))
    (tmp_path / "a" / "state.json").write_text('{"_fingerprint": "0"}')
    with pytest.raises(DataError, match="state.json.*'_data_files'"):
        load_hf(d)
    fx.hf_saved(tmp_path / "b", pa.table({"x": [1.0], "name": ["z"]}))
    with pytest.raises(DataError, match="no label column.*columns are \\['name', 'x'\\]"):
        load_hf(str(tmp_path / "b"))
    (tmp_path / "c.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(DataError, match="c.parquet.*is not a Parquet file"):
        load_hf(str(tmp_path / "c.parquet"))


# ------------------------------------------------------------------ CIFAR
def _cifar10_dir(root, rng):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    data = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, 2)
        fx.cifar_batch(d / name, x, y)
        data[name] = (x, y)
    fx.cifar_batch(d / "batches.meta", np.zeros((0, 3072), np.uint8), [])
    return d, data


def test_cifar10_batches_directory_and_archive(tmp_path):
    d, data = _cifar10_dir(tmp_path, np.random.default_rng(5))
    ds = load_cifar("cifar10", str(tmp_path))  # the parent of cifar-10-batches-py
    assert ds.x.shape == (12, 3072) and ds.image_shape == (32, 32, 3) and ds.num_classes == 10
    x, y = data["data_batch_1"]
    # R, G, B planes -> height, width, channel: pixel (0, 1) of image 0 is (R[1], G[1], B[1])
    img = ds.x[0].reshape(32, 32, 3)
    np.testing.assert_allclose(img[0, 1], x[0, [1, 1025, 2049]] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y[:2], y)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(d, arcname="cifar-10-batches-py")
    arch = load_cifar("cifar10", str(tmp_path / "cifar-10-python.tar.gz"))
    np.testing.assert_array_equal(arch.x, ds.x)


def test_cifar_missing_and_malformed(tmp_path):
    with pytest.raises(DataError, match="looked in .*https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"):
        load_cifar("cifar100", str(tmp_path))
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    fx.cifar_batch(d / "train", np.zeros((2, 3072), np.uint8), [1, 2], label_key=b"fine_labels")
    (d / "test").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="test.*pickled list; expected a CIFAR batch"):
        load_cifar("cifar100", str(d))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (d / "test").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DataError, match="is not a CIFAR pickle batch.*refusing"):
        load_cifar("cifar100", str(d))
    fx.cifar_batch(d / "test", np.zeros((2, 100), np.uint8), [1, 2], label_key=b"fine_labels")
    with pytest.raises(DataError, match="'data' must be uint8 \\[n, 3072\\]"):
        load_cifar("cifar100", str(d))


# ------------------------------------------------------------------ npz, config, end to end
def test_npz_clients_default_to_natural_and_token_npz(tmp_path):
    from fedkd_jax.builders import build_data

    p = tmp_path / "d.npz"
    np.savez(p, x=np.random.default_rng(0).random((30, 4)), y=np.arange(30) % 3, client=np.arange(30) % 6)
    fd = build_data(load_config(None, ["data.dataset=npz", f"data.path={p}", "run.cohort_size=2"]))
    assert fd.num_clients == 6  # data.partition=auto: the file's clients, all of them
    tok = tmp_path / "t.npz"
    x = np.random.default_rng(0).integers(0, 9, (12, 5))
    y = np.where(np.arange(5) < 4, np.roll(x, -1, axis=1), -1)
    np.savez(tok, x=x, y=y, client=np.arange(12) % 3)
    cfg = load_config(None, ["data.dataset=npz", f"data.path={tok}", "data.task=next_token", "run.cohort_size=2"])
    fd = build_data(cfg)
    assert fd.task == "next_token" and fd.y.shape == (12, 5) and fd.num_classes == 9 and fd.num_clients == 3
    with pytest.raises(DataError, match="next-token data has a label per token"):
        fk.federate(fk.data.load_npz(str(tok), task="next_token"), partition="dirichlet", num_clients=3, seed=0)


def test_max_examples_per_client_caps_every_partition(digits):
    fd = fk.federate(digits, partition="dirichlet", num_clients=10, seed=0)
    capped = fk.federate(digits, partition="dirichlet", num_clients=10, seed=0, max_examples_per_client=20)
    assert (capped.counts == np.minimum(fd.counts, 20)).all() and (capped.test_counts == fd.test_counts).all()
    for i in range(10):  # a subset of the client's own rows
        assert set(capped.client_rows(i)) <= set(fd.client_rows(i))
    again = fk.federate(digits, partition="dirichlet", num_clients=10, seed=0, max_examples_per_client=20)
    np.testing.assert_array_equal(again.train_rows, capped.train_rows)


@pytest.mark.parametrize("overrides, field, words", [
    (["data.task=next_token"], "data.task", "next_token needs token sequences"),
    (["data.dataset=leaf"], "data.path", "needs data.path="),
    (["data.dataset=cifar10", "data.partition=natural"], "data.partition", "'cifar10' has none"),
    (["data.vocab_size=100"], "data.vocab_size", "applies to the text data"),
    (["data.dataset=tff", "data.path=/nonexistent/x.sqlite"], "data.path", "no such file"),
    (["data.max_examples_per_client=0"], "data.max_examples_per_client", "positive integer"),
    (["data.task=words"], "data.task", "classification, next_token"),
])
def test_new_config_keys_are_validated(overrides, field, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert e.value.field == field and words in str(e.value)


def test_leaf_femnist_end_to_end_and_cli_error(tmp_path):
    root, _, _ = fx.leaf_femnist_dir(tmp_path / "femnist", np.random.default_rng(6))
    res = fk.run({"algorithm": "fedavg", "data": {"dataset": "leaf", "path": root},
                  "model": {"kind": "mlp", "hidden": [16]},
                  "run": {"rounds": 2, "cohort_size": 2, "eval_every": 1, "rounds_per_dispatch": 1,
                          "checkpoint_every": 2, "progress": False}}, str(tmp_path / "run"))
    assert len(res.rows) == 2 and np.isfinite(res.final["test_accuracy"])
    bad = fx.leaf_file(tmp_path / "bad" / "x.json", {}, drop="user_data")
    out = subprocess.run([sys.executable, "-m", "fedkd_jax.cli", "run", "--set", "data.dataset=leaf",
                          "--set", f"data.path={bad}", "--out", str(tmp_path / "r2")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "lacks field 'user_data'" in out.stderr + out.stdout


def test_readers_public_api():
    from fedkd_jax.data import readers

    for name in readers.__all__:
        assert getattr(readers, name) is not None, name
    assert {"leaf", "tff", "hf", "cifar10", "cifar100"} <= set(fk.data.DATASETS) and fk.data.TASKS
