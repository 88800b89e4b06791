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

Params = Any  # nested dict of arrays
MODELS = ("mlp", "cnn")


class Model(NamedTuple):
    """``init(key) -> params`` and ``apply(params, x [B, D]) -> (logits [B, K], features [B, F])``."""

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
) -> Model:
    """Build an MLP or a small CNN as a :class:`Model`.

    Args:
      kind: ``"mlp"`` or ``"cnn"``.
      num_features: flat input size ``D``.
      num_classes: ``K``.
      hidden: MLP hidden widths; for the CNN, ``hidden[0]`` is the dense width.
      channels: CNN conv channels per block.
      image_shape: ``(H, W, C)`` for the CNN; ``H * W * C`` must equal ``D``.
    """
    hidden = tuple(int(h) for h in hidden)
    if kind == "mlp":
        return functional(lambda r: MLP(num_features, hidden, num_classes, rngs=r), "mlp")
    if kind == "cnn":
        if image_shape is None:
            raise ConfigError("model.kind", "the CNN needs image data (digits, mnist5k or an .npz with 4-D x); use mlp")
        if int(np.prod(image_shape)) != num_features:
            raise ConfigError("model.kind", f"image shape {tuple(image_shape)} does not match {num_features} features")
        dense = hidden[0] if hidden else 64
        return functional(lambda r: CNN(image_shape, channels, dense, num_classes, rngs=r), "cnn")
    raise ConfigError("model.kind", f"unknown model {kind!r}; allowed: {', '.join(MODELS)}")
