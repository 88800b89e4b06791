"""Shared runner for the experiment scripts: a grid of configs, run in process.

Each cell is one ``fedkd run`` (same config system, same outputs) written to
``runs/experiments/<name>/<cell>/`` (git-ignored). The script then collects the
final metrics into ``experiments/results/<name>/``: ``results.csv`` (one row
per run), ``summary.md`` (mean ± std over seeds) and plots.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from typing import Any, Callable, Iterable, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_args(description: str, argv: Sequence[str] | None = None, *,
               only: Sequence[str] = ()) -> argparse.Namespace:
    """The scripts' common options; with ``only`` (the script's parts), also ``--only``,
    parsed into ``args.only``: the chosen names in the order given (default all)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--quick", action="store_true", help="tiny smoke version (few rounds, one seed)")
    ap.add_argument("--results", default=None, help="results folder (default experiments/results/<name>)")
    ap.add_argument("--runs", default=None, help="folder for the individual runs (default runs/experiments/<name>)")
    if only:
        ap.add_argument("--only", default=list(only), type=_names(only), metavar="NAME[,NAME...]",
                        help=f"run only these parts, comma-separated, from: {', '.join(only)} (default: all)")
    return ap.parse_args(argv)


def _names(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"name at least one of: {', '.join(allowed)}")
        for n in names:
            if n not in allowed:
                raise argparse.ArgumentTypeError(f"unknown part {n!r}; choose from: {', '.join(allowed)}")
        return names

    return parse


def rounds_note(rows: list[dict]) -> str:
    """"3 rounds" (or "3-5 rounds"): what the runs of ``rows`` really trained, for summaries."""
    done = sorted({int(r["rounds"]) for r in rows})
    return f"{done[0]} rounds" if len(done) == 1 else f"{done[0]}-{done[-1]} rounds"


def run_grid(name: str, cells: Iterable[tuple[dict[str, Any], list[str]]], *, results_dir: str | None = None,
             runs_dir: str | None = None, extract: Callable[[list[dict]], dict] | None = None) -> list[dict]:
    """Run every ``(labels, overrides)`` cell; return one row of labels + final metrics per run
    (plus ``extract(metrics_rows)`` when given, e.g. rounds to a target accuracy)."""
    import fedkd_jax as fk
    from fedkd_jax.config import load_config
    from fedkd_jax.runner import read_jsonl

    out_root = runs_dir or os.path.join(ROOT, "runs", "experiments", name)
    rows = []
    cells = list(cells)
    for i, (labels, overrides) in enumerate(cells):
        cell = "-".join(f"{k}={v}" for k, v in labels.items())
        out = os.path.join(out_root, cell)
        if os.path.exists(out):
            shutil.rmtree(out)
        cfg = load_config(None, list(overrides) + ["run.progress=false", "run.keep_checkpoints=1", "run.checkpoint_every=100000"])
        print(f"[{name} {i + 1}/{len(cells)}] {cell}", flush=True)
        res = fk.run(cfg, out)  # the Python API: same validation, outputs and resume as `fedkd run`
        hist = read_jsonl(os.path.join(out, "metrics.jsonl"))
        last = hist[-1]
        row = dict(labels)
        row.update(
            student_accuracy=last.get("test_accuracy"),
            client_accuracy_mean=last.get("client_acc_mean"),
            teacher_accuracy_mean=last.get("teacher_acc_mean"),
            total_bytes_up=last["cum_bytes_up"],
            total_bytes_down=last["cum_bytes_down"],
            rounds=last["round"],
            seconds=res.seconds,
        )
        if extract is not None:
            row.update(extract(hist))
        rows.append(row)
        acc = row["student_accuracy"]
        print(f"    student acc {acc if acc is None else round(acc, 4)}  teacher acc {row['teacher_accuracy_mean']}  "
              f"up {row['total_bytes_up'] / 1e6:.2f} MB  {res.seconds:.1f} s", flush=True)
    results = results_dir or os.path.join(HERE, "results", name)
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))  # cells may differ
        w.writeheader()
        w.writerows(rows)
    return rows


def summarize(rows: list[dict], group: list[str], metrics: list[str]) -> list[dict]:
    """Mean and std over seeds of ``metrics`` for each distinct ``group`` key."""
    keys: dict[tuple, list[dict]] = {}
    for r in rows:
        keys.setdefault(tuple(r[g] for g in group), []).append(r)
    out = []
    for k, rs in keys.items():
        d = dict(zip(group, k))
        d["runs"] = len(rs)
        for m in metrics:
            vals = [r[m] for r in rs if r.get(m) is not None]
            d[m] = float(np.mean(vals)) if vals else None
            d[m + "_std"] = float(np.std(vals)) if vals else None
        out.append(d)
    return out


def fmt(v: Any, metric: str) -> str:
    if v is None:
        return "–"
    if "bytes" in metric:
        return f"{v / 1e6:.2f} MB"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def write_markdown(path: str, title: str, summary: list[dict], group: list[str], metrics: list[str], note: str = "") -> None:
    lines = [f"# {title}", ""]
    if note:
        lines += [note, ""]
    lines.append("| " + " | ".join(group + metrics + ["runs"]) + " |")
    lines.append("|" + "---|" * (len(group) + len(metrics) + 1))
    for s in summary:
        cells = [str(s[g]) for g in group]
        for m in metrics:
            v, sd = s[m], s[m + "_std"]
            cells.append(fmt(v, m) if v is None or "bytes" in m else f"{v:.4f} ± {sd:.4f}")
        cells.append(str(s["runs"]))
        lines.append("| " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def seeds_of(args) -> list[int]:
    return [0] if args.quick else [int(s) for s in args.seeds.split(",")]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run one of the experiment scripts instead")
