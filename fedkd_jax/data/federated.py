"""An index-based federated population.

Shape key: ``R`` pooled rows, ``D`` features, ``N`` clients, ``T`` rows over
all clients' training splits, ``M`` the largest client, ``G`` global test rows.

Examples are stored once, in the pool ``x [R, D]``; each client is a list of
row indices (CSR: ``train_rows [T]`` with ``train_offsets [N + 1]``, and the
same for local test splits). No ``[N, M, D]`` copy exists: a round gathers
only its cohort's rows, on the device. A million clients of 40 rows cost 160
MB of indices, whatever the row width.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from fedkd_jax.data import datasets as ds_lib
from fedkd_jax.data import partition as part_lib
from fedkd_jax.data.partition import Partition
from fedkd_jax.errors import DataError


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedData:
    """A population: pooled rows and each client's row indices (host numpy).

    Attributes:
      x: ``[R, D]`` float32 pooled features; y: ``[R]`` int32 labels. Token
        tasks (next-token prediction): ``x [R, L]`` token ids (as float32) and
        ``y [R, L]`` int32 targets, negative at padding. In a pool file
        (``data.pool=disk``) both are read-only memory maps, token ids and labels in
        the narrowest integer type that holds them (:mod:`fedkd_jax.store.pool_file`);
        the global test and proxy sets are always in memory, float32 / int32.
      train_rows, train_offsets: client ``i`` trains on pool rows
        ``train_rows[train_offsets[i]:train_offsets[i+1]]``.
      test_rows, test_offsets: the same for each client's local test split.
      global_x: ``[G, D]`` global test features; global_y: ``[G]`` labels.
      proxy_x: ``[P, D]`` unlabeled proxy rows for server-side distillation
        (FedDF, server-teacher KD), or ``None``.
      proxy_y: ``[P]`` their labels when the server may know them (held-out
        rows of the task; used only for validation or labeled warm-up), or ``None``.
    """

    x: np.ndarray
    y: np.ndarray
    train_rows: np.ndarray
    train_offsets: np.ndarray
    test_rows: np.ndarray
    test_offsets: np.ndarray
    global_x: np.ndarray
    global_y: np.ndarray
    proxy_x: np.ndarray | None = None
    proxy_y: np.ndarray | None = None
    num_classes: int = 10
    image_shape: tuple[int, ...] | None = None
    name: str = ""
    task: str = "classification"  # or "next_token": x [R, L] token ids, y [R, L] targets (< 0: padding)
    special_tokens: dict[str, int] | None = None  # token tasks: ids of pad / oov / bos / eos where the data has them
    accuracy_ignore: tuple[int, ...] = ()  # token tasks: label ids left out of accuracy (e.g. OOV, EOS)

    def replace(self, **changes) -> "FederatedData":
        return dataclasses.replace(self, **changes)

    @property
    def num_clients(self) -> int:
        return len(self.train_offsets) - 1

    @functools.cached_property
    def counts(self) -> np.ndarray:
        """``[N]`` int32 training rows per client."""
        return np.diff(self.train_offsets).astype(np.int32)

    @functools.cached_property
    def test_counts(self) -> np.ndarray:
        return np.diff(self.test_offsets).astype(np.int32)

    @property
    def max_examples(self) -> int:
        return max(1, int(self.counts.max(initial=0)))

    @property
    def max_test_examples(self) -> int:
        return max(1, int(self.test_counts.max(initial=0)))

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    def client_rows(self, i: int, *, test: bool = False) -> np.ndarray:
        rows, off = (self.test_rows, self.test_offsets) if test else (self.train_rows, self.train_offsets)
        return rows[off[i]:off[i + 1]]

    def client(self, i: int, *, test: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(x [n, D], y [n])`` of client ``i``'s train (or local test) split."""
        r = self.client_rows(i, test=test)
        return self.x[r], self.y[r]

    def row_table(self, ids: np.ndarray, *, test: bool = False, width: int | None = None) -> np.ndarray:
        """``[len(ids), width]`` int32 pool rows of clients ``ids``, padded with row 0.

        ``width`` defaults to the largest client. Ids ``>= N`` (padding) give empty rows.
        """
        rows, off = (self.test_rows, self.test_offsets) if test else (self.train_rows, self.train_offsets)
        width = width or (self.max_test_examples if test else self.max_examples)
        ids = np.asarray(ids, np.int64)
        n = self.num_clients
        safe = np.minimum(ids, n - 1)
        start, count = off[safe], np.where(ids < n, off[safe + 1] - off[safe], 0)
        pos = np.arange(width)
        idx = start[:, None] + pos[None, :]
        ok = pos[None, :] < count[:, None]
        if len(rows) == 0:  # no client has rows of this split (e.g. data.test_fraction=0)
            return np.zeros(idx.shape, np.int32)
        return np.where(ok, rows[np.where(ok, idx, 0)], 0).astype(np.int32)

    def copied(self) -> "FederatedData":
        """The same population with every client's rows copied into its own pool
        rows (the layout of a per-client padded copy); rounds are identical."""
        def copy(rows, off):
            return np.arange(len(rows), dtype=np.int64), off

        tr, toff = copy(self.train_rows, self.train_offsets)
        te, teoff = copy(self.test_rows, self.test_offsets)
        x = np.concatenate([self.x[self.train_rows], self.x[self.test_rows]])
        y = np.concatenate([self.y[self.train_rows], self.y[self.test_rows]])
        return self.replace(x=x, y=y, train_rows=tr, train_offsets=toff, test_rows=te + len(tr), test_offsets=teoff)


def split_train_test(part: Partition, test_fraction: float, rng: np.random.Generator) -> tuple[Partition, Partition]:
    """Split each client's rows: ``min(floor(f * n), n - 1)`` random rows go to its
    local test split (at least one row stays for training). Vectorised over
    clients; each split is sorted by row."""
    sizes = part.sizes
    n = len(sizes)
    if test_fraction <= 0:
        return part, Partition(np.zeros(0, part.rows.dtype), np.zeros(n + 1, np.int64))
    seg = np.repeat(np.arange(n), sizes)
    order = np.lexsort((rng.random(len(part.rows)), seg))  # a random order within each client
    shuffled = part.rows[order]
    k = np.minimum(np.floor(test_fraction * sizes).astype(np.int64), np.maximum(sizes - 1, 0))
    pos = np.arange(len(shuffled)) - np.repeat(part.offsets[:-1], sizes)
    is_test = pos < np.repeat(k, sizes)

    def sub(mask, counts):
        rows, s = shuffled[mask], seg[mask]
        o = np.lexsort((rows, s))
        return Partition(rows[o], np.concatenate([[0], np.cumsum(counts)]))

    return sub(~is_test, sizes - k), sub(is_test, k)


LABEL_PARTITIONS = ("dirichlet", "dirichlet_balanced", "dirichlet_client", "shards")


def _natural_with_split(dataset: ds_lib.Dataset, rng: np.random.Generator, num_clients: int | None,
                        ) -> tuple[Partition, Partition, np.ndarray]:
    """The file's own split: clients are the ids holding training rows; each client's
    local test split is its rows of the file's test split (maybe none); the global test
    set is every test row (also those of test-only clients, id -1)."""
    ids = np.asarray(dataset.client_ids).astype(np.int64)
    is_test = np.asarray(dataset.is_test, bool)
    train_idx = np.flatnonzero(~is_test)
    test_idx = np.flatnonzero(is_test)
    if not len(train_idx):
        raise DataError("data.path", f"{dataset.name!r}: the file's training split holds no rows")
    clients, inverse = np.unique(ids[train_idx], return_inverse=True)
    if num_clients and num_clients < len(clients):
        chosen = np.sort(rng.choice(len(clients), num_clients, replace=False))
        keep = np.isin(inverse, chosen)
        train_idx, inverse = train_idx[keep], np.searchsorted(chosen, inverse[keep])
        clients = clients[chosen]
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(clients))
    train = Partition(train_idx[order], np.concatenate([[0], np.cumsum(counts)]))
    pos = np.searchsorted(clients, ids[test_idx])
    owned = (pos < len(clients)) & (clients[np.minimum(pos, len(clients) - 1)] == ids[test_idx])
    t_rows, t_client = test_idx[owned], pos[owned]
    order = np.lexsort((t_rows, t_client))
    t_counts = np.bincount(t_client, minlength=len(clients))
    test = Partition(t_rows[order], np.concatenate([[0], np.cumsum(t_counts)]))
    return train, test, test_idx


def federate(
    dataset: ds_lib.Dataset,
    *,
    partition: str,
    num_clients: int | None,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    examples_per_client: int | None = None,
    test_fraction: float = 0.2,
    global_test_fraction: float = 0.2,
    proxy_fraction: float = 0.0,
    min_examples: int | None = None,
    max_examples_per_client: int | None = None,
) -> FederatedData:
    """Split ``dataset`` over clients into an index-based :class:`FederatedData`.

    Steps, all driven by ``numpy.random.default_rng(seed)``: hold out a global
    test set (``global_test_fraction``; for the natural partition the global test
    set is the union of the clients' local test splits instead) and the proxy
    rows (``proxy_fraction``); partition the rest; split each client's rows
    into local train and test (``test_fraction``, keeping at least one train row).
    ``min_examples`` (``dirichlet``, ``dirichlet_balanced``, ``quantity``):
    unset, the partition's default (:func:`~fedkd_jax.data.partition.default_min_examples`).

    The natural partition keeps the data's own clients: ``num_clients`` unset
    (``None`` or 0) keeps all of them, a smaller number a seeded choice of that
    many. Where the file carries its own test split (``dataset.is_test``), each
    client's local test rows are its rows of that split and the global test set
    is the whole split (``test_fraction`` is not used). ``max_examples_per_client``
    then keeps at most that many training rows of each client (a seeded choice).
    """
    ds_lib.validate_dataset(dataset)
    if partition not in part_lib.PARTITIONS:
        raise DataError("data.partition", f"unknown partition {partition!r}; allowed: {', '.join(part_lib.PARTITIONS)}")
    if dataset.task == "next_token" and partition in LABEL_PARTITIONS:
        raise DataError("data.partition", f"{partition!r} splits by class label, but next-token data has a label per "
                                          "token, not per row; use natural, iid or quantity")
    rng = np.random.default_rng(seed)
    n = len(dataset.y)
    natural = partition == "natural"
    own_split = natural and dataset.is_test is not None
    if natural:
        if dataset.client_ids is None:
            raise DataError("data.partition", f"dataset {dataset.name!r} has no natural partition; use iid, dirichlet, shards or quantity")
        pool = np.arange(n)
        g_idx = np.zeros(0, np.int64)
    else:
        if num_clients is None:
            raise DataError("data.num_clients", f"partition {partition!r} needs a number of clients")
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
    if min_examples is None:
        min_examples = part_lib.default_min_examples(partition)
    y_pool = dataset.y[pool] if partition in LABEL_PARTITIONS else None
    if own_split:
        train, test, g_idx = _natural_with_split(dataset, rng, num_clients)
    else:
        if partition == "iid":
            parts = part_lib.iid(len(pool), num_clients, rng, examples_per_client=examples_per_client)
        elif partition == "dirichlet":
            parts = part_lib.dirichlet(y_pool, num_clients, alpha, rng, min_examples=min_examples)
        elif partition == "dirichlet_balanced":
            parts = part_lib.dirichlet_balanced(y_pool, num_clients, alpha, rng, min_examples=min_examples)
        elif partition == "dirichlet_client":
            parts = part_lib.dirichlet_client(y_pool, num_clients, alpha, rng, examples_per_client=examples_per_client)
        elif partition == "shards":
            parts = part_lib.shards(y_pool, num_clients, shards_per_client, rng)
        elif partition == "quantity":
            parts = part_lib.quantity(len(pool), num_clients, alpha, rng, min_examples=min_examples)
        else:
            parts = part_lib.natural(dataset.client_ids)
            if num_clients and num_clients > len(parts):
                raise DataError(
                    "data.num_clients",
                    f"the natural partition of {dataset.name!r} has {len(parts)} clients; got {num_clients} "
                    "(unset it to keep them all, or choose fewer)",
                )
            if num_clients and num_clients < len(parts):
                chosen = np.sort(rng.choice(len(parts), num_clients, replace=False))
                parts = part_lib.Partition.from_lists([parts[int(i)] for i in chosen])
        parts = parts.map_rows(pool)
        empty = np.flatnonzero(parts.sizes == 0)
        if len(empty):
            raise DataError("data.partition", f"client {int(empty[0])} has no examples")
        train, test = split_train_test(parts, test_fraction, rng)
        if natural:
            g_idx = np.sort(test.rows) if len(test.rows) else g_idx
    if own_split and num_clients and num_clients > len(train):
        raise DataError("data.num_clients", f"the natural partition of {dataset.name!r} has {len(train)} "
                                            f"clients; got {num_clients} (unset it to keep them all, or choose fewer)")
    if max_examples_per_client is not None:
        train = part_lib.cap(train, int(max_examples_per_client), rng)
    # a pool file's rows stay mapped, in their narrow type (cast when a dispatch gathers them)
    mapped = isinstance(dataset.x, np.memmap)
    x = dataset.x if mapped else np.asarray(dataset.x, np.float32)
    y = dataset.y if mapped else np.asarray(dataset.y, np.int32)
    idx_dtype = np.int32 if len(x) < 2**31 else np.int64
    return FederatedData(
        x=x,
        y=y,
        train_rows=train.rows.astype(idx_dtype, copy=False),
        train_offsets=train.offsets,
        test_rows=test.rows.astype(idx_dtype, copy=False),
        test_offsets=test.offsets,
        global_x=np.asarray(x[g_idx], np.float32),
        global_y=np.asarray(y[g_idx], np.int32),
        proxy_x=np.asarray(x[proxy_idx], np.float32) if len(proxy_idx) else None,
        proxy_y=np.asarray(y[proxy_idx], np.int32) if len(proxy_idx) else None,
        num_classes=dataset.num_classes,
        image_shape=dataset.image_shape,
        name=dataset.name,
        task=dataset.task,
        special_tokens=dataset.special_tokens,
        accuracy_ignore=tuple(v for k, v in (dataset.special_tokens or {}).items() if k in ("oov", "eos"))
        if dataset.task == "next_token" else (),
    )


def load_dataset(name: str, *, path: str | None = None, num_clients: int = 50, seed: int = 0,
                 synthetic_alpha: float = 1.0, synthetic_beta: float = 1.0,
                 max_examples: int | None = None, task: str = "classification", seq_len: int | None = None,
                 vocab_size: int | None = None, client_column: str | None = None) -> ds_lib.Dataset:
    """Load a dataset by name from :data:`DATASET_LOADERS`.

    Raises:
      DataError: the data cannot be read, or it is for another ``task`` than the
        one asked for (e.g. Shakespeare is ``next_token`` data).
    """
    if name not in DATASET_LOADERS:
        raise DataError("data.dataset", f"unknown dataset {name!r}; allowed: {', '.join(ds_lib.DATASETS)}")
    if task not in ds_lib.TASKS:
        raise DataError("data.task", f"unknown task {task!r}; allowed: {', '.join(ds_lib.TASKS)}")
    ds = DATASET_LOADERS[name](path=path, num_clients=num_clients, seed=seed, synthetic_alpha=synthetic_alpha,
                               synthetic_beta=synthetic_beta, max_examples=max_examples, task=task, seq_len=seq_len,
                               vocab_size=vocab_size, client_column=client_column)
    if ds.task != task:
        what = {"next_token": "next-token sequences (x [n, L] token ids, y [n, L] targets)",
                "classification": "one class label per row"}[ds.task]
        raise DataError("data.task", f"{ds.name!r} holds {what}; set data.task={ds.task} (got {task})")
    return ds


def _readers():
    from fedkd_jax.data import readers  # imported on first use: most runs read no files

    return readers


# The dataset registry: a new dataset is its loader plus one line here (and its name in DATASETS).
DATASET_LOADERS = {
    "digits": lambda **kw: ds_lib.load_digits(),
    "mnist5k": lambda **kw: ds_lib.load_mnist5k(),
    "synthetic": lambda *, synthetic_alpha, synthetic_beta, num_clients, seed, max_examples, **kw: ds_lib.synthetic(
        synthetic_alpha, synthetic_beta, num_clients, seed=seed, max_examples=max_examples),
    "npz": lambda *, path, task, **kw: ds_lib.load_npz(path or "", task=task),
    "leaf": lambda *, path, seq_len, vocab_size, **kw: _readers().load_leaf(path, seq_len=seq_len,
                                                                            vocab_size=vocab_size),
    "tff": lambda *, path, seq_len, vocab_size, **kw: _readers().load_tff(path, seq_len=seq_len, vocab_size=vocab_size),
    "hf": lambda *, path, client_column, **kw: _readers().load_hf(path, client_column=client_column),
    "cifar10": lambda *, path, **kw: _readers().load_cifar("cifar10", path),
    "cifar100": lambda *, path, **kw: _readers().load_cifar("cifar100", path),
}
