"""Pure-function view of an nnx module, for vmapping over clients.

The engine holds parameters as plain nested dicts (``nnx.to_pure_dict``):
they stack, ravel, save and restore like any pytree.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
from flax import nnx

from fedkd_jax.errors import ConfigError
from fedkd_jax.models.nets import CNN, MLP
from fedkd_jax.models.sequence import CharLSTM, NWPLSTM, Transformer
from fedkd_jax.models.vision import FemnistCNN, FemnistCNNDropout, ResNet18GN, scaled

Params = Any  # nested dict of arrays
IMAGE_MODELS = ("cnn", "femnist_cnn", "femnist_cnn_dropout", "resnet18_gn")
SEQUENCE_MODELS = ("char_lstm", "nwp_lstm", "transformer")
MODELS = ("mlp",) + IMAGE_MODELS + SEQUENCE_MODELS


class Model(NamedTuple):
    """``init(key) -> params`` and ``apply(params, x [B, D]) -> (logits, features [B, F])``.

    ``logits`` are ``[B, K]`` for classifiers and ``[B, L, V]`` for the
    next-token models (:data:`SEQUENCE_MODELS`, ``D = L``).
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], tuple[jax.Array, jax.Array]]
    num_params: int
    feature_dim: int
    name: str
    in_features: int = 0


def functional(build: Callable[[nnx.Rngs], nnx.Module], name: str = "model") -> Model:
    """Wrap ``build(rngs) -> module`` as a :class:`Model` of pure functions."""
    abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    shapes = nnx.to_pure_dict(state)
    num_params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(shapes)))

    def init(key: jax.Array) -> Params:
        return nnx.to_pure_dict(nnx.state(build(nnx.Rngs(params=key)), nnx.Param))

    def apply(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return nnx.merge(graphdef, params)(x)

    d = _in_dim(abstract)
    feat = jax.eval_shape(lambda p, x: apply(p, x)[1], shapes, jax.ShapeDtypeStruct((1, d), np.float32))
    return Model(init, apply, num_params, int(np.prod(feat.shape[1:])), name, d)


def _in_dim(module: nnx.Module) -> int:
    if getattr(module, "in_features", None) is not None:
        return int(module.in_features)
    if isinstance(module, CNN):
        return int(np.prod(module.image_shape))
    return int(module.hidden[0].in_features if len(module.hidden) else module.head.in_features)


def make_model(
    kind: str,
    *,
    num_features: int,
    num_classes: int,
    hidden: Sequence[int] = (200, 200),
    channels: Sequence[int] = (16, 32),
    image_shape: Sequence[int] | None = None,
    width: float = 1.0,
) -> Model:
    """Build one of :data:`MODELS` as a :class:`Model`.

    Args:
      kind: ``mlp``, ``cnn`` (small CNN), or a reference model:
        ``femnist_cnn``, ``femnist_cnn_dropout``, ``resnet18_gn``
        (:mod:`fedkd_jax.models.vision`), ``char_lstm``, ``nwp_lstm``,
        ``transformer`` (:mod:`fedkd_jax.models.sequence`).
      num_features: flat input size ``D``; the sequence length ``L`` for the
        next-token models.
      num_classes: ``K``; the vocabulary size ``V`` (special tokens included)
        for the next-token models.
      hidden: MLP hidden widths; for the CNN, ``hidden[0]`` is the dense width.
      channels: CNN conv channels per block.
      image_shape: ``(H, W, C)`` for the image models; ``H * W * C`` must equal ``D``.
      width: multiplier of every hidden width of the reference models (1: the
        papers' sizes); ``mlp`` and ``cnn`` take ``hidden`` / ``channels``.
    """
    hidden = tuple(int(h) for h in hidden)
    if kind == "mlp":
        return functional(lambda r: MLP(num_features, hidden, num_classes, rngs=r), "mlp")
    if kind in IMAGE_MODELS:
        if image_shape is None:
            raise ConfigError("model.kind", f"{kind} needs image data (digits, mnist5k or an .npz with 4-D x); "
                                            "use mlp")
        if int(np.prod(image_shape)) != num_features:
            raise ConfigError("model.kind", f"image shape {tuple(image_shape)} does not match {num_features} features")
    elif kind in SEQUENCE_MODELS and image_shape is not None:
        raise ConfigError("model.kind", f"{kind} is a next-token model; it needs token data [N, L], not images "
                                        f"{tuple(image_shape)}")
    if kind == "cnn":
        dense = hidden[0] if hidden else 64
        return functional(lambda r: CNN(image_shape, channels, dense, num_classes, rngs=r), "cnn")
    if kind == "femnist_cnn_dropout" and min(image_shape[:2]) < 6:
        raise ConfigError("model.kind", f"femnist_cnn_dropout needs images of at least 6x6; got {tuple(image_shape)}")
    w = float(width)
    builders = {
        "femnist_cnn": lambda r: FemnistCNN(image_shape, num_classes, width=w, rngs=r),
        "femnist_cnn_dropout": lambda r: FemnistCNNDropout(image_shape, num_classes, width=w, rngs=r),
        "resnet18_gn": lambda r: ResNet18GN(image_shape, num_classes, width=w, rngs=r),
        "char_lstm": lambda r: CharLSTM(num_classes, num_features, embed=scaled(8, w), hidden=scaled(256, w),
                                        rngs=r),
        "nwp_lstm": lambda r: NWPLSTM(num_classes, num_features, embed=scaled(96, w), hidden=scaled(670, w),
                                      rngs=r),
        "transformer": lambda r: Transformer(num_classes, num_features, d_model=scaled(128, w, 4), heads=4,
                                             rngs=r),
    }
    if kind not in builders:
        raise ConfigError("model.kind", f"unknown model {kind!r}; allowed: {', '.join(MODELS)}")
    return functional(builders[kind], kind)
