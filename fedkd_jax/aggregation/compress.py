"""Compression as a chain transform: the server aggregates what it decompresses.

Wraps a :class:`~fedkd_jax.compression.Compressor` (SVD, top-k, 8-bit). It
runs before the server derives ``aux`` from an upload, and its payload size
becomes the client's ``bytes_up``. The same transform compresses the
server's global update on the way down (``Simulator(downlink=...)``).
"""

from __future__ import annotations

from fedkd_jax.aggregation.base import ClientIn, ClientOut, Transform, no_state
from fedkd_jax.compression import Compressor


def compress(compressor: Compressor) -> Transform:
    def encode(payload, cin: ClientIn):
        update, nbytes = compressor.compress(payload["update"], cin.key, cin.round)
        return dict(payload, update=update), ClientOut(cin.weight, cin.aux_weight, nbytes)

    return Transform(f"compress_{compressor.name}", no_state, encode, None, before_aux=True)
