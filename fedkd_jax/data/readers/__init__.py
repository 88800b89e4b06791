"""Readers for the file formats federated datasets ship in.

One module per format, each returning a :class:`~fedkd_jax.data.Dataset` that
keeps the natural client partition where the format has one
(``client_ids``, and ``is_test`` where the file marks its own test rows):

- :mod:`.leaf`: LEAF's JSON (FEMNIST, Shakespeare, Sent140);
- :mod:`.tff`: TensorFlow Federated's SQLite and HDF5 files and FedJAX's
  SQLite files (federated EMNIST, Shakespeare, Stack Overflow, CIFAR-100),
  decoding ``tf.train.Example`` records with :mod:`.tf_example`;
- :mod:`.hf`: Hugging Face ``datasets`` saved to disk, Parquet, Flower partitions;
- :mod:`.cifar`: CIFAR-10/100 python pickle batches.

Every malformed file raises a :class:`~fedkd_jax.errors.DataError` on
``data.path`` naming the file, the field and what was expected.
"""

from fedkd_jax.data.readers.cifar import load_cifar
from fedkd_jax.data.readers.hf import load_hf
from fedkd_jax.data.readers.leaf import load_leaf
from fedkd_jax.data.readers.tf_example import parse_example
from fedkd_jax.data.readers.tff import load_tff

__all__ = ["load_cifar", "load_hf", "load_leaf", "load_tff", "parse_example"]
