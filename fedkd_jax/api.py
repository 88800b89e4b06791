"""The Python API for scripts: one run, or a batched sweep.

    import fedkd_jax as fk
    res = fk.run({"algorithm": "fedkd", "run": {"rounds": 50}})         # or a Config, or a YAML path
    res.final["test_accuracy"]; res.to_pandas()                          # one row per round
    sw = fk.sweep("my.yaml", {"distill.temperature": [1, 2, 4]}, seeds=3)
    sw.summary; sw.to_pandas()                                           # one row per run and round

Both validate the configuration exactly as the CLI does (same errors), and
call :func:`fedkd_jax.configure_cpu_devices` first, which only takes effect
if JAX has not started yet.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from fedkd_jax._devices import configure_cpu_devices
from fedkd_jax.compile_cache import configure_compile_cache


@dataclass
class Result:
    """One run: its metrics table, final metrics and state, and its directory."""

    rows: list[dict[str, Any]]
    final: dict[str, Any]
    state: Any
    run_dir: str
    rounds: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)  # seconds: dispatch, evaluation, checkpoints, total

    def to_pandas(self):
        """The metrics table as a ``pandas.DataFrame`` (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self.rows)


def _default_out(kind: str, cfg) -> str:
    return os.path.join("runs", f"{kind}{cfg.algorithm}-{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")


def run(config=None, out: str | None = None, *, progress: bool = False) -> Result:
    """Run (or resume, if ``out`` holds it) one experiment.

    Args:
      config: a :class:`~fedkd_jax.config.Config`, a dict of sections
        (``{"run": {"rounds": 50}}``), a YAML path, or ``None`` for the defaults.
      out: the run directory (default ``runs/<algorithm>-<dataset>-<time>``).
    """
    from fedkd_jax.runner import run_experiment
    from fedkd_jax.config import devices_value
    from fedkd_jax.sweeps import as_config

    cfg = as_config(config)
    configure_cpu_devices(devices_value(cfg.run.devices))
    configure_compile_cache()
    out = out or _default_out("", cfg)
    res = run_experiment(cfg, out, progress=progress)
    return Result(res.rows, res.final, res.state, res.run_dir, res.rounds, res.seconds, res.notes, res.timing)


def sweep(config=None, grid: dict[str, Sequence[Any]] | Sequence[str] = (), seeds: int | Sequence[int] = 1,
          out: str | None = None, *, progress: bool = False):
    """Run (or resume) every point of ``grid`` for every seed, batched by static configuration.

    Args:
      config: the base configuration (as for :func:`run`).
      grid: ``{"section.key": [values]}`` or ``["section.key=v1,v2", ...]``.
      seeds: a count (seeds 0..n-1) or a list of seeds.
      out: the sweep's directory (default ``runs/sweep-<algorithm>-<dataset>-<time>``).

    Returns:
      a :class:`~fedkd_jax.sweeps.SweepResult` (``rows``, ``summary``, ``to_pandas()``).
    """
    from fedkd_jax.config import devices_value
    from fedkd_jax.sweeps import as_config, run_sweep

    cfg = as_config(config)
    configure_cpu_devices(devices_value(cfg.run.devices))
    configure_compile_cache()
    return run_sweep(cfg, grid, seeds, out or _default_out("sweep-", cfg), progress=progress)
