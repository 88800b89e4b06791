"""Datasets, partitioners and the padded client-stacked :class:`FederatedData`."""

from fedkd_jax.data.datasets import (
    DATASETS,
    Dataset,
    load_digits,
    load_mnist5k,
    load_npz,
    synthetic,
    validate_dataset,
)
from fedkd_jax.data.federated import FederatedData, federate, load_dataset
from fedkd_jax.data.partition import PARTITIONS, dirichlet, iid, natural, quantity, shards

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "Dataset",
    "FederatedData",
    "dirichlet",
    "federate",
    "iid",
    "load_dataset",
    "load_digits",
    "load_mnist5k",
    "load_npz",
    "natural",
    "quantity",
    "shards",
    "synthetic",
    "validate_dataset",
]
