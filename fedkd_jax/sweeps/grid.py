"""Sweep grids: which settings can share a compiled program, and how runs are grouped.

Three kinds of setting, decided once for every config key in :mod:`fedkd_jax.plan`:

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

from fedkd_jax.config import Config, flatten, from_dict, to_dict
from fedkd_jax.errors import ConfigError
from fedkd_jax.plan import (  # noqa: F401 - re-exported
    HOST,
    TRACED,
    TRACED_DERIVED,
    resolve_config,
    static_part,
    traced_part,
)

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
    "run.eval_personal_clients": "the runs are evaluated alike",
    "data.pool": "the runs share one pool",
    "data.pool_dir": "the runs share one pool",
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
            try:  # each run resolved on its own values (an optimizer's defaults follow the optimizer)
                cfg = resolve_config(from_dict(d))
            except ConfigError as e:
                raise ConfigError(e.field, f"{e.message} (in the run {dict(zip(keys, combo))}, seed {seed})") from None
            runs.append(RunSpec(len(runs), tuple(zip(keys, combo)), int(seed), cfg))
    return runs


def static_signature(cfg: Config) -> tuple:
    """What must be equal for runs to share one compiled program: the plan's static part."""
    return static_part(cfg)


def group(runs: Sequence[RunSpec]) -> list[list[RunSpec]]:
    """Runs grouped by static signature, in first-appearance order."""
    groups: dict[tuple, list[RunSpec]] = {}
    for r in runs:
        groups.setdefault(static_signature(r.config), []).append(r)
    return list(groups.values())


def hparams(cfg: Config) -> dict[str, float]:
    """The traced settings of one run: the plan's traced part."""
    return traced_part(cfg)


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """``cfg`` with ``section.key`` values replaced (no validation: values may be traced);
    :data:`TRACED_DERIVED` entries are not config keys and are skipped."""
    for key, v in values.items():
        if key in TRACED_DERIVED:
            continue
        section, _, name = key.partition(".")
        sub = getattr(cfg, section)
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(sub, **{name: v})})
    return cfg
