"""``data.dataset=hf``: Hugging Face ``datasets`` saved to disk, Parquet files, or a
Flower Datasets partitioning, read with ``pyarrow`` (no ``datasets`` import).

``data.path`` is one of:

- a directory written by ``Dataset.save_to_disk`` (``state.json``,
  ``dataset_info.json``, ``data-*.arrow`` in Arrow's streaming format), or by
  ``DatasetDict.save_to_disk`` (``dataset_dict.json`` and one such directory per
  split: ``train`` is read, and ``test`` as the test split);
- a ``.parquet`` file, or a directory of them (the Hub's ``train-*.parquet``,
  ``test-*.parquet``: names starting with ``test`` are the test split, with
  ``valid`` are skipped, the rest train);
- a directory of partitions, one saved dataset (or ``DatasetDict``) per
  subdirectory, as Flower Datasets users write them
  (``fds.load_partition(i).save_to_disk(f"{dir}/partition_{i}")``): each
  subdirectory is a client.

Columns: the client is ``data.client_column``, else the first of
:data:`CLIENT_COLUMNS` present; the label a ``ClassLabel`` column, else the
first of :data:`LABEL_COLUMNS`; the features an ``Image`` column (decoded with
Pillow), else the first of :data:`FEATURE_COLUMNS`, else every other numeric
column (tabular data).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np

from fedkd_jax.data.datasets import Dataset
from fedkd_jax.data.readers.common import Collector, bad, first_line, listing, need_package, need_path
from fedkd_jax.errors import DataError

CLIENT_COLUMNS = ("client_id", "user_id", "writer_id", "client", "user", "partition_id")
LABEL_COLUMNS = ("label", "labels", "fine_label", "y", "target", "character")
FEATURE_COLUMNS = ("image", "img", "pixels", "x", "features")
EXPECTED = ("a directory written by datasets' save_to_disk, a .parquet file or directory of them, or a directory of "
            "saved partitions")


def _pa():
    pa = need_package("pyarrow", "pyarrow", "Hugging Face datasets")
    need_package("pyarrow.parquet", "pyarrow", "Hugging Face datasets")
    return pa


def _read_arrow(path: str):
    pa = _pa()
    try:
        with pa.memory_map(path) as src:
            try:
                return pa.ipc.open_stream(src).read_all()
            except pa.ArrowInvalid:
                src.seek(0)
                return pa.ipc.open_file(src).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise bad(path, f"is not an Arrow IPC file ({first_line(e)})") from None


def _read_parquet(path: str):
    pa = _pa()
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise bad(path, f"is not a Parquet file ({first_line(e)})") from None


def _saved(path: str):
    """A ``save_to_disk`` directory of one split: its table (and the features it declares)."""
    state_file = os.path.join(path, "state.json")
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
        names = [d["filename"] for d in state["_data_files"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise bad(state_file, f"expected datasets' state.json with a '_data_files' list of "
                              f"{{'filename': ...}} ({first_line(e)})") from None
    pa = _pa()
    tables = []
    for n in names:
        if os.path.basename(n) != n:
            raise bad(state_file, f"_data_files names {n!r}, not a plain file name in {path!r}")
        p = os.path.join(path, n)
        if not os.path.isfile(p):
            raise bad(state_file, f"lists data file {n!r}, which is missing")
        tables.append(_read_arrow(p))
    if not tables:
        raise bad(state_file, "lists no data files")
    return pa.concat_tables(tables)


def _splits(path: str) -> dict[str, object]:
    """``{"train": table, "test": table (optional)}`` of one dataset directory or file."""
    if os.path.isfile(path):
        if path.endswith(".parquet"):
            return {"train": _read_parquet(path)}
        if path.endswith(".arrow"):
            return {"train": _read_arrow(path)}
        raise bad(path, f"is neither .parquet nor .arrow; expected {EXPECTED}")
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        try:
            with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as f:
                splits = json.load(f)["splits"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise bad(os.path.join(path, "dataset_dict.json"),
                      f"expected {{'splits': [...]}} ({first_line(e)})") from None
        if "train" not in splits:
            raise bad(path, f"DatasetDict has splits {listing(splits)}; expected a 'train' split")
        return {s: _saved(os.path.join(path, s)) for s in ("train", "test") if s in splits}
    if os.path.isfile(os.path.join(path, "state.json")):
        return {"train": _saved(path)}
    pq_files = sorted(n for n in os.listdir(path) if n.endswith(".parquet"))
    if pq_files:
        pa = _pa()
        groups: dict[str, list] = {}
        for n in pq_files:
            low = n.lower()
            split = "test" if low.startswith("test") else None if "valid" in low else "train"
            if split:
                groups.setdefault(split, []).append(_read_parquet(os.path.join(path, n)))
        if "train" not in groups:
            raise bad(path, f"holds no training .parquet file among {listing(pq_files)}")
        return {s: pa.concat_tables(t) for s, t in groups.items()}
    raise bad(path, f"expected {EXPECTED}; it holds {listing(os.listdir(path))}")


def _partitions(path: str) -> list[str] | None:
    """Subdirectories that are each a saved dataset: a Flower-style partitioning."""
    if not os.path.isdir(path) or any(os.path.isfile(os.path.join(path, f))
                                      for f in ("state.json", "dataset_dict.json")):
        return None
    subs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    marks = ("state.json", "dataset_dict.json")
    saved = [d for d in subs if any(os.path.isfile(os.path.join(path, d, f)) for f in marks)]
    return saved or None


def _features_meta(table) -> dict:
    meta = (table.schema.metadata or {}).get(b"huggingface")
    try:
        return json.loads(meta)["info"]["features"] if meta else {}
    except (ValueError, KeyError, TypeError):
        return {}


def _to_numpy(column, path: str, name: str) -> np.ndarray:
    pa = _pa()
    import pyarrow.compute as pc

    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if arr.null_count:
        raise bad(path, f"column {name!r} holds {arr.null_count} missing value(s)")
    shape = [len(arr)]
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        lens = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        if len(lens) and (lens != lens[0]).any():
            raise bad(path, f"column {name!r} holds lists of different lengths; expected one shape for every row")
        shape.append(int(lens[0]) if len(lens) else 0)
        arr = arr.flatten()
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)):
        raise bad(path, f"column {name!r} holds {arr.type}; expected numbers or lists of numbers")
    return arr.to_numpy(zero_copy_only=False).reshape(shape)


def _images(column, path: str, name: str) -> np.ndarray:
    pil = need_package("PIL.Image", "pillow", "Hugging Face image columns")
    out = []
    for i, v in enumerate(column.to_pylist()):
        data = v.get("bytes") if isinstance(v, dict) else None
        if data is None and isinstance(v, dict) and v.get("path"):
            p = v["path"] if os.path.isabs(v["path"]) else os.path.join(os.path.dirname(path), v["path"])
            data = open(p, "rb").read() if os.path.isfile(p) else None
        if data is None:
            raise bad(path, f"image column {name!r}, row {i}: no image bytes (and no readable path)")
        try:
            a = np.asarray(pil.open(io.BytesIO(data)))
        except Exception as e:  # PIL raises several kinds for undecodable bytes
            raise bad(path, f"image column {name!r}, row {i}: not a decodable image ({first_line(e)})") from None
        out.append(a)
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise bad(path, f"image column {name!r} holds images of different sizes {sorted(shapes)[:3]}")
    return np.stack(out) if out else np.zeros((0, 1))


def _columns(table, path: str, client_column: str | None, meta: dict) -> tuple[str | None, str, list[str]]:
    names = table.column_names
    if client_column and client_column not in names:
        raise DataError("data.client_column", f"{path!r} has no column {client_column!r}; its columns are "
                                              f"{listing(names)}")
    client = client_column or next((c for c in CLIENT_COLUMNS if c in names), None)
    rest = [c for c in names if c != client]
    labels = [c for c in rest if isinstance(meta.get(c), dict) and meta[c].get("_type") == "ClassLabel"]
    label = labels[0] if len(labels) == 1 else next((c for c in LABEL_COLUMNS if c in rest), None)
    if label is None:
        raise bad(path, f"no label column: expected a ClassLabel column or one of {list(LABEL_COLUMNS)}; "
                        f"columns are {listing(names)}")
    rest = [c for c in rest if c != label]
    images = [c for c in rest if isinstance(meta.get(c), dict) and meta[c].get("_type") == "Image"]
    feature = images[:1] or [c for c in FEATURE_COLUMNS if c in rest][:1]
    if not feature:
        pa = _pa()
        feature = [c for c in rest if pa.types.is_integer(table.schema.field(c).type)
                   or pa.types.is_floating(table.schema.field(c).type)]
    if not feature:
        raise bad(path, f"no feature column: expected an Image column, one of {list(FEATURE_COLUMNS)}, or numeric "
                        f"columns; columns are {listing(names)}")
    return client, label, feature


def _xy(table, path: str, label: str, feature: list[str], meta: dict):
    pa = _pa()
    if len(feature) == 1 and (isinstance(meta.get(feature[0]), dict) and meta[feature[0]].get("_type") == "Image"
                              or pa.types.is_struct(table.schema.field(feature[0]).type)):
        x = _images(table.column(feature[0]), path, feature[0])
    elif len(feature) == 1:
        x = _to_numpy(table.column(feature[0]), path, feature[0])
    else:
        x = np.stack([_to_numpy(table.column(c), path, c) for c in feature], axis=1)
    y = _to_numpy(table.column(label), path, label)
    if y.ndim != 1 or (y.dtype.kind == "f" and np.any(y != np.round(y))):
        raise bad(path, f"label column {label!r} must hold one integer class per row")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    return x.astype(np.float32) / scale, y.astype(np.int64)


def load_hf(path: str | None, *, client_column: str | None = None) -> Dataset:
    path = need_path(path, "hf", EXPECTED)
    parts = _partitions(path)
    sources = [(d, _splits(os.path.join(path, d))) for d in parts] if parts else [(None, _splits(path))]
    c = Collector(path)
    shape, classes, any_client = None, 0, parts is not None
    for part, splits in sources:
        for split, table in splits.items():
            meta = _features_meta(table)
            client, label, feature = _columns(table, path, client_column, meta)
            x, y = _xy(table, path, label, feature, meta)
            names = (meta.get(label) or {}).get("names") if isinstance(meta.get(label), dict) else None
            classes = max(classes, len(names) if names else int(y.max(initial=-1)) + 1)
            shape = shape or (x.shape[1:] if x.ndim in (3, 4) else None)
            x = x.reshape(len(x), -1)
            if part is not None:
                c.add(part, x, y, test=split == "test")
            elif client is not None:
                any_client = True
                ids = np.asarray(table.column(client).to_pylist()).astype(str)
                keys, inv = np.unique(ids, return_inverse=True)
                order = np.argsort(inv, kind="stable")
                bounds = np.concatenate([[0], np.cumsum(np.bincount(inv, minlength=len(keys)))])
                for k, name in enumerate(keys):
                    r = order[bounds[k]:bounds[k + 1]]
                    c.add(name, x[r], y[r], test=split == "test")
            else:
                c.add("", x, y, test=split == "test")
    image_shape = None if shape is None else (tuple(shape) if len(shape) == 3 else tuple(shape) + (1,))
    ds = c.dataset("hf", classes, image_shape=image_shape)
    return ds if any_client else ds._replace(client_ids=None, is_test=None)
