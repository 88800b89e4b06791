"""Client and server optimizers by name (optax).

Server optimizers follow Reddi et al. 2021, "Adaptive Federated Optimization"
(ICLR): the server treats the negated mean client delta as a pseudo-gradient.
``fedavg`` is SGD with learning rate 1 (the new model is the weighted mean of
the client models), ``fedavgm`` adds server momentum, ``fedadam`` and
``fedyogi`` use Adam and Yogi with ``tau`` as the adaptivity constant (optax's
epsilon).

Each server optimizer has its own defaults (:data:`SERVER_DEFAULTS`), used for
every setting the caller leaves as ``None``. An adaptive optimizer's update has
roughly unit size per coordinate, so the plain-FedAvg rate of 1.0 makes
FedAdam/FedYogi diverge; Reddi et al. fix ``beta1 = 0.9``, ``beta2 = 0.99``
and find ``tau = 1e-3`` and server rates near ``1e-2`` best for adaptive
methods across their tasks (Sec. 5, App. D), and server momentum 0.9 for FedAvgM.
"""

from __future__ import annotations

from typing import Any

import optax

from fedkd_jax.errors import ConfigError, concrete

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
CLIENT_OPTIMIZERS = ("sgd", "momentum", "adam")

# Defaults per server optimizer (Reddi et al. 2021; see the module docstring).
SERVER_DEFAULTS: dict[str, dict[str, float]] = {
    "fedavg": {"lr": 1.0, "momentum": 0.0, "b1": 0.9, "b2": 0.99, "tau": 1e-3},
    "fedavgm": {"lr": 1.0, "momentum": 0.9, "b1": 0.9, "b2": 0.99, "tau": 1e-3},
    "fedadam": {"lr": 1e-2, "momentum": 0.0, "b1": 0.9, "b2": 0.99, "tau": 1e-3},
    "fedyogi": {"lr": 1e-2, "momentum": 0.0, "b1": 0.9, "b2": 0.99, "tau": 1e-3},
}


def server_settings(name: str, **given: float | None) -> dict[str, float]:
    """``SERVER_DEFAULTS[name]`` with every non-``None`` value of ``given`` applied."""
    if name not in SERVER_DEFAULTS:
        raise ConfigError("server.optimizer", f"unknown server optimizer {name!r}; allowed: {', '.join(SERVER_OPTIMIZERS)}")
    out = dict(SERVER_DEFAULTS[name])
    out.update({k: (float(v) if concrete(v) else v) for k, v in given.items() if v is not None})
    return out


def server_optimizer(
    name: str,
    *,
    lr: float | None = None,
    momentum: float | None = None,
    b1: float | None = None,
    b2: float | None = None,
    tau: float | None = None,
) -> optax.GradientTransformation:
    """An optax transformation applied to the pseudo-gradient ``-mean_delta``.

    Settings left ``None`` take the optimizer's :data:`SERVER_DEFAULTS`.
    """
    h: dict[str, Any] = server_settings(name, lr=lr, momentum=momentum, b1=b1, b2=b2, tau=tau)
    return SERVER_FACTORIES[name](h)


def client_optimizer(name: str, *, lr: float, momentum: float = 0.9) -> optax.GradientTransformation:
    """The local optimizer each client runs (fresh state every round)."""
    if name not in CLIENT_FACTORIES:
        raise ConfigError("client.optimizer", f"unknown client optimizer {name!r}; allowed: {', '.join(CLIENT_OPTIMIZERS)}")
    return CLIENT_FACTORIES[name](lr, momentum)


# Registries: a new optimizer is one line here (and its defaults in SERVER_DEFAULTS).
SERVER_FACTORIES = {
    "fedavg": lambda h: optax.sgd(h["lr"]),
    "fedavgm": lambda h: optax.sgd(h["lr"], momentum=h["momentum"]),
    "fedadam": lambda h: optax.adam(h["lr"], b1=h["b1"], b2=h["b2"], eps=h["tau"]),
    "fedyogi": lambda h: optax.yogi(h["lr"], b1=h["b1"], b2=h["b2"], eps=h["tau"]),
}
CLIENT_FACTORIES = {
    "sgd": lambda lr, momentum: optax.sgd(lr),
    "momentum": lambda lr, momentum: optax.sgd(lr, momentum=momentum),
    "adam": lambda lr, momentum: optax.adam(lr),
}
