"""One resolution per run: a configuration becomes a plan, static and traced apart.

Every run, single or inside a sweep, goes through :func:`make_plan` once:

1. **validate** the configuration (:mod:`fedkd_jax.validation`);
2. **fill every default that depends on other settings** (the server
   optimizer's Reddi et al. defaults, the cohort sampling) for *this* run's
   values, so a sweep over ``server.optimizer`` gives each run its own
   optimizer's defaults;
3. **split** it into a hashable *static part* (everything that changes the
   compiled program: shapes, the algorithm, which mechanisms are on) and a
   *traced part* (the hyperparameters, a ``{key: float}`` pytree passed into
   the program).

Builders branch in Python only on the static part: a traced key whose value
changes what a builder does in Python (today: whether stragglers are drawn
at all) contributes a *derived flag* to the static part, so runs that differ
there compile separate programs. Sweeps group runs by equality of the static
part (and of the data, :func:`data_identity`), which makes "every sweep run
equals its single run" hold by construction; ``tests/test_plan.py`` lowers
the round for two values of every traced key and checks the programs are
identical.

Also here: the privacy settings that need the population (delta, calibrated
noise, the accountant), resolved once per run. This module imports nothing
above the builders' inputs: not the builders, the run loop or the sweeps.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, NamedTuple

import numpy as np

from fedkd_jax.config import Config, flatten, resolve_defaults, to_dict, validate
from fedkd_jax.settings import count_noise, dp_enabled, sampling_method

# Hyperparameters traced into the compiled round: they change no shape and no
# Python branch of a builder (except through DERIVED flags below).
TRACED = (
    "client.lr", "client.momentum", "client.straggler_fraction",
    "server.lr", "server.momentum", "server.b1", "server.b2", "server.tau",
    "distill.temperature", "distill.alpha", "distill.teacher_lr", "distill.server_lr",
    "fedprox.mu", "compression.energy_start", "compression.energy_end",
    "privacy.noise_multiplier", "privacy.clip_norm",
)
# Integers derived on the host from a run's settings and traced beside them, so the
# program never recomputes them from a traced float (float32 rounding would differ).
TRACED_DERIVED = ("client.straggler_count",)  # fedkd_jax.engine.cohort.straggler_count
# Per-run host settings: they change the host-side data partition and cohorts,
# not the program (clients are padded to the widest run of a group).
HOST = ("run.seed", "data.alpha", "data.shards_per_client", "data.min_examples", "data.test_fraction",
        "data.partition", "privacy.delta")
# Python decisions builders take on traced values: part of the static part.
DERIVED: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "client.straggler_fraction": ("stragglers_drawn", lambda v: float(v) > 0),
}
# Algorithms whose server data (the proxy set) follows the partition: their
# runs also group by the host settings.
PARTITION_IN_SERVER_DATA = ("feddf", "server_teacher_kd")


class RunPlan(NamedTuple):
    """A resolved run: its full config, the static part and the traced part."""

    config: Config
    static: tuple
    traced: dict[str, float]


def resolve_config(cfg: Config) -> Config:
    """Validate ``cfg`` and fill every default that depends on other settings."""
    validate(cfg)
    return resolve_defaults(cfg)


def traced_part(cfg: Config) -> dict[str, float]:
    """The traced hyperparameters of a resolved config (unset optional values stay out)
    and the :data:`TRACED_DERIVED` integers computed from them on the host."""
    from fedkd_jax.engine.cohort import straggler_count

    flat = flatten(to_dict(cfg))
    out = {k: float(flat[k]) for k in TRACED if flat.get(k) is not None}
    out["client.straggler_count"] = float(straggler_count(cfg.client.straggler_fraction, cfg.run.cohort_size))
    return out


def static_part(cfg: Config) -> tuple:
    """What must be equal for runs to share one compiled program (hashable)."""
    flat = flatten(to_dict(cfg))
    host = () if cfg.algorithm in PARTITION_IN_SERVER_DATA else HOST
    items = [(k, repr(v)) for k, v in flat.items() if k not in TRACED and k not in host]
    items += [(f"derived.{name}", repr(fn(flat[key]))) for key, (name, fn) in DERIVED.items()
              if flat.get(key) is not None]
    return tuple(sorted(items))


def make_plan(cfg: Config) -> RunPlan:
    """Config -> validated, resolved plan (see the module docstring)."""
    cfg = resolve_config(cfg)
    return RunPlan(cfg, static_part(cfg), traced_part(cfg))


def data_identity(data: Any, cfg: Config) -> str:
    """A fingerprint of what the compiled program takes from a run's data besides the
    per-run row tables: the pooled rows, the proxy set, the population size and (secure
    aggregation's ring) the largest client. Runs of a sweep share a program and its
    data pool only when this is equal (a seed-dependent dataset is not)."""
    h = hashlib.sha256()
    for a in (data.x, data.y, data.proxy_x, data.proxy_y):
        if a is not None:
            a = np.ascontiguousarray(a)
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(a.tobytes())
    h.update(str(data.num_clients).encode())
    if cfg.secagg.enabled:
        h.update(str(int(np.max(data.counts))).encode())
    if cfg.model.groups:  # architecture groups: each client's group (a function of the seed) shapes the program
        from fedkd_jax.hetero.build import membership

        h.update(np.ascontiguousarray(membership(cfg, data)).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ privacy
def privacy_delta(cfg: Config, num_clients: int) -> float:
    """``privacy.delta``, or ``min(1e-5, 1/N)``."""
    return cfg.privacy.delta if cfg.privacy.delta is not None else min(1e-5, 1.0 / num_clients)


def privacy_setup(cfg: Config, num_clients: int):
    """Resolve DP settings that need the population (delta, calibrated noise); the accountant.

    Raises (before anything is compiled) when the settings cannot give what they ask
    for: a calibrated noise that leaves adaptive clipping no budget, or a target
    epsilon that not even one round fits. Warns when delta exceeds 1/N."""
    import warnings

    from fedkd_jax.errors import ConfigError
    from fedkd_jax.privacy import Accountant, Mechanism, calibrate
    from fedkd_jax.privacy.dp import check_count_budget

    if not dp_enabled(cfg):
        return cfg, None
    p = cfg.privacy
    sampling = sampling_method(cfg)
    delta = privacy_delta(cfg, num_clients)
    if delta > 1.0 / num_clients:
        warnings.warn(f"privacy.delta={delta:g} is above 1/N = {1 / num_clients:.3g}: a mechanism that reveals one "
                      f"client outright would still meet it; the usual choice is min(1e-5, 1/N) "
                      f"= {min(1e-5, 1 / num_clients):.3g} (the default)", stacklevel=2)
    z = p.noise_multiplier
    if z is None:
        z = calibrate(p.target_epsilon, delta, rounds=cfg.run.rounds, cohort_size=cfg.run.cohort_size,
                      num_clients=num_clients, sampling=sampling, accountant=p.accountant)
    if p.adaptive_quantile is not None:
        check_count_budget(float(z), count_noise(cfg))
    cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(p, noise_multiplier=float(z), delta=float(delta),
                                                               sampling=sampling))
    accountant = Accountant(Mechanism(float(z), num_clients, cfg.run.cohort_size, sampling), delta, kind=p.accountant)
    if p.target_epsilon is not None and accountant.epsilon_at(1) > p.target_epsilon:
        raise ConfigError("privacy.target_epsilon", f"not even one round fits: one round with noise multiplier {z:g} "
                                                    f"costs epsilon {accountant.epsilon_at(1):.4g} at delta {delta:g} "
                                                    f"> {p.target_epsilon:g}; raise the target or "
                                                    "privacy.noise_multiplier (or leave it unset to calibrate it)")
    return cfg, accountant
