"""Partitioners: split example indices over clients.

Each returns a list of ``num_clients`` int arrays of example indices, drawn
only from the numpy ``Generator`` it is given, so a seed fixes the split.
"""

from __future__ import annotations

import numpy as np

from fedkd_jax.errors import DataError

PARTITIONS = ("iid", "dirichlet", "shards", "quantity", "natural")


def iid(
    n: int,
    num_clients: int,
    rng: np.random.Generator,
    *,
    examples_per_client: int | None = None,
) -> list[np.ndarray]:
    """Uniform random split.

    Without ``examples_per_client`` the ``n`` examples are dealt out evenly.
    With it, each client gets that many distinct examples; when the population
    needs more than ``n`` in total, clients are resampled independently from the
    pool (a large population built from a small dataset).
    """
    if examples_per_client is None:
        return [np.sort(p) for p in np.array_split(rng.permutation(n), num_clients)]
    if examples_per_client > n:
        raise DataError(
            "data.examples_per_client",
            f"must be at most the {n} training examples; got {examples_per_client}",
        )
    if num_clients * examples_per_client <= n:
        perm = rng.permutation(n)[: num_clients * examples_per_client]
        return [np.sort(p) for p in perm.reshape(num_clients, examples_per_client)]
    return [np.sort(rng.choice(n, examples_per_client, replace=False)) for _ in range(num_clients)]


def dirichlet(
    y: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_examples: int = 2,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label skew: each class is split over clients with proportions ``~ Dir(alpha)``.

    Small ``alpha`` gives each client few classes; ``alpha -> inf`` tends to IID.
    Draws are repeated until every client holds at least ``min_examples``.
    """
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_examples:
            return out
    raise DataError(
        "data.alpha",
        f"Dirichlet(alpha={alpha}) left some of {num_clients} clients with fewer than "
        f"{min_examples} examples in {max_tries} draws; raise data.alpha or lower data.num_clients",
    )


def shards(
    y: np.ndarray,
    num_clients: int,
    shards_per_client: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Pathological non-IID split (McMahan et al. 2017): sort by label, cut into
    ``num_clients * shards_per_client`` shards, give each client ``shards_per_client``."""
    num_shards = num_clients * shards_per_client
    if num_shards > len(y):
        raise DataError(
            "data.shards_per_client",
            f"{num_clients} clients x {shards_per_client} shards needs at least {num_shards} "
            f"examples; the training pool has {len(y)}",
        )
    order = np.argsort(y, kind="stable")
    pieces = np.array_split(order, num_shards)
    assign = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in assign]


def quantity(
    n: int,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_examples: int = 2,
) -> list[np.ndarray]:
    """Quantity skew: client sizes follow ``Dir(alpha)`` proportions (plus a floor of
    ``min_examples``); labels stay IID."""
    if num_clients * min_examples > n:
        raise DataError(
            "data.num_clients",
            f"{num_clients} clients x {min_examples} examples exceeds the {n} training examples",
        )
    p = rng.dirichlet(np.full(num_clients, alpha))
    sizes = min_examples + rng.multinomial(n - num_clients * min_examples, p)
    perm = rng.permutation(n)
    return [np.sort(s) for s in np.split(perm, np.cumsum(sizes)[:-1])]


def natural(client_ids: np.ndarray) -> list[np.ndarray]:
    """The partition the data came with: client ``k`` holds the rows with id ``k``.

    Ids must be ``0..K-1``; a gap means a client with no examples.
    """
    ids = np.asarray(client_ids).astype(np.int64)
    if ids.min(initial=0) < 0:
        raise DataError("data.client", "client ids must be non-negative")
    k = int(ids.max()) + 1 if len(ids) else 0
    counts = np.bincount(ids, minlength=k)
    if (counts == 0).any():
        empty = int(np.argmin(counts))
        raise DataError("data.client", f"client {empty} has no examples (ids must be 0..{k - 1})")
    order = np.argsort(ids, kind="stable")
    return np.split(order, np.cumsum(counts)[:-1])
