"""flax.nnx models (MLP, small CNN) and their pure-function view."""

from fedkd_jax.models.functional import MODELS, Model, Params, functional, make_model
from fedkd_jax.models.nets import CNN, MLP

__all__ = ["CNN", "MLP", "MODELS", "Model", "Params", "functional", "make_model"]
