"""``data.dataset=tff``: federated EMNIST, Shakespeare, Stack Overflow and CIFAR-100
as TensorFlow Federated (SQLite or HDF5) or FedJAX (SQLite) ship them.

``data.path`` names a file (a TFF ``.sqlite`` holding every split; a
``*_train.h5`` or FedJAX ``*_train.sqlite``, whose ``*_test`` sibling, if
present, is read as the test split) or a directory holding one such file. The
dataset is recognised from its features:

- ``pixels`` [28, 28] + ``label``: EMNIST, 62 classes (10 where the file or
  split name says digits), images 28x28x1;
- ``image`` [32, 32, 3] uint8 + ``label`` (FedJAX: ``x`` + ``y``): CIFAR-100, 100
  fine classes, pixels / 255; its 100 test clients are other people than the
  500 training clients, so its test split is only the global test set;
- ``snippets``: Shakespeare, next-character prediction (TFF's 90-id vocabulary,
  ``data.seq_len`` default 80);
- ``tokens``: Stack Overflow, next-word prediction (vocabulary of the
  ``data.vocab_size`` (10,000) words most training clients use, ``data.seq_len``
  default 20). Its ``heldout`` split is not read.
"""

from __future__ import annotations

import os

import numpy as np

from fedkd_jax.data.datasets import Dataset
from fedkd_jax.data.readers import text
from fedkd_jax.data.readers import tff_files as files
from fedkd_jax.data.readers.common import Collector, bad, listing, need_path, sibling
from fedkd_jax.errors import DataError

EXPECTED = "a TFF .sqlite file, a *_train.h5 (TFF HDF5) or *_train.sqlite (FedJAX) file, or a directory with one"


def _resolve(path: str) -> str:
    if os.path.isfile(path):
        return path
    names = sorted(os.listdir(path))
    data = [n for n in names if n.lower().endswith(files.SQLITE_EXT + files.HDF5_EXT)]
    train = [n for n in data if "train" in n.lower()]
    # a TFF SQLite file holds every split under one name without "train"
    whole = [n for n in data
             if n.lower().endswith(files.SQLITE_EXT) and not any(w in n.lower() for w in ("train", "test", "held"))]
    found = train + whole
    if len(found) != 1:
        what = "no" if not found else "several"
        raise bad(path, f"{what} TFF client-data file{'s' if found else ''} found (expected {EXPECTED}); "
                        f"{'set data.path to one of ' + listing(found) if found else 'it holds ' + listing(names)}")
    return os.path.join(path, found[0])


def _splits(path: str) -> tuple[dict, dict | None, str]:
    """(train clients, test clients or None, a description of the source)."""
    low = path.lower()
    if low.endswith(files.HDF5_EXT):
        test = sibling(path, "train", "test")
        return files.read_hdf5(path), files.read_hdf5(test) if test else None, "TFF HDF5"
    kind = files.sqlite_kind(path)
    if kind == "fedjax":
        test = sibling(path, "train", "test")
        return files.read_fedjax_sqlite(path), files.read_fedjax_sqlite(test) if test else None, "FedJAX SQLite"
    train_split, test_splits = files.tff_sqlite_splits(path)
    test = files.read_tff_sqlite(path, test_splits[0]) if test_splits else None
    return files.read_tff_sqlite(path, train_split), test, f"TFF SQLite split {train_split!r}"


def _feature(path: str, client: str, feats: dict, name: str):
    if name not in feats:
        raise bad(path, f"client {client!r} lacks feature {name!r}; it has {listing(feats)}")
    return feats[name]


def _numeric(path: str, client: str, feats: dict, name: str, per_row: int) -> np.ndarray:
    a = _feature(path, client, feats, name)
    if isinstance(a, list):  # raw bytes per example (e.g. uint8 images as bytes_list)
        a = np.stack([np.frombuffer(b, np.uint8) for b in a]) if a else np.zeros((0, per_row))
    a = np.asarray(a)
    a = a.reshape(len(a), -1) if a.ndim else a.reshape(1, -1)
    if a.shape[1] != per_row:
        raise bad(path, f"client {client!r}: feature {name!r} has {a.shape[1]} values per example; expected {per_row}")
    return a


def _labels(path: str, client: str, feats: dict, name: str) -> np.ndarray:
    return _numeric(path, client, feats, name, 1)[:, 0].astype(np.int64)


def _check_text_options(name: str, vocab_size: int | None) -> None:
    if vocab_size is not None:
        raise DataError("data.vocab_size", f"{name} uses a fixed character vocabulary; leave data.vocab_size unset")


def load_tff(path: str | None, *, seq_len: int | None = None, vocab_size: int | None = None) -> Dataset:
    path = _resolve(need_path(path, "tff", EXPECTED))
    train, test, source = _splits(path)
    if not train:
        raise bad(path, "holds no clients in its training split")
    features = set(next(iter(train.values())))
    splits = [(train, False)] + ([(test, True)] if test else [])
    c = Collector(path)
    digits = "digit" in os.path.basename(path).lower() or "digit" in source
    if "pixels" in features:  # EMNIST
        for clients, is_test in splits:
            for cid, f in clients.items():
                c.add(cid, _numeric(path, cid, f, "pixels", 784), _labels(path, cid, f, "label"), test=is_test)
        return c.dataset("tff-emnist", 10 if digits else 62, image_shape=(28, 28, 1))
    if "image" in features or ("x" in features and "y" in features):  # CIFAR-100 (TFF / FedJAX names)
        xk, yk = ("image", "label") if "image" in features else ("x", "y")
        for clients, is_test in splits:
            for cid, f in clients.items():
                x = _numeric(path, cid, f, xk, 32 * 32 * 3).astype(np.float32) / 255.0
                # the test clients are not the training clients: keep them apart
                c.add(("test/" if is_test else "") + cid, x, _labels(path, cid, f, yk), test=is_test)
        return c.dataset("tff-cifar100", 100, image_shape=(32, 32, 3))
    if "snippets" in features:  # Shakespeare
        _check_text_options("Shakespeare", vocab_size)
        L = seq_len or 80
        for clients, is_test in splits:
            for cid, f in clients.items():
                x, y = text.tff_char_rows(_feature(path, cid, f, "snippets"), L)
                c.add(cid, x, y, test=is_test)
        return c.dataset("tff-shakespeare", len(text.TFF_CHARS) + 4, task="next_token",
                         special_tokens=dict(text.TFF_CHAR_TOKENS))
    if "tokens" in features:  # Stack Overflow
        V, L = vocab_size or 10_000, seq_len or 20
        words = text.build_vocab((_feature(path, cid, f, "tokens") for cid, f in train.items()), V)
        vocab = {w: i + 1 for i, w in enumerate(words)}
        for clients, is_test in splits:
            for cid, f in clients.items():
                x, y = text.word_rows(_feature(path, cid, f, "tokens"), vocab, L, V)
                c.add(cid, x, y, test=is_test)
        # the id space is fixed by V even when the training clients use fewer words
        return c.dataset("tff-stackoverflow", V + 4, task="next_token", special_tokens=text.word_tokens(V))
    raise bad(path, f"{source}: features {listing(features)} match none of EMNIST (pixels, label), CIFAR-100 "
                    "(image, label), Shakespeare (snippets) or Stack Overflow (tokens)")
