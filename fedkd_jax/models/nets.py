"""flax.nnx networks that return ``(logits, features)``.

``features`` is the penultimate activation (the input of the last linear
layer): distillation losses match it (FitNets hints, FedKD hidden loss).
Inputs arrive flat, ``[B, D]``; the CNN restores its ``image_shape``.
Kernels are He-normal (ReLU nets), biases zero.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_he = nnx.initializers.he_normal()


class MLP(nnx.Module):
    """``D -> hidden[0] -> ... -> hidden[-1] -> K`` with ReLU."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, *, rngs: nnx.Rngs):
        sizes = [in_features, *hidden]
        self.hidden = nnx.List(
            [nnx.Linear(a, b, kernel_init=_he, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
        )
        self.head = nnx.Linear(sizes[-1], num_classes, kernel_init=_he, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = x
        for layer in self.hidden:
            h = jax.nn.relu(layer(h))
        return self.head(h), h


class CNN(nnx.Module):
    """Conv(3x3, ReLU, 2x2 max-pool) blocks, then one dense hidden layer, then logits."""

    def __init__(
        self,
        image_shape: Sequence[int],
        channels: Sequence[int],
        dense: int,
        num_classes: int,
        *,
        rngs: nnx.Rngs,
    ):
        self.image_shape = tuple(int(s) for s in image_shape)
        h, w, c = self.image_shape
        convs = []
        for ch in channels:
            convs.append(nnx.Conv(c, ch, (3, 3), padding="SAME", kernel_init=_he, rngs=rngs))
            c = ch
            h, w = max(h // 2, 1), max(w // 2, 1)
        self.convs = nnx.List(convs)
        self.dense = nnx.Linear(h * w * c, dense, kernel_init=_he, rngs=rngs)
        self.head = nnx.Linear(dense, num_classes, kernel_init=_he, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = x.reshape((x.shape[0], *self.image_shape))
        for conv in self.convs:
            h = jax.nn.relu(conv(h))
            if h.shape[1] >= 2 and h.shape[2] >= 2:
                h = nnx.max_pool(h, (2, 2), strides=(2, 2))
        h = jax.nn.relu(self.dense(h.reshape((h.shape[0], -1))))
        return self.head(h), h
