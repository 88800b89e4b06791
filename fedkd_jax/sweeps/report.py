"""A sweep's outputs: the table (CSV, Parquet), per-setting statistics, plots, a report.

* ``sweep.csv`` / ``sweep.parquet``: one row per run and round, labelled with
  the swept settings, the seed and the run's directory.
* ``summary.csv``: per setting (grid point), the mean and standard deviation
  over seeds of each run's final metrics.
* ``accuracy_vs_round.png``: per setting, test accuracy against round, the
  band one standard deviation over seeds wide.
* ``final_vs_<key>.png``: final accuracy against each swept setting, error
  bars over seeds (and over the other settings' values).
* ``report.md``: the grid, the summary table and the plots.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FINAL_METRICS = ("test_accuracy", "test_loss", "train_loss", "teacher_acc_mean", "client_acc_mean",
                 "cum_bytes_up", "cum_bytes_down", "epsilon")


@dataclass
class SweepResult:
    """What :func:`fedkd_jax.sweeps` returns.

    Attributes:
      rows: one dict per run and round (the sweep table).
      summary: one dict per setting: mean and std over seeds of final metrics.
      runs: per run, its label values, seed, directory and :class:`RunResult`.
      out_dir: the sweep's directory.
      keys: the swept settings.
      compiled_programs: round programs compiled (one per static configuration
        and dispatch length).
      runs_per_device: per program group, the runs batched on each device
        (``run.runs_per_device``, ``auto`` resolved).
      runs_per_wave: per program group, the runs one dispatch trains together
        (positions of the runs axis x runs per device, at most the group's runs).
    """

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    out_dir: str
    keys: list[str]
    interrupted: bool = False
    compiled_programs: int = 0
    groups: int = 0
    runs_per_device: list[int] = field(default_factory=list)
    runs_per_wave: list[int] = field(default_factory=list)
    seconds: float = 0.0
    plots: list[str] = field(default_factory=list)

    def to_pandas(self):
        """The sweep table as a ``pandas.DataFrame`` (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self.rows)


def _finite(v):
    return isinstance(v, (int, float)) and v is not None and math.isfinite(v)


def write_outputs(out_dir: str, keys: list[str], done_runs: list, *, interrupted: bool, write: bool) -> SweepResult:
    rows, runs = [], []
    for spec, res in done_runs:
        labels = {k: v for k, v in spec.values}
        labels.update(seed=spec.seed, run=spec.dirname)
        runs.append({**labels, "result": res})
        for r in res.rows:
            rows.append({**labels, **r})
    groups: dict[tuple, list] = {}
    for run in runs:
        groups.setdefault(tuple(str(run[k]) for k in keys), []).append(run)
    summary = []
    for members in groups.values():
        s = {k: members[0][k] for k in keys}  # the values as swept (numbers stay numbers, as in summary.csv)
        s["seeds"] = len(members)
        for m in FINAL_METRICS:
            vals = [r["result"].final.get(m) for r in members if _finite(r["result"].final.get(m))]
            s[f"{m}_mean"] = float(np.mean(vals)) if vals else None
            s[f"{m}_std"] = float(np.std(vals)) if vals else None
        summary.append(s)
    result = SweepResult(rows, summary, runs, out_dir, keys, interrupted=interrupted)
    if write and rows:
        os.makedirs(out_dir, exist_ok=True)
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with open(os.path.join(out_dir, "sweep.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(rows)
        _parquet(os.path.join(out_dir, "sweep.parquet"), rows, columns)
        with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(summary[0]))
            w.writeheader()
            w.writerows(summary)
        result.plots = _plots(out_dir, keys, runs)
        _markdown(out_dir, keys, summary, result.plots)
    return result


def _parquet(path: str, rows: list[dict], columns: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {}
    for c in columns:
        vals = [r.get(c) for r in rows]
        if all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            cols[c] = pa.array([None if v is None else float(v) for v in vals], pa.float64())
        else:
            cols[c] = pa.array([None if v is None else str(v) for v in vals], pa.string())
    pq.write_table(pa.table(cols), path)


def _plots(out_dir: str, keys: list[str], runs: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    groups: dict[str, list] = {}
    for run in runs:
        groups.setdefault(", ".join(f"{k.split('.')[-1]}={run[k]}" for k in keys) or "all", []).append(run)
    for label, members in groups.items():
        curves = [[(r["round"], r["test_accuracy"]) for r in m["result"].rows if _finite(r.get("test_accuracy"))]
                  for m in members]
        common = sorted(set.intersection(*(set(x for x, _ in c) for c in curves))) if curves and all(curves) else []
        if not common:
            continue
        ys = np.array([[dict(c)[x] for x in common] for c in curves])
        mean, sd = ys.mean(0), ys.std(0)
        ax.plot(common, mean, marker="o", ms=3, label=label)
        ax.fill_between(common, mean - sd, mean + sd, alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (band: ±1 std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = os.path.join(out_dir, "accuracy_vs_round.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    for key in keys:
        by: dict[str, list] = {}
        for run in runs:
            acc = run["result"].final.get("test_accuracy")
            if _finite(acc):
                by.setdefault(str(run[key]), []).append(acc)
        if not by:
            continue
        xs = list(by)
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.errorbar(range(len(xs)), [np.mean(by[x]) for x in xs], yerr=[np.std(by[x]) for x in xs], marker="o",
                    capsize=3)
        ax.set_xticks(range(len(xs)), xs)
        ax.set_xlabel(key)
        ax.set_ylabel("final test accuracy")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = os.path.join(out_dir, f"final_vs_{key.replace('.', '_')}.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def _markdown(out_dir: str, keys: list[str], summary: list[dict], plots: list[str]) -> None:
    metrics = [m for m in FINAL_METRICS if any(s.get(f"{m}_mean") is not None for s in summary)]
    lines = ["# Sweep report", "", f"Swept: {', '.join(keys) or '(seeds only)'}; mean ± std over seeds.", "",
             "| " + " | ".join(keys + ["seeds"] + metrics) + " |", "|" + "---|" * (len(keys) + 1 + len(metrics))]
    for s in summary:
        cells = [str(s[k]) for k in keys] + [str(s["seeds"])]
        for m in metrics:
            mu, sd = s.get(f"{m}_mean"), s.get(f"{m}_std")
            cells.append("–" if mu is None else (f"{mu / 1e6:.2f} ± {sd / 1e6:.2f} MB" if "bytes" in m else f"{mu:.4f} ± {sd:.4f}"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
