"""The field's reference image models (flax.nnx), each returning ``(logits, features)``.

* :class:`FemnistCNN` -- the CNN of McMahan et al. 2017 ("Communication-Efficient
  Learning of Deep Networks from Decentralized Data", Sec. 3): two 5x5
  convolutions of 32 and 64 channels, each with ReLU and 2x2 max pooling, a
  512-unit dense ReLU layer and the softmax layer. On 28x28x1 it has
  1,663,370 parameters for 10 classes (the paper's figure) and 1,690,046 for
  FEMNIST's 62. Layer for layer TensorFlow Federated's
  ``create_original_fedavg_cnn_model`` (``same`` padding everywhere).
* :class:`FemnistCNNDropout` -- the EMNIST CNN of Reddi et al. 2021
  ("Adaptive Federated Optimization", EMNIST CR; google-research/federated
  ``create_conv_dropout_model``): 3x3 convolutions of 32 and 64 channels
  (``valid`` padding, ReLU), one 2x2 max pool, dropout 0.25, a 128-unit dense
  ReLU layer, dropout 0.5, the softmax layer: 1,206,590 parameters for 62
  classes. ``apply`` takes no random key, so **both dropout layers are
  omitted** (the model always runs as at evaluation time); the training-time
  regularisation of the reference is therefore not reproduced.
* :class:`ResNet18GN` -- ResNet-18 (He et al. 2016) with GroupNorm in place of
  BatchNorm, as proposed for non-IID federated training by Hsieh et al. 2020
  ("The Non-IID Data Quagmire") and used by Reddi et al. 2021 on CIFAR-100:
  a CIFAR stem (one 3x3 convolution, no max pool), four stages of two
  BasicBlocks (64/128/256/512 channels, stride 2 from stage two on, 1x1
  projection shortcuts), GroupNorm with 2 groups (Reddi et al.'s setting: the
  default of TensorFlow Addons' ``GroupNormalization`` their code calls),
  global average pooling -> ``features [B, 512]``, dense -> logits.
  11,220,132 parameters for 100 classes. Reddi et al.'s own code builds a
  pre-activation (v2) network with an ImageNet stem (7x7 stride-2
  convolution and 3x3 max pool) on 24x24 crops and no stride between stages;
  this module is the CIFAR ResNet-18 most federated papers use instead.

Inputs arrive flat, ``[B, D]``; each model restores its ``image_shape``
``(H, W, C)``. ``width`` scales every hidden channel/unit count (the head
stays ``num_classes``); 1 is the papers' size.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

_glorot = nnx.initializers.glorot_normal()  # Keras' GlorotNormal, as in the TFF reference models
_he = nnx.initializers.he_normal()


def scaled(n: int, width: float, multiple: int = 1) -> int:
    """``n * width`` rounded to a positive multiple of ``multiple``."""
    return max(multiple, int(round(n * width / multiple)) * multiple)


class FemnistCNN(nnx.Module):
    """McMahan et al. 2017's CNN (the "original FedAvg CNN"); see the module docstring."""

    def __init__(self, image_shape: Sequence[int], num_classes: int, *, width: float = 1.0, rngs: nnx.Rngs):
        self.image_shape = tuple(int(s) for s in image_shape)
        h, w, c = self.image_shape
        self.in_features = h * w * c
        c1, c2, dense = scaled(32, width), scaled(64, width), scaled(512, width)
        conv = dict(kernel_size=(5, 5), padding="SAME", kernel_init=_glorot, rngs=rngs)
        self.conv1 = nnx.Conv(c, c1, **conv)
        self.conv2 = nnx.Conv(c1, c2, **conv)
        h, w = _pooled(h), _pooled(w)
        self.dense = nnx.Linear(h * w * c2, dense, kernel_init=_glorot, rngs=rngs)
        self.head = nnx.Linear(dense, num_classes, kernel_init=_glorot, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = x.reshape((x.shape[0], *self.image_shape))
        for conv in (self.conv1, self.conv2):
            h = nnx.max_pool(jax.nn.relu(conv(h)), (2, 2), strides=(2, 2), padding="SAME")
        h = jax.nn.relu(self.dense(h.reshape((h.shape[0], -1))))
        return self.head(h), h


def _pooled(n: int) -> int:
    """Side after two SAME 2x2 stride-2 pools."""
    for _ in range(2):
        n = -(-n // 2)
    return n


class FemnistCNNDropout(nnx.Module):
    """Reddi et al. 2021's EMNIST CNN, dropout omitted (no key at apply); see the module docstring."""

    def __init__(self, image_shape: Sequence[int], num_classes: int, *, width: float = 1.0, rngs: nnx.Rngs):
        self.image_shape = tuple(int(s) for s in image_shape)
        h, w, c = self.image_shape
        self.in_features = h * w * c
        if h < 6 or w < 6:
            raise ValueError(f"femnist_cnn_dropout needs images of at least 6x6 (two valid 3x3 convolutions "
                             f"and a 2x2 pool); got {h}x{w}")
        c1, c2, dense = scaled(32, width), scaled(64, width), scaled(128, width)
        conv = dict(kernel_size=(3, 3), padding="VALID", kernel_init=_glorot, rngs=rngs)
        self.conv1 = nnx.Conv(c, c1, **conv)
        self.conv2 = nnx.Conv(c1, c2, **conv)
        self.dense = nnx.Linear(((h - 4) // 2) * ((w - 4) // 2) * c2, dense, kernel_init=_glorot, rngs=rngs)
        self.head = nnx.Linear(dense, num_classes, kernel_init=_glorot, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = x.reshape((x.shape[0], *self.image_shape))
        h = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(h))))
        h = nnx.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
        h = jax.nn.relu(self.dense(h.reshape((h.shape[0], -1))))
        return self.head(h), h


GN_GROUPS = 2  # Reddi et al. 2021 (TensorFlow Addons' default); Hsieh et al. 2020 also train ResNets with few groups


def _gn(channels: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    return nnx.GroupNorm(channels, num_groups=GN_GROUPS, epsilon=1e-5, rngs=rngs)


def _conv3(cin: int, cout: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, (3, 3), strides=stride, padding=1, use_bias=False, kernel_init=_he, rngs=rngs)


class BasicBlock(nnx.Module):
    """conv3x3(stride) -> GN -> ReLU -> conv3x3 -> GN, plus a (projected) shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1, self.gn1 = _conv3(cin, cout, stride, rngs), _gn(cout, rngs)
        self.conv2, self.gn2 = _conv3(cout, cout, 1, rngs), _gn(cout, rngs)
        self.project = stride != 1 or cin != cout
        if self.project:
            self.short = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, kernel_init=_he, rngs=rngs)
            self.short_gn = _gn(cout, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.gn1(self.conv1(x)))
        h = self.gn2(self.conv2(h))
        s = self.short_gn(self.short(x)) if self.project else x
        return jax.nn.relu(h + s)


class ResNet18GN(nnx.Module):
    """CIFAR ResNet-18 with GroupNorm (2 groups); ``features`` = the pooled ``[B, 512 * width]``."""

    STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))

    def __init__(self, image_shape: Sequence[int], num_classes: int, *, width: float = 1.0, rngs: nnx.Rngs):
        self.image_shape = tuple(int(s) for s in image_shape)
        h, w, c = self.image_shape
        self.in_features = h * w * c
        widths = [scaled(ch, width, GN_GROUPS) for ch, _ in self.STAGES]
        self.stem, self.stem_gn = _conv3(c, widths[0], 1, rngs), _gn(widths[0], rngs)
        blocks, cin = [], widths[0]
        for cout, (_, stride) in zip(widths, self.STAGES):
            blocks += [BasicBlock(cin, cout, stride, rngs=rngs), BasicBlock(cout, cout, 1, rngs=rngs)]
            cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = x.reshape((x.shape[0], *self.image_shape))
        h = jax.nn.relu(self.stem_gn(self.stem(h)))
        for block in self.blocks:
            h = block(h)
        feats = h.mean(axis=(1, 2))
        return self.head(feats), feats
