"""What a resumed run may change, and how its logs are brought back in line."""

from __future__ import annotations

import json
import os
from typing import Any

from fedkd_jax.config import Config, flatten, from_dict, to_dict, upgrade_saved  # noqa: F401 - flatten re-exported
from fedkd_jax.errors import ConfigError

# Settings that change neither parameters nor the metrics a round produces:
# the horizon, cadences and how the rounds are executed. Everything else
# (models, algorithm, data, partition, seed, optimizers, compression...) is
# fixed once a run exists. run.devices and run.group_size keep results equal
# to float tolerance, not bit-for-bit (a different summation order). The client
# store's backend and place change nothing: the store is rebuilt from checkpoints.
RESUMABLE_KEYS = {
    "run.rounds",
    "run.progress",
    "run.eval_every",
    "run.rounds_per_dispatch",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.devices",
    "run.group_size",
    "run.runs_per_device",
    "run.client_store",
    "run.memory_budget_gb",
    "run.store_dir",
    "data.pool",
    "data.pool_dir",
}


def saved_config(run_dir: str) -> Config | None:
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return from_dict(upgrade_saved(json.load(f)))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("--out", f"{path!r} is not valid JSON ({e}); the run cannot be resumed") from None


def check_compatible(saved: Config, wanted: Config, run_dir: str) -> None:
    """Refuse a resume whose settings would change results, naming every differing key."""
    a, b = flatten(to_dict(saved)), flatten(to_dict(wanted))
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_KEYS)
    if diff:
        details = ", ".join(f"{k} (saved {a.get(k)!r}, now {b.get(k)!r})" for k in diff)
        raise ConfigError(
            diff[0],
            f"the run in {run_dir!r} was made with settings that change results: {details}. "
            f"Only these may change on resume: {', '.join(sorted(RESUMABLE_KEYS))}. "
            "Use another --out for a new run.",
        )


def complete_rows(run_dir: str, last_round: int) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl`` with ``round <= last_round``, stopping at a torn line.

    Rows past the checkpoint belong to rounds that will be recomputed (bit for
    bit) and are dropped, so no round is ever logged twice.
    """
    path = os.path.join(run_dir, "metrics.jsonl")
    rows: list[dict[str, Any]] = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn write can only be the last line
                if row.get("round", 0) <= last_round:
                    rows.append(row)
    return rows


__all__ = ["RESUMABLE_KEYS", "check_compatible", "complete_rows", "flatten", "saved_config"]
