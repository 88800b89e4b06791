"""Run loop and run-directory outputs."""

from fedkd_jax.runner.checkpoint import Checkpointer
from fedkd_jax.runner.context import RunContext, RunResult
from fedkd_jax.runner.loop import run_experiment
from fedkd_jax.runner.outputs import BASE_COLUMNS, MetricsLog, plot_accuracy, read_jsonl

__all__ = ["BASE_COLUMNS", "Checkpointer", "MetricsLog", "RunContext", "RunResult", "plot_accuracy", "read_jsonl", "run_experiment"]
