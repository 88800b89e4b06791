"""``data.dataset=cifar10 | cifar100``: the python pickle batches of Krizhevsky's
archives (www.cs.toronto.edu/~kriz/cifar.html), read offline.

Layouts (inside ``cifar-10-batches-py/`` and ``cifar-100-python/``):

- CIFAR-10: ``data_batch_1`` .. ``data_batch_5`` (training), ``test_batch``,
  ``batches.meta``; each batch a pickled dict with ``data`` (uint8 [10000, 3072],
  the red, green and blue 32x32 planes of each image) and ``labels``;
- CIFAR-100: ``train``, ``test``, ``meta``; ``data`` and ``fine_labels``
  (``coarse_labels`` are not used).

``data.path`` is that directory, its parent, or the ``.tar.gz`` archive
itself; unset, the reader looks in ``./data``, ``~/.keras/datasets`` and
``~/.cache/fedkd_jax``. The pickles were written by Python 2 (byte-string
keys); they are unpickled with only numpy's array reconstruction allowed,
so a file that is not a CIFAR batch cannot run code. No client partition:
pick one with ``data.partition``. The test batch is pooled with the training
batches (the partition's global test set is drawn from all 60,000 images).
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np

from fedkd_jax.data.datasets import Dataset
from fedkd_jax.data.readers.common import bad, first_line
from fedkd_jax.errors import DataError

SPEC = {
    "cifar10": dict(folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz", classes=10, label="labels",
                    files=[f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
    "cifar100": dict(folder="cifar-100-python", archive="cifar-100-python.tar.gz", classes=100, label="fine_labels",
                     files=["train", "test"]),
}
URL = "https://www.cs.toronto.edu/~kriz/"
SEARCH = ("data", "~/.keras/datasets", "~/.cache/fedkd_jax")
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        d = _Unpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError... from arbitrary bytes
        raise bad(where, f"is not a CIFAR pickle batch ({first_line(e)})") from None
    if not isinstance(d, dict):
        raise bad(where, f"holds a pickled {type(d).__name__}; expected a CIFAR batch dict with data and labels")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _batch(raw: bytes, where: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(raw, where)
    for key in ("data", label_key):
        if key not in d:
            raise bad(where, f"lacks key {key!r}; a CIFAR batch holds 'data' and {label_key!r} "
                             f"(it has {sorted(map(str, d))})")
    data, labels = np.asarray(d["data"]), np.asarray(d[label_key])
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
        raise bad(where, f"'data' must be uint8 [n, 3072] and {label_key!r} [n]; got {data.shape} and {labels.shape}")
    # rows hold the R, G, B planes one after another: [n, 3, 32, 32] -> images [n, 32, 32, 3]
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).reshape(len(data), -1)
    return x, labels.astype(np.int64)


def _locate(name: str, path: str | None) -> str:
    spec = SPEC[name]
    tried = []
    roots = [os.path.expanduser(path)] if path else [os.path.expanduser(p) for p in SEARCH]
    for root in roots:
        for cand in (root, os.path.join(root, spec["folder"]), os.path.join(root, spec["archive"])):
            tried.append(cand)
            if os.path.isfile(cand) and cand.endswith((".tar.gz", ".tgz", ".tar")):
                return cand
            if os.path.isdir(cand) and os.path.isfile(os.path.join(cand, spec["files"][0])):
                return cand
    where = ", ".join(repr(t) for t in tried)
    raise DataError("data.path", f"{name}: no {spec['folder']}/ batches or {spec['archive']} found; looked in "
                                 f"{where}. Download {URL}{spec['archive']} (and extract it, or point data.path at "
                                 "the archive)")


def load_cifar(name: str, path: str | None = None) -> Dataset:
    spec = SPEC[name]
    src = _locate(name, path)
    blobs: dict[str, tuple[bytes, str]] = {}
    if os.path.isfile(src):
        try:
            with tarfile.open(src) as tar:
                for m in tar.getmembers():
                    base = os.path.basename(m.name)
                    if m.isfile() and base in spec["files"]:
                        blobs[base] = (tar.extractfile(m).read(), f"{src}:{m.name}")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise bad(src, f"is not a readable tar archive ({first_line(e)})") from None
    else:
        for f in spec["files"]:
            p = os.path.join(src, f)
            if os.path.isfile(p):
                with open(p, "rb") as fh:
                    blobs[f] = (fh.read(), p)
    missing = [f for f in spec["files"] if f not in blobs]
    if missing:
        raise bad(src, f"lacks {name} batch file(s) {missing}; expected {spec['files']} ({URL}{spec['archive']})")
    xs, ys = zip(*(_batch(*blobs[f], spec["label"]) for f in spec["files"]))
    x = (np.concatenate(xs).astype(np.float32) / 255.0)
    return Dataset(name, x, np.concatenate(ys).astype(np.int32), spec["classes"], (32, 32, 3))
