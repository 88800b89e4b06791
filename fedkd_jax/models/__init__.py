"""flax.nnx models (MLP, small CNN, the field's reference models) and their pure-function view."""

from fedkd_jax.models.functional import (
    IMAGE_MODELS,
    MODELS,
    SEQUENCE_MODELS,
    Model,
    Params,
    functional,
    make_model,
)
from fedkd_jax.models.nets import CNN, MLP
from fedkd_jax.models.sequence import CharLSTM, NWPLSTM, Transformer
from fedkd_jax.models.vision import FemnistCNN, FemnistCNNDropout, ResNet18GN

__all__ = [
    "CNN",
    "CharLSTM",
    "FemnistCNN",
    "FemnistCNNDropout",
    "IMAGE_MODELS",
    "MLP",
    "MODELS",
    "Model",
    "NWPLSTM",
    "Params",
    "ResNet18GN",
    "SEQUENCE_MODELS",
    "Transformer",
    "functional",
    "make_model",
]
