"""Client and server optimizers by name (optax).

Server optimizers follow Reddi et al. 2021, "Adaptive Federated Optimization"
(ICLR): the server treats the negated mean client delta as a pseudo-gradient.
``fedavg`` is SGD with learning rate 1 (the new model is the weighted mean of
the client models), ``fedavgm`` adds server momentum, ``fedadam`` and
``fedyogi`` are adaptive, with ``tau`` as the adaptivity constant.

FedAdam and FedYogi come in two forms (``form``, the config's
``server.adaptive_form``):

* ``reddi`` (default): Reddi et al.'s Algorithm 2 as printed. With ``Δ_t`` the
  mean client delta, ``m_t = β1 m_{t-1} + (1 - β1) Δ_t``; Adam:
  ``v_t = β2 v_{t-1} + (1 - β2) Δ_t²``; Yogi:
  ``v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²)``; then
  ``x_{t+1} = x_t + η m_t / (√v_t + τ)``. No bias correction,
  ``m_{-1} = 0``, ``v_{-1} = τ²``.
* ``optax``: ``optax.adam`` / ``optax.yogi`` with ``eps = τ``: both moments
  bias-corrected; Adam starts both moments at 0, Yogi both at 1e-6 (optax's
  ``initial_accumulator_value``), whatever ``τ`` is. This was the engine's
  only form before; it is kept to reproduce earlier runs.

Their first steps show the difference: per coordinate the paper's is
``η (1 - β1) Δ / (√(β2 τ² + (1 - β2) Δ²) + τ)``, optax Adam's
``η Δ / (|Δ| + τ)``. Both are about ``η sign(Δ)`` where ``|Δ| >> τ``; where
``|Δ| <~ τ`` the paper's step is about 20x smaller (β = 0.9, 0.99). Later
steps differ while ``β^t`` is not negligible, and only the paper's form
lets ``τ`` set the initial second moment.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedkd_jax.errors import ConfigError, concrete

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
ADAPTIVE_FORMS = ("reddi", "optax")  # fedadam / fedyogi: Reddi et al.'s Algorithm 2 | optax.adam / optax.yogi
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
    form: str = "reddi",
) -> optax.GradientTransformation:
    """An optax transformation applied to the pseudo-gradient ``-mean_delta``.

    Settings left ``None`` take the optimizer's :data:`SERVER_DEFAULTS`.
    ``form`` chooses FedAdam's / FedYogi's form (:data:`ADAPTIVE_FORMS`, see
    the module docstring); the other optimizers ignore it.
    """
    if form not in ADAPTIVE_FORMS:
        raise ConfigError("server.adaptive_form", f"unknown form {form!r}; allowed: {', '.join(ADAPTIVE_FORMS)}")
    h: dict[str, Any] = server_settings(name, lr=lr, momentum=momentum, b1=b1, b2=b2, tau=tau)
    if form == "reddi" and name in REDDI_FACTORIES:
        return REDDI_FACTORIES[name](h)
    return SERVER_FACTORIES[name](h)


class ReddiState(NamedTuple):
    """Moments of Reddi et al.'s adaptive server optimizers (no step count: no bias correction)."""

    m: optax.Updates
    v: optax.Updates


def reddi_adaptive(lr: Any, *, b1: Any, b2: Any, tau: Any, variant: str) -> optax.GradientTransformation:
    """Reddi et al. 2021, Algorithm 2 (FedAdam / FedYogi), on the pseudo-gradient ``g = -Δ``.

    ``m_t = β1 m_{t-1} + (1 - β1) g``; ``adam``: ``v_t = β2 v_{t-1} + (1 - β2) g²``;
    ``yogi``: ``v_t = v_{t-1} - (1 - β2) g² sign(v_{t-1} - g²)``; update
    ``-η m_t / (√v_t + τ)``. ``m_{-1} = 0``, ``v_{-1} = τ²``, no bias
    correction. Hyperparameters may be traced (batched sweeps).
    """
    if variant not in ("adam", "yogi"):
        raise ValueError(f"unknown variant {variant!r}")

    def init(params):
        return ReddiState(jax.tree.map(jnp.zeros_like, params),
                          jax.tree.map(lambda p: jnp.full_like(p, jnp.square(tau)), params))

    def update(grads, state, params=None):
        del params
        m = jax.tree.map(lambda m_, g: b1 * m_ + (1 - b1) * g, state.m, grads)
        if variant == "adam":
            v = jax.tree.map(lambda v_, g: b2 * v_ + (1 - b2) * g * g, state.v, grads)
        else:
            v = jax.tree.map(lambda v_, g: v_ - (1 - b2) * g * g * jnp.sign(v_ - g * g), state.v, grads)
        updates = jax.tree.map(lambda m_, v_: -lr * m_ / (jnp.sqrt(v_) + tau), m, v)
        return updates, ReddiState(m, v)

    return optax.GradientTransformation(init, update)


def client_optimizer(name: str, *, lr: float, momentum: float = 0.9) -> optax.GradientTransformation:
    """The local optimizer each client runs (fresh state every round)."""
    if name not in CLIENT_FACTORIES:
        raise ConfigError("client.optimizer", f"unknown client optimizer {name!r}; allowed: {', '.join(CLIENT_OPTIMIZERS)}")
    return CLIENT_FACTORIES[name](lr, momentum)


# Registries: a new optimizer is one line here (and its defaults in SERVER_DEFAULTS).
# SERVER_FACTORIES hold the optax forms; REDDI_FACTORIES override them for form="reddi".
SERVER_FACTORIES = {
    "fedavg": lambda h: optax.sgd(h["lr"]),
    "fedavgm": lambda h: optax.sgd(h["lr"], momentum=h["momentum"]),
    "fedadam": lambda h: optax.adam(h["lr"], b1=h["b1"], b2=h["b2"], eps=h["tau"]),
    "fedyogi": lambda h: optax.yogi(h["lr"], b1=h["b1"], b2=h["b2"], eps=h["tau"]),
}
# The paper's forms (server_optimizer's default ``form="reddi"``).
REDDI_FACTORIES = {
    "fedadam": lambda h: reddi_adaptive(h["lr"], b1=h["b1"], b2=h["b2"], tau=h["tau"], variant="adam"),
    "fedyogi": lambda h: reddi_adaptive(h["lr"], b1=h["b1"], b2=h["b2"], tau=h["tau"], variant="yogi"),
}
CLIENT_FACTORIES = {
    "sgd": lambda lr, momentum: optax.sgd(lr),
    "momentum": lambda lr, momentum: optax.sgd(lr, momentum=momentum),
    "adam": lambda lr, momentum: optax.adam(lr),
}
