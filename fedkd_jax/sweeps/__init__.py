"""Batched sweeps: many runs of a grid in one compiled program (see :mod:`.loop`)."""

from fedkd_jax.sweeps.engine import BatchedRuns, sweep_mesh
from fedkd_jax.sweeps.grid import HOST, TRACED, UNSWEEPABLE, RunSpec, expand, group, parse_grid
from fedkd_jax.sweeps.loop import as_config, run_sweep
from fedkd_jax.sweeps.report import SweepResult

__all__ = ["HOST", "TRACED", "UNSWEEPABLE", "BatchedRuns", "RunSpec", "SweepResult", "as_config", "expand", "group",
           "parse_grid", "run_sweep", "sweep_mesh"]
