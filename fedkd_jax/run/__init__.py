"""Run loop and run-directory outputs."""

from fedkd_jax.run.checkpoint import Checkpointer
from fedkd_jax.run.loop import RunResult, run_experiment
from fedkd_jax.run.outputs import BASE_COLUMNS, MetricsLog, plot_accuracy, read_jsonl

__all__ = ["BASE_COLUMNS", "Checkpointer", "MetricsLog", "RunResult", "plot_accuracy", "read_jsonl", "run_experiment"]
