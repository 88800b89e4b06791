"""Client and server optimizers by name (optax).

Server optimizers follow Reddi et al. 2021, "Adaptive Federated Optimization":
the server treats the negated mean client delta as a gradient. ``fedavg`` is
SGD with learning rate 1 (the new model is the weighted mean of client models),
``fedavgm`` adds server momentum, ``fedadam`` and ``fedyogi`` use Adam and Yogi
with ``tau`` as the adaptivity constant (epsilon).
"""

from __future__ import annotations

import optax

from fedkd_jax.errors import ConfigError

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
CLIENT_OPTIMIZERS = ("sgd", "momentum", "adam")


def server_optimizer(
    name: str, *, lr: float = 1.0, momentum: float = 0.9, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3
) -> optax.GradientTransformation:
    """An optax transformation applied to the pseudo-gradient ``-mean_delta``."""
    if name == "fedavg":
        return optax.sgd(lr)
    if name == "fedavgm":
        return optax.sgd(lr, momentum=momentum)
    if name == "fedadam":
        return optax.adam(lr, b1=b1, b2=b2, eps=tau)
    if name == "fedyogi":
        return optax.yogi(lr, b1=b1, b2=b2, eps=tau)
    raise ConfigError("server.optimizer", f"unknown server optimizer {name!r}; allowed: {', '.join(SERVER_OPTIMIZERS)}")


def client_optimizer(name: str, *, lr: float, momentum: float = 0.9) -> optax.GradientTransformation:
    """The local optimizer each client runs (fresh state every round)."""
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=momentum)
    if name == "adam":
        return optax.adam(lr)
    raise ConfigError("client.optimizer", f"unknown client optimizer {name!r}; allowed: {', '.join(CLIENT_OPTIMIZERS)}")
