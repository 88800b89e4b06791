"""Sweep grids: which settings can share a compiled program, and how runs are grouped.

Three kinds of setting, decided here once for every config key:

* **traced** (:data:`TRACED`): values that change no array shape (learning
  rates, momentum, temperature, alpha, mu, straggler share, SVD energies, the
  DP noise multiplier and clip norm). They reach the compiled round as a
  traced pytree with a leading runs axis: one program for all of them.
* **per-run host** (:data:`HOST`): the seed and the data partition's
  parameters. They change the host-side data and cohorts, not the program
  (clients are padded to the widest run).
* **static**: everything else (models, algorithm, cohort, dataset, number
  of clients...). Runs that differ in a static setting compile one program
  per distinct static configuration.

Keys that cannot be swept at all (:data:`UNSWEEPABLE`) are refused with the reason.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedkd_jax.config import Config, from_dict, to_dict, validate
from fedkd_jax.engine.cohort import straggler_count
from fedkd_jax.errors import ConfigError
from fedkd_jax.runner.resume import flatten

TRACED = (
    "client.lr", "client.momentum", "client.straggler_fraction",
    "server.lr", "server.momentum", "server.b1", "server.b2", "server.tau",
    "distill.temperature", "distill.alpha", "distill.teacher_lr", "distill.server_lr",
    "fedprox.mu", "compression.energy_start", "compression.energy_end",
    "privacy.noise_multiplier", "privacy.clip_norm",
)
# Integers derived on the host from a run's settings and traced beside them, so the
# program never recomputes them from a traced float (float32 rounding would differ).
DERIVED = ("client.straggler_count",)  # fedkd_jax.engine.cohort.straggler_count
HOST = ("run.seed", "data.alpha", "data.shards_per_client", "data.min_examples", "data.test_fraction",
        "data.partition", "privacy.delta")
UNSWEEPABLE = {
    "run.rounds": "every run of a sweep advances through the same rounds (sweep it with separate sweeps)",
    "run.eval_every": "the runs share one loop and its cadences",
    "run.checkpoint_every": "the runs share one loop and its cadences",
    "run.rounds_per_dispatch": "the runs share one loop and its cadences",
    "run.keep_checkpoints": "the runs share one loop and its checkpoints",
    "run.devices": "the runs share one mesh",
    "run.group_size": "the runs share one mesh",
    "run.runs_per_device": "it sets how the runs themselves are batched",
    "run.progress": "the sweep has one progress bar",
    "run.client_store": "the runs share one store kind",
    "run.memory_budget_gb": "the runs share one memory budget",
    "run.store_dir": "each run's store lives under the sweep's directory",
    "run.eval_clients": "the runs are evaluated alike",
    "run.log_to": "the sweep writes one set of outputs",
    "privacy.target_epsilon": "runs would stop at different rounds; sweep privacy.noise_multiplier instead",
    "compression.schedule_rounds": "the SVD schedule's horizon follows run.rounds for every run",
}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its label values, seed and full config."""

    index: int
    values: tuple[tuple[str, Any], ...]  # the swept settings, in grid order
    seed: int
    config: Config

    @property
    def label(self) -> str:
        parts = [f"{k.split('.')[-1]}={v}" for k, v in self.values] + [f"seed={self.seed}"]
        return ",".join(parts)

    @property
    def dirname(self) -> str:
        return self.label.replace("/", "_").replace("[", "").replace("]", "").replace(" ", "")


def _typed(key: str, raw: Any, base: Config) -> Any:
    """One grid value, typed like the config field (checked by OmegaConf)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(base), OmegaConf.from_dotlist([f"{key}={raw}"]))
        return OmegaConf.select(cfg, key)
    except OmegaConfBaseException as e:
        raise ConfigError(f"--grid {key}", f"value {raw!r} is not valid for this setting: {str(e).splitlines()[0]}") \
            from None


def parse_grid(items: Sequence[str] | dict[str, Sequence[Any]], base: Config) -> dict[str, list[Any]]:
    """``["key=v1,v2", ...]`` or ``{key: [v1, v2]}`` into typed value lists, with clear errors."""
    if isinstance(items, dict):
        pairs = [(k, list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in items.items()]
    else:
        pairs = []
        for item in items:
            if "=" not in item:
                raise ConfigError("--grid", f"expected section.key=v1,v2,...; got {item!r}")
            k, _, vals = item.partition("=")
            pairs.append((k.strip(), [v for v in vals.split(",") if v.strip() != ""]))
    known = set(flatten(to_dict(base))) | {"algorithm"}
    grid: dict[str, list[Any]] = {}
    for key, values in pairs:
        if key not in known:
            raise ConfigError(f"--grid {key}", "unknown key; see the README's config keys")
        if key in UNSWEEPABLE:
            raise ConfigError(f"--grid {key}", f"cannot be swept: {UNSWEEPABLE[key]}")
        if not values:
            raise ConfigError(f"--grid {key}", "needs at least one value")
        if key in grid:
            raise ConfigError(f"--grid {key}", "given twice")
        grid[key] = [_typed(key, v, base) for v in values]
    return grid


def expand(base: Config, grid: dict[str, list[Any]], seeds: Sequence[int]) -> list[RunSpec]:
    """Every grid point times every seed, each config validated (errors name the run)."""
    if not seeds:
        raise ConfigError("--seeds", "needs at least one seed")
    keys = list(grid)
    runs = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        for seed in seeds:
            d = to_dict(base)
            for k, v in zip(keys, combo):
                section, _, name = k.partition(".")
                if name:
                    d[section][name] = v
                else:
                    d[section] = v
            d["run"]["seed"] = int(seed)
            cfg = from_dict(d)
            try:
                validate(cfg)
            except ConfigError as e:
                raise ConfigError(e.field, f"{e.message} (in the run {dict(zip(keys, combo))}, seed {seed})") from None
            runs.append(RunSpec(len(runs), tuple(zip(keys, combo)), int(seed), cfg))
    return runs


def static_signature(cfg: Config) -> tuple:
    """What must be equal for runs to share one compiled program.

    Algorithms that hold server data derived from the partition (FedDF's and
    server-teacher KD's proxy set) also group by seed and partition.
    """
    flat = flatten(to_dict(cfg))
    host = () if cfg.algorithm in ("feddf", "server_teacher_kd") else HOST
    return tuple(sorted((k, repr(v)) for k, v in flat.items() if k not in TRACED and k not in host))


def group(runs: Sequence[RunSpec]) -> list[list[RunSpec]]:
    """Runs grouped by static signature, in first-appearance order."""
    groups: dict[tuple, list[RunSpec]] = {}
    for r in runs:
        groups.setdefault(static_signature(r.config), []).append(r)
    return list(groups.values())


def hparams(cfg: Config) -> dict[str, float]:
    """The traced settings of one run (floats; unset optional values stay out), and
    the :data:`DERIVED` integers computed from them on the host."""
    flat = flatten(to_dict(cfg))
    out = {k: float(flat[k]) for k in TRACED if flat.get(k) is not None}
    out["client.straggler_count"] = float(straggler_count(cfg.client.straggler_fraction, cfg.run.cohort_size))
    return out


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """``cfg`` with ``section.key`` values replaced (no validation: values may be traced);
    :data:`DERIVED` entries are not config keys and are skipped."""
    for key, v in values.items():
        if key in DERIVED:
            continue
        section, _, name = key.partition(".")
        sub = getattr(cfg, section)
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(sub, **{name: v})})
    return cfg
