"""Datasets, partitioners and the padded client-stacked :class:`FederatedData`."""

from fedkd_jax.data.datasets import (
    DATASETS,
    TASKS,
    Dataset,
    load_digits,
    load_mnist5k,
    load_npz,
    synthetic,
    validate_dataset,
)
from fedkd_jax.data.federated import FederatedData, federate, load_dataset
from fedkd_jax.data.proxy import PROXY_SOURCES, load_proxy, resize_images
from fedkd_jax.data.partition import (
    PARTITIONS,
    default_min_examples,
    dirichlet,
    dirichlet_balanced,
    dirichlet_client,
    iid,
    natural,
    quantity,
    shards,
)

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "PROXY_SOURCES",
    "TASKS",
    "Dataset",
    "FederatedData",
    "default_min_examples",
    "dirichlet",
    "dirichlet_balanced",
    "dirichlet_client",
    "federate",
    "iid",
    "load_dataset",
    "load_digits",
    "load_mnist5k",
    "load_npz",
    "load_proxy",
    "natural",
    "quantity",
    "resize_images",
    "shards",
    "synthetic",
    "validate_dataset",
]
