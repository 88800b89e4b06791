"""The client-data files of TensorFlow Federated and FedJAX, read without either.

Each reader returns ``{client id: {feature: array [n, ...] or list of n bytes}}``
for one split.

- TFF SQLite (current releases; ``tff.simulation.datasets.SqlClientData``): a
  table ``examples (split_name TEXT, client_id TEXT, serialized_example_proto
  BLOB)`` of serialized ``tf.train.Example`` records and a table
  ``client_metadata (client_id, split_name, num_examples)``. One file holds
  every split (``train``/``test``, ``heldout`` for Stack Overflow,
  ``all_train``/``digits_only_train``... for EMNIST).
- TFF HDF5 (earlier releases; ``HDF5ClientData``): ``examples/<client id>/<feature>``,
  one file per split (``fed_emnist_train.h5``, ``fed_emnist_test.h5``).
- FedJAX SQLite (``fedjax.SQLiteFederatedData``): a table ``federated_data
  (client_id BLOB, data BLOB, num_examples INTEGER)`` where ``data`` is a
  zlib-compressed msgpack map of arrays, one file per split.
"""

from __future__ import annotations

import os
import sqlite3
import zlib
from collections import defaultdict
from typing import Any

import numpy as np

from fedkd_jax.data.readers.common import bad, first_line, listing, need_package
from fedkd_jax.data.readers.tf_example import DecodeError, parse_example

Clients = dict  # {client id: {feature: np.ndarray | list[bytes]}}
SQLITE_EXT = (".sqlite", ".sqlite3", ".db")
HDF5_EXT = (".h5", ".hdf5")
TFF_COLUMNS = ("split_name", "client_id", "serialized_example_proto")


def _connect(path: str) -> tuple[sqlite3.Connection, set[str]]:
    try:
        con = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True)
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        raise bad(path, f"is not an SQLite database ({first_line(e)})") from None
    return con, tables


def sqlite_kind(path: str) -> str:
    """``tff`` (table ``examples``) or ``fedjax`` (table ``federated_data``)."""
    con, tables = _connect(path)
    con.close()
    if "examples" in tables:
        return "tff"
    if "federated_data" in tables:
        return "fedjax"
    raise bad(path, "expected a TFF SQLite file (tables 'examples' and 'client_metadata') or a FedJAX one "
                    f"(table 'federated_data'); it has tables {listing(tables)}")


def pick_split(names: set[str], word: str) -> str | None:
    """``word`` itself, else ``all_<word>`` (EMNIST's 62 classes), else the one name ending in it."""
    if word in names:
        return word
    if f"all_{word}" in names:
        return f"all_{word}"
    ends = sorted(n for n in names if n.endswith(word))
    return ends[0] if len(ends) == 1 else None


def tff_sqlite_splits(path: str) -> tuple[str, list[str]]:
    """The train split name and the test split names (0 or 1) of a TFF SQLite file."""
    con, tables = _connect(path)
    try:
        missing = {"examples", "client_metadata"} - tables
        if missing:
            raise bad(path, f"a TFF SQLite file needs tables 'examples' and 'client_metadata'; table(s) "
                            f"{listing(missing)} missing (it has {listing(tables)})")
        cols = {r[1] for r in con.execute("PRAGMA table_info(examples)")}
        lack = [c for c in TFF_COLUMNS if c not in cols]
        if lack:
            raise bad(path, f"table 'examples' lacks column(s) {lack}; expected {list(TFF_COLUMNS)}")
        names = {r[0] for r in con.execute("SELECT DISTINCT split_name FROM examples")}
    except sqlite3.DatabaseError as e:
        raise bad(path, f"could not be read as SQLite ({first_line(e)})") from None
    finally:
        con.close()
    train = pick_split(names, "train")
    if train is None:
        raise bad(path, f"no training split in column 'split_name' of table 'examples': it holds {listing(names)}; "
                        "expected 'train' (or 'all_train')")
    test = pick_split(names, "test")
    return train, [test] if test else []


def read_tff_sqlite(path: str, split: str) -> Clients:
    con, _ = _connect(path)
    per: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    try:
        rows = con.execute("SELECT rowid, client_id, serialized_example_proto FROM examples "
                           "WHERE split_name = ? ORDER BY rowid", (split,))
        for rowid, client, blob in rows:
            if not isinstance(blob, (bytes, memoryview)):
                raise bad(path, f"row {rowid} of table 'examples': serialized_example_proto is "
                                f"{type(blob).__name__}, expected bytes of a serialized tf.train.Example")
            try:
                feats = parse_example(blob)
            except DecodeError as e:
                raise bad(path, f"row {rowid} of table 'examples' (client {client!r}, split {split!r}): "
                                f"serialized_example_proto is not a tf.train.Example ({e})") from None
            for k, v in feats.items():
                per[str(client)][k].append(v)
    except sqlite3.DatabaseError as e:
        raise bad(path, f"could not be read as SQLite ({first_line(e)})") from None
    finally:
        con.close()
    return {c: {k: [e[0] if e else b"" for e in v] if isinstance(v[0], list) else _stack(path, c, k, v)
                for k, v in f.items()} for c, f in per.items()}


def _stack(path: str, client: str, feature: str, values: list[np.ndarray]) -> np.ndarray:
    sizes = {len(v) for v in values}
    if len(sizes) > 1:
        raise bad(path, f"client {client!r}: feature {feature!r} has examples of different lengths {sorted(sizes)}")
    return np.stack(values)


def _msgpack_hook(code: int, data: bytes) -> Any:
    import msgpack

    if code in (1, 3):  # ndarray / numpy scalar: (shape, dtype name, C-order bytes)
        shape, dtype, buf = msgpack.unpackb(data, raw=True)
        a = np.frombuffer(buf, dtype=np.dtype(dtype.decode())).reshape(shape)
        return a[()] if code == 3 else a
    if code == 4:  # array of bytes objects: (shape, flat list)
        shape, flat = msgpack.unpackb(data, raw=True)
        return list(flat) if len(shape) == 1 else np.array(flat, dtype=object).reshape(shape)
    raise ValueError(f"unknown msgpack extension type {code}")


def read_fedjax_sqlite(path: str) -> Clients:
    msgpack = need_package("msgpack", "msgpack", "FedJAX SQLite files")
    con, tables = _connect(path)
    out: Clients = {}
    try:
        cols = {r[1] for r in con.execute("PRAGMA table_info(federated_data)")}
        if not {"client_id", "data"} <= cols:
            raise bad(path, f"table 'federated_data' needs columns client_id and data; it has {listing(cols)}")
        for client, blob in con.execute("SELECT client_id, data FROM federated_data ORDER BY rowid"):
            name = client.decode("utf-8", errors="replace") if isinstance(client, bytes) else str(client)
            try:
                feats = msgpack.unpackb(zlib.decompress(blob), ext_hook=_msgpack_hook, raw=False)
            except Exception as e:  # zlib.error, msgpack's errors, ValueError
                raise bad(path, f"client {name!r}: column data is not zlib-compressed msgpack of arrays "
                                f"({first_line(e)})") from None
            if not isinstance(feats, dict):
                raise bad(path, f"client {name!r}: column data holds a {type(feats).__name__}, expected a map "
                                "of feature arrays")
            out[name] = feats
    except sqlite3.DatabaseError as e:
        raise bad(path, f"could not be read as SQLite ({first_line(e)})") from None
    finally:
        con.close()
    return out


def read_hdf5(path: str) -> Clients:
    h5py = need_package("h5py", "h5py", "TFF HDF5 files")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise bad(path, f"is not an HDF5 file ({first_line(e)})") from None
    with f:
        if "examples" not in f or not isinstance(f["examples"], h5py.Group):
            raise bad(path, "expected TFF's HDF5 layout examples/<client_id>/<feature>; it has top-level keys "
                            f"{listing(f.keys())}")
        out: Clients = {}
        for client, group in f["examples"].items():
            if not isinstance(group, h5py.Group):
                raise bad(path, f"examples/{client} is a dataset; expected a group of feature arrays")
            feats = {}
            for k, d in group.items():
                a = d[()]
                feats[k] = list(a) if a.dtype.kind in "OSU" else np.asarray(a)
            out[str(client)] = feats
    return out
