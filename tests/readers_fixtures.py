"""Small files in each exact format, written with the format's own library.

tf.train.Example records are encoded by the ``protobuf`` package from a
descriptor built here (an encoder independent of the decoder under test);
FedJAX's blobs by ``msgpack`` + ``zlib`` in FedJAX's layout; HDF5 by
``h5py``; Hugging Face's on-disk layout by ``pyarrow`` (Arrow IPC stream,
``state.json``, ``dataset_info.json``); CIFAR batches by ``pickle``.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import sqlite3
import zlib

import numpy as np


@functools.lru_cache(maxsize=1)
def example_class():
    """``tf.train.Example`` as a protobuf message class, from feature.proto's definitions."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="fedkd_test_example.proto", package="fedkd_test", syntax="proto3")

    def message(name, fields):
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, tname in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if tname:
                f.type_name = tname
        return m

    message("BytesList", [("value", 1, F.TYPE_BYTES, F.LABEL_REPEATED, None)])
    message("FloatList", [("value", 1, F.TYPE_FLOAT, F.LABEL_REPEATED, None)])
    message("Int64List", [("value", 1, F.TYPE_INT64, F.LABEL_REPEATED, None)])
    feature = message("Feature", [
        ("bytes_list", 1, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, ".fedkd_test.BytesList"),
        ("float_list", 2, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, ".fedkd_test.FloatList"),
        ("int64_list", 3, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, ".fedkd_test.Int64List")])
    feature.oneof_decl.add(name="kind")
    for f in feature.field:
        f.oneof_index = 0
    features = message("Features", [("feature", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED,
                                     ".fedkd_test.Features.FeatureEntry")])
    entry = features.nested_type.add(name="FeatureEntry")
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=".fedkd_test.Feature")
    entry.options.map_entry = True
    message("Example", [("features", 1, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, ".fedkd_test.Features")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("fedkd_test.Example"))


def encode_example(**features) -> bytes:
    """Serialize ``{name: floats | ints | list of bytes}`` as a ``tf.train.Example``."""
    e = example_class()()
    for name, value in features.items():
        f = e.features.feature[name]
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], bytes):
            f.bytes_list.value.extend(value)
        else:
            a = np.asarray(value).reshape(-1)
            if a.dtype.kind == "f":
                f.float_list.value.extend(a.tolist())
            else:
                f.int64_list.value.extend(int(v) for v in a)
    return e.SerializeToString()


# ------------------------------------------------------------------ LEAF
def leaf_file(path, users: dict[str, tuple[list, list]], *, drop: str | None = None) -> str:
    d = {"users": list(users), "num_samples": [len(y) for _, y in users.values()],
         "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()}}
    if drop:
        d.pop(drop)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(d, f)
    return str(path)


def femnist_users(rng, names, sizes):
    return {u: (rng.random((n, 784)).round(3).tolist(), rng.integers(0, 62, n).tolist())
            for u, n in zip(names, sizes)}


def leaf_femnist_dir(root, rng) -> tuple[str, dict, dict]:
    """LEAF's layout: train/ (two files) and test/ (one file) with the same writers."""
    train = femnist_users(rng, ["f0003", "f0001", "f0002"], [12, 9, 15])
    test = femnist_users(rng, ["f0003", "f0001", "f0002"], [3, 2, 4])
    items = list(train.items())
    leaf_file(os.path.join(root, "train", "all_data_0_niid_train.json"), dict(items[:2]))
    leaf_file(os.path.join(root, "train", "all_data_1_niid_train.json"), dict(items[2:]))
    leaf_file(os.path.join(root, "test", "all_data_0_niid_test.json"), test)
    return str(root), train, test


# ------------------------------------------------------------------ TFF / FedJAX
def tff_sqlite(path, splits: dict[str, dict[str, list[bytes]]]) -> str:
    """TFF's SqlClientData layout: tables examples and client_metadata."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
                "serialized_example_proto BLOB NOT NULL)")
    con.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, "
                "num_examples INTEGER NOT NULL)")
    for split, clients in splits.items():
        for cid, records in clients.items():
            con.executemany("INSERT INTO examples VALUES (?, ?, ?)", [(split, cid, r) for r in records])
            con.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (cid, split, len(records)))
    con.commit()
    con.close()
    return str(path)


def tff_hdf5(path, clients: dict[str, dict[str, np.ndarray]]) -> str:
    import h5py

    with h5py.File(path, "w") as f:
        for cid, feats in clients.items():
            g = f.create_group(f"examples/{cid}")
            for k, v in feats.items():
                if isinstance(v, list) and v and isinstance(v[0], bytes):
                    g.create_dataset(k, data=np.array(v, dtype=object), dtype=h5py.string_dtype())
                else:
                    g.create_dataset(k, data=np.asarray(v))
    return str(path)


def fedjax_blob(features: dict) -> bytes:
    """FedJAX's client blob: zlib(msgpack map), arrays as ext type 1 (shape, dtype, bytes),
    arrays of bytes as ext type 4 (shape, flat list)."""
    import msgpack

    def ext(x):
        if isinstance(x, np.ndarray) and x.dtype.hasobject:
            return msgpack.ExtType(4, msgpack.packb((x.shape, list(x.reshape(-1))), use_bin_type=True))
        if isinstance(x, np.ndarray):
            return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True))
        raise TypeError(type(x))

    return zlib.compress(msgpack.packb(features, default=ext, strict_types=True))


def fedjax_sqlite(path, clients: dict[str, dict]) -> str:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, data BLOB NOT NULL, "
                "num_examples INTEGER NOT NULL)")
    for cid, feats in clients.items():
        n = len(next(iter(feats.values())))
        con.execute("INSERT INTO federated_data VALUES (?, ?, ?)", (cid.encode(), fedjax_blob(feats), n))
    con.commit()
    con.close()
    return str(path)


# ------------------------------------------------------------------ Hugging Face
def hf_saved(path, table, features: dict | None = None) -> str:
    """``Dataset.save_to_disk``'s layout: an Arrow IPC stream, state.json, dataset_info.json."""
    import pyarrow as pa

    os.makedirs(path, exist_ok=True)
    if features is not None:
        meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
        table = table.replace_schema_metadata(meta)
    with pa.OSFile(os.path.join(path, "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "0",
                   "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                   "_output_all_columns": False, "_split": None}, f)
    with open(os.path.join(path, "dataset_info.json"), "w") as f:
        json.dump({"features": features or {}}, f)
    return str(path)


def hf_dataset_dict(path, splits: dict) -> str:
    os.makedirs(path, exist_ok=True)
    for name, (table, features) in splits.items():
        hf_saved(os.path.join(path, name), table, features)
    with open(os.path.join(path, "dataset_dict.json"), "w") as f:
        json.dump({"splits": list(splits)}, f)
    return str(path)


def png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ CIFAR
def cifar_batch(path, data: np.ndarray, labels, label_key=b"labels") -> None:
    """A batch as the archive holds it: a dict with byte-string keys (written by Python 2)."""
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"batch", label_key: list(labels), b"data": data,
                     b"filenames": [b"x.png"] * len(labels)}, f, protocol=2)
