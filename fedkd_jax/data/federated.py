"""Client-stacked, padded federated data.

Shape key: ``N`` clients, ``M`` max train examples per client, ``Mt`` max local
test examples, ``D`` features, ``G`` global test examples.
"""

from __future__ import annotations

import numpy as np
from flax import struct

from fedkd_jax.data import datasets as ds_lib
from fedkd_jax.data import partition as part_lib
from fedkd_jax.errors import DataError


@struct.dataclass
class FederatedData:
    """A whole population's data as padded arrays (host numpy or device arrays).

    Attributes:
      x: ``[N, M, D]`` float32 train features, zero past ``counts``.
      y: ``[N, M]`` int32 train labels, zero past ``counts``.
      counts: ``[N]`` int32 number of real train examples per client.
      test_x, test_y, test_counts: the same for each client's local test split.
      global_x: ``[G, D]`` global test features; global_y: ``[G]`` labels.
      proxy_x: ``[P, D]`` unlabeled proxy rows held out for server-side
        distillation (FedDF, server-teacher KD), or ``None``.
      proxy_y: ``[P]`` their labels when the server may know them (held-out
        rows of the task; used only for validation or labeled warm-up), or ``None``.
    """

    x: np.ndarray
    y: np.ndarray
    counts: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    test_counts: np.ndarray
    global_x: np.ndarray
    global_y: np.ndarray
    proxy_x: np.ndarray | None = None
    proxy_y: np.ndarray | None = None
    num_classes: int = struct.field(pytree_node=False, default=10)
    image_shape: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)
    name: str = struct.field(pytree_node=False, default="")

    @property
    def num_clients(self) -> int:
        return int(self.x.shape[0])

    @property
    def max_examples(self) -> int:
        return int(self.x.shape[1])

    @property
    def num_features(self) -> int:
        return int(self.x.shape[2])


def _pad(parts: list[np.ndarray], x: np.ndarray, y: np.ndarray, min_len: int = 1):
    m = max(min_len, max((len(p) for p in parts), default=0))
    xs = np.zeros((len(parts), m, x.shape[1]), np.float32)
    ys = np.zeros((len(parts), m), np.int32)
    counts = np.zeros(len(parts), np.int32)
    for i, p in enumerate(parts):
        xs[i, : len(p)] = x[p]
        ys[i, : len(p)] = y[p]
        counts[i] = len(p)
    return xs, ys, counts


def federate(
    dataset: ds_lib.Dataset,
    *,
    partition: str,
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    examples_per_client: int | None = None,
    test_fraction: float = 0.2,
    global_test_fraction: float = 0.2,
    proxy_fraction: float = 0.0,
    min_examples: int = 2,
) -> FederatedData:
    """Split ``dataset`` over clients and pad it into a :class:`FederatedData`.

    Steps, all driven by ``numpy.random.default_rng(seed)``: hold out a global
    test set (``global_test_fraction``; for the natural partition the global test
    set is the union of the clients' local test splits instead); partition the
    rest; split each client's examples into local train and test
    (``test_fraction``, keeping at least one train example).
    """
    ds_lib.validate_dataset(dataset)
    if partition not in part_lib.PARTITIONS:
        raise DataError("data.partition", f"unknown partition {partition!r}; allowed: {', '.join(part_lib.PARTITIONS)}")
    rng = np.random.default_rng(seed)
    n = len(dataset.y)
    natural = partition == "natural"
    if natural:
        if dataset.client_ids is None:
            raise DataError("data.partition", f"dataset {dataset.name!r} has no natural partition; use iid, dirichlet, shards or quantity")
        pool = np.arange(n)
        g_idx = np.zeros(0, np.int64)
    else:
        n_global = int(round(global_test_fraction * n))
        perm = rng.permutation(n)
        g_idx, pool = np.sort(perm[:n_global]), perm[n_global:]
    proxy_idx = np.zeros(0, np.int64)
    if proxy_fraction > 0:
        if natural:
            raise DataError("data.proxy_fraction", "the natural partition keeps every row with its client; use 0")
        n_proxy = int(round(proxy_fraction * len(pool)))
        proxy_idx, pool = np.sort(pool[:n_proxy]), pool[n_proxy:]
    if not natural:
        resampled = partition == "iid" and examples_per_client is not None
        if num_clients > len(pool) and not resampled:
            raise DataError(
                "data.num_clients",
                f"{num_clients} clients but only {len(pool)} training examples; use at most {len(pool)} clients",
            )
    y_pool = dataset.y[pool]
    if partition == "iid":
        parts = part_lib.iid(len(pool), num_clients, rng, examples_per_client=examples_per_client)
    elif partition == "dirichlet":
        parts = part_lib.dirichlet(y_pool, num_clients, alpha, rng, min_examples=min_examples)
    elif partition == "dirichlet_client":
        parts = part_lib.dirichlet_client(y_pool, num_clients, alpha, rng, examples_per_client=examples_per_client)
    elif partition == "shards":
        parts = part_lib.shards(y_pool, num_clients, shards_per_client, rng)
    elif partition == "quantity":
        parts = part_lib.quantity(len(pool), num_clients, alpha, rng, min_examples=min_examples)
    else:
        parts = part_lib.natural(dataset.client_ids)
        if num_clients and num_clients != len(parts):
            raise DataError(
                "data.num_clients",
                f"the natural partition of {dataset.name!r} has {len(parts)} clients; got {num_clients}",
            )
    parts = [pool[p] for p in parts]
    for i, p in enumerate(parts):
        if len(p) == 0:
            raise DataError("data.partition", f"client {i} has no examples")

    train, test = [], []
    for p in parts:
        p = rng.permutation(p)
        k = min(int(np.floor(test_fraction * len(p))), len(p) - 1)
        test.append(np.sort(p[:k]))
        train.append(np.sort(p[k:]))
    if natural:
        g_idx = np.sort(np.concatenate(test)) if test else g_idx
    x, y, counts = _pad(train, dataset.x, dataset.y)
    tx, ty, tcounts = _pad(test, dataset.x, dataset.y)
    return FederatedData(
        x=x,
        y=y,
        counts=counts,
        test_x=tx,
        test_y=ty,
        test_counts=tcounts,
        global_x=dataset.x[g_idx],
        global_y=dataset.y[g_idx],
        proxy_x=dataset.x[proxy_idx] if len(proxy_idx) else None,
        proxy_y=dataset.y[proxy_idx] if len(proxy_idx) else None,
        num_classes=dataset.num_classes,
        image_shape=dataset.image_shape,
        name=dataset.name,
    )


def load_dataset(name: str, *, path: str | None = None, num_clients: int = 0, seed: int = 0,
                 synthetic_alpha: float = 1.0, synthetic_beta: float = 1.0,
                 max_examples: int | None = None) -> ds_lib.Dataset:
    """Load a dataset by name (one of :data:`fedkd_jax.data.DATASETS`)."""
    if name == "digits":
        return ds_lib.load_digits()
    if name == "mnist5k":
        return ds_lib.load_mnist5k()
    if name == "synthetic":
        return ds_lib.synthetic(synthetic_alpha, synthetic_beta, num_clients, seed=seed, max_examples=max_examples)
    if name == "npz":
        return ds_lib.load_npz(path or "")
    raise DataError("data.dataset", f"unknown dataset {name!r}; allowed: {', '.join(ds_lib.DATASETS)}")
