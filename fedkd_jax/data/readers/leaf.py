"""``data.dataset=leaf``: the JSON files of LEAF (Caldas et al. 2018,
github.com/TalwalkarLab/leaf) for FEMNIST, Shakespeare and Sent140.

Each file is ``{"users": [...], "num_samples": [...], "user_data": {user: {"x":
[...], "y": [...]}}}`` (and optionally ``"hierarchies"``). ``data.path`` is one
such file, a directory of them (every ``*.json`` in it), or a directory with
``train/`` and ``test/`` subdirectories (what LEAF's preprocessing writes):
then each user's rows in ``test/`` are its local test split and all of them
the global test set. The dataset is recognised from the rows:

- ``x`` a list of 784 numbers: FEMNIST, 62 classes, images 28x28x1 (other
  lengths: generic features, ``max(y) + 1`` classes);
- ``x`` an 80-character string, ``y`` the next character: Shakespeare, as
  next-character prediction over LEAF's 80-character vocabulary (id 80 for any
  other character); targets are the window shifted by one plus ``y``;
- ``x`` a list of tweet fields (the text last), ``y`` 0/1: Sent140, as a
  bag of words (counts) over the ``data.vocab_size`` (10,000) words most
  training users use; rows are ``[n, vocab_size]`` float32.
"""

from __future__ import annotations

import json
import os

import numpy as np

from fedkd_jax.data.datasets import Dataset
from fedkd_jax.data.readers import text
from fedkd_jax.data.readers.common import Collector, bad, first_line, listing, need_path
from fedkd_jax.errors import DataError

EXPECTED = "a LEAF .json file, a directory of them, or a directory with train/ and test/"


def _files(path: str) -> list[tuple[str, bool]]:
    """``[(file, is_test)]`` of every JSON file the path names."""
    if os.path.isfile(path):
        return [(path, False)]

    def jsons(d):
        return sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".json"))

    train_dir, test_dir = os.path.join(path, "train"), os.path.join(path, "test")
    if os.path.isdir(train_dir):
        out = [(f, False) for f in jsons(train_dir)] + ([(f, True) for f in jsons(test_dir)]
                                                         if os.path.isdir(test_dir) else [])
    else:
        out = [(f, False) for f in jsons(path)]
    if not any(not t for _, t in out):
        raise bad(path, f"holds no LEAF training .json files (expected {EXPECTED}); it holds "
                        f"{listing(os.listdir(path))}")
    return out


def _read(path: str) -> dict[str, tuple[list, list]]:
    """``{user: (x, y)}`` of one LEAF file, checked against its declared layout."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(path, f"is not a JSON file ({first_line(e)})") from None
    if not isinstance(d, dict):
        raise bad(path, f"holds a JSON {type(d).__name__}; expected an object with users, num_samples and user_data")
    for key in ("users", "user_data"):
        if key not in d:
            raise bad(path, f"lacks field {key!r}; a LEAF file holds 'users', 'num_samples' and 'user_data' "
                            f"(it has {listing(d)})")
    users, data, counts = d["users"], d["user_data"], d.get("num_samples")
    if not isinstance(users, list) or not isinstance(data, dict):
        raise bad(path, "field 'users' must be a list and 'user_data' an object {user: {x, y}}")
    if counts is not None and (not isinstance(counts, list) or len(counts) != len(users)):
        raise bad(path, f"field 'num_samples' must list one count per user ({len(users)} users)")
    out = {}
    for i, u in enumerate(users):
        if u not in data:
            raise bad(path, f"user {u!r} is listed in 'users' but has no entry in 'user_data'")
        rec = data[u]
        if not isinstance(rec, dict) or "x" not in rec or "y" not in rec:
            raise bad(path, f"user_data[{u!r}] must hold lists 'x' and 'y'")
        x, y = rec["x"], rec["y"]
        if not isinstance(x, list) or not isinstance(y, list) or len(x) != len(y):
            raise bad(path, f"user_data[{u!r}]: 'x' and 'y' must be lists of the same length")
        if counts is not None and counts[i] != len(y):
            raise bad(path, f"user {u!r}: num_samples says {counts[i]} but user_data holds {len(y)} rows")
        out[str(u)] = (x, y)
    return out


def _kind(path: str, x0, y0) -> str:
    if isinstance(x0, str) and isinstance(y0, str):
        return "shakespeare"
    number = (int, float)
    if isinstance(x0, list) and x0 and all(isinstance(v, number) for v in x0[:5]) and isinstance(y0, number):
        return "features"
    if isinstance(x0, list) and x0 and isinstance(x0[-1], str) and isinstance(y0, (int, float)):
        return "sent140"
    raise bad(path, f"rows look like neither FEMNIST (x: 784 numbers, y: a class), Shakespeare (x: a string, y: the "
                    f"next character) nor Sent140 (x: tweet fields, y: 0/1); first row x={str(x0)[:60]!r}, y={y0!r}")


def load_leaf(path: str | None, *, seq_len: int | None = None, vocab_size: int | None = None) -> Dataset:
    path = need_path(path, "leaf", EXPECTED)
    parts = [(f, t, _read(f)) for f, t in _files(path)]
    first = next(((f, d) for f, _, d in parts if any(len(v[1]) for v in d.values())), None)
    if first is None:
        raise bad(path, "holds no rows")
    f0, d0 = first
    x0, y0 = next((x[0], y[0]) for x, y in d0.values() if y)
    kind = _kind(f0, x0, y0)
    c = Collector(path)
    if kind == "shakespeare":
        if vocab_size is not None:
            raise DataError("data.vocab_size", "LEAF Shakespeare uses LEAF's fixed 80-character vocabulary; "
                                               "leave data.vocab_size unset")
        if seq_len not in (None, text.LEAF_SEQ_LEN):
            raise DataError("data.seq_len", f"LEAF Shakespeare rows are {text.LEAF_SEQ_LEN}-character windows; "
                                            "leave data.seq_len unset (or 80)")
        for f, is_test, d in parts:
            for u, (x, y) in d.items():
                if any(not isinstance(v, str) for v in x + y):
                    raise bad(f, f"user {u!r}: Shakespeare rows need string x and y")
                c.add(u, *text.leaf_shakespeare_rows(x, y), test=is_test)
        return c.dataset("leaf-shakespeare", text.LEAF_OOV + 1, task="next_token")
    if kind == "sent140":
        for f, _, d in parts:
            for u, (x, _) in d.items():
                if any(not isinstance(r, list) or not r or not isinstance(r[-1], str) for r in x):
                    raise bad(f, f"user {u!r}: Sent140 rows need x = [tweet fields..., text]")
        words = text.build_vocab(([r[-1] for r in x] for _, t, d in parts if not t for x, _ in d.values()),
                                 vocab_size or 10_000)
        vocab = {w: i + 1 for i, w in enumerate(words)}
        for f, is_test, d in parts:
            for u, (x, y) in d.items():
                c.add(u, text.bag_of_words([r[-1] for r in x], vocab), _int_labels(f, u, y), test=is_test)
        return c.dataset("leaf-sent140", 2)
    width = len(x0)
    for f, is_test, d in parts:
        for u, (x, y) in d.items():
            try:
                a = np.asarray(x, np.float32)
            except (TypeError, ValueError):
                raise bad(f, f"user {u!r}: 'x' must be lists of {width} numbers") from None
            if a.ndim != 2 or a.shape[1] != width:
                raise bad(f, f"user {u!r}: 'x' rows must all hold {width} numbers; got shape {a.shape}")
            c.add(u, a, _int_labels(f, u, y), test=is_test)
    femnist = width == 784
    ds = c.dataset("leaf-femnist" if femnist else "leaf", 62, image_shape=(28, 28, 1) if femnist else None)
    return ds if femnist else ds._replace(num_classes=int(ds.y.max()) + 1)


def _int_labels(path: str, user: str, y: list) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.number) or np.any(a != np.round(a)):
        raise bad(path, f"user {user!r}: 'y' must be a list of integer class labels")
    return a.astype(np.int64)
