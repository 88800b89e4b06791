"""Run-directory outputs: ``metrics.jsonl``, ``metrics.csv`` and the accuracy plot."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Iterable

BASE_COLUMNS = [
    "round",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "client_acc_mean",
    "client_acc_p10",
    "client_acc_p90",
    "teacher_acc_mean",
    "teacher_acc_p10",
    "teacher_acc_p90",
    "round_time",
    "wall_time",
    "eval_time",
    "eval_seconds",
    "checkpoint_seconds",
    "bytes_up",
    "bytes_down",
    "cum_bytes_up",
    "cum_bytes_down",
]


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLog:
    """Appends one row per round to ``metrics.jsonl`` and ``metrics.csv``.

    The CSV columns are :data:`BASE_COLUMNS` plus the extra keys of the first
    row written (fixed thereafter); the JSONL rows carry every key.
    """

    def __init__(self, run_dir: str, *, writable: bool = True):
        self.writable = writable  # False on every process but the first of a multi-process job
        self.jsonl_path = os.path.join(run_dir, "metrics.jsonl")
        self.csv_path = os.path.join(run_dir, "metrics.csv")
        self.columns: list[str] | None = None
        self.rows: list[dict[str, Any]] = []

    def reset(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite both files to hold exactly ``rows``, each by an atomic replace.

        ``metrics.jsonl`` is the source of truth: a resume rebuilds the CSV from it.
        """
        rows = [{k: _clean(v) for k, v in r.items()} for r in rows]
        self.rows = list(rows)
        self.columns = None
        if rows:
            extra = sorted(k for k in rows[0] if k not in BASE_COLUMNS)
            self.columns = BASE_COLUMNS + extra
        if not self.writable:
            return
        with open(self.jsonl_path + ".tmp", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.jsonl_path + ".tmp", self.jsonl_path)
        with open(self.csv_path + ".tmp", "w", newline="") as f:
            if self.columns:
                w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
                w.writeheader()
                for r in rows:
                    w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in self.columns})
        os.replace(self.csv_path + ".tmp", self.csv_path)

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = [{k: _clean(v) for k, v in r.items()} for r in rows]
        if not rows:
            return
        if not self.writable:
            self.rows.extend(rows)
            return
        if self.columns is None:
            extra = sorted(k for k in rows[0] if k not in BASE_COLUMNS)
            self.columns = BASE_COLUMNS + extra
            if not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0:
                with open(self.csv_path, "w", newline="") as f:
                    csv.writer(f).writerow(self.columns)
        with open(self.jsonl_path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with open(self.csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in self.columns})
        self.rows.extend(rows)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def preload_plotting() -> None:
    """Import matplotlib on a background thread (a quarter second) while the run's rounds
    compute, so the plot at the end does not wait for it."""
    import threading

    def load():
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot  # noqa: F401
        except Exception:  # noqa: BLE001 - plot_accuracy reports any real problem itself
            pass

    threading.Thread(target=load, name="fedkd-preload-plotting", daemon=True).start()


def _groups(row: dict[str, Any], suffix: str = "_test_accuracy") -> list[str]:
    """Architecture-group names present in ``row`` (keys ``<group><suffix>``)."""
    return sorted(k[: -len(suffix)] for k in row if k.endswith(suffix) and "proto" not in k and k != suffix[1:]
                  and not k.startswith("cum"))


def plot_accuracy(rows: list[dict[str, Any]], path: str, *, title: str = "") -> None:
    """Left: global (student) test accuracy with the p10-p90 band of per-client
    accuracy, mean teacher accuracy when present, each architecture group's
    test accuracy, and train loss. Right: cumulative megabytes uploaded and
    downloaded (and uploaded per group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axb) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    ev = [r for r in rows if r.get("test_accuracy") is not None]
    if ev:
        rr = [r["round"] for r in ev]
        ax.plot(rr, [r["test_accuracy"] for r in ev], "o-", ms=3, label="global model, test set")
        if all(r.get("client_acc_p10") is not None for r in ev):
            ax.fill_between(rr, [r["client_acc_p10"] for r in ev], [r["client_acc_p90"] for r in ev],
                            alpha=0.2, label="global model on local tests, p10-p90")
        if all(r.get("teacher_acc_mean") is not None for r in ev):
            ax.plot(rr, [r["teacher_acc_mean"] for r in ev], "s--", ms=3, label="private teachers, local tests (mean)")
        for g in _groups(ev[-1]):  # architecture groups: each group's models on the global test set
            ax.plot(rr, [r.get(f"{g}_test_accuracy") for r in ev], ":", lw=1.2, label=f"{g}, test set")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    tr = [r for r in rows if r.get("train_loss") is not None]
    handles, labels = ax.get_legend_handles_labels()
    if tr:
        ax2 = ax.twinx()
        ax2.plot([r["round"] for r in tr], [r["train_loss"] for r in tr], color="gray", lw=0.8, alpha=0.5, label="train loss")
        ax2.set_ylabel("train loss")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="center right", fontsize=8)
    ax.set_title(title)
    if rows and rows[0].get("cum_bytes_up") is not None:
        rr = [r["round"] for r in rows]
        axb.plot(rr, [r["cum_bytes_up"] / 1e6 for r in rows], label="uploaded")
        axb.plot(rr, [r["cum_bytes_down"] / 1e6 for r in rows], label="downloaded")
        for g in _groups(rows[-1], "_cum_bytes_up"):
            axb.plot(rr, [r.get(f"{g}_cum_bytes_up", 0) / 1e6 for r in rows], ":", lw=1.2, label=f"{g} uploaded")
        axb.set_xlabel("round")
        axb.set_ylabel("cumulative MB")
        axb.grid(alpha=0.3)
        axb.legend(fontsize=8)
        axb.set_title("communication")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
