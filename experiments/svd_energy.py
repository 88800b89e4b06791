"""Experiment (d): FedKD's SVD energy schedule vs bytes vs accuracy, on MNIST-5k
(Dirichlet 0.5, 50 clients, student 784-100-10, teacher 784-200-200-10).

Schedules T_start -> T_end: none (uncompressed), 0.8->0.9, 0.9->0.95, 0.95->0.98 (the
paper's), 0.99->0.999.

    python experiments/svd_energy.py [--seeds 0,1,2] [--quick]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parse_args, rounds_note, run_grid, seeds_of, summarize, write_markdown  # noqa: E402

BASE = ["algorithm=fedkd", "data.dataset=mnist5k", "data.partition=dirichlet", "data.alpha=0.5", "data.num_clients=50",
        "run.cohort_size=10", "model.hidden=[100]", "distill.teacher_hidden=[200,200]"]
SCHEDULES = {"none": None, "0.8-0.9": (0.8, 0.9), "0.9-0.95": (0.9, 0.95), "0.95-0.98": (0.95, 0.98), "0.99-0.999": (0.99, 0.999)}


def cells(args):
    for name, sched in SCHEDULES.items():
        if args.quick and name not in ("none", "0.95-0.98"):
            continue
        comp = ["compression.method=none"] if sched is None else [
            "compression.method=svd", f"compression.energy_start={sched[0]}", f"compression.energy_end={sched[1]}"]
        for seed in seeds_of(args):
            rounds = 3 if args.quick else 100
            yield ({"schedule": name, "seed": seed},
                   BASE + comp + [f"run.rounds={rounds}", f"run.eval_every={rounds}", f"run.seed={seed}"])


def main(argv=None):
    args = parse_args(__doc__, argv)
    rows = run_grid("svd_energy", cells(args), results_dir=args.results, runs_dir=args.runs)
    out = args.results or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "svd_energy")
    metrics = ["student_accuracy", "teacher_accuracy_mean", "total_bytes_up"]
    summary = summarize(rows, ["schedule"], metrics)
    full = next((s["total_bytes_up"] for s in summary if s["schedule"] == "none"), None)
    for s in summary:
        s["compression_x"] = (full / s["total_bytes_up"]) if full else None
        s["compression_x_std"] = 0.0
    write_markdown(os.path.join(out, "summary.md"), "Experiment (d): SVD energy schedule (FedKD)", summary, ["schedule"],
                   metrics + ["compression_x"], note=f"MNIST-5k, 50 clients, Dirichlet(0.5), {rounds_note(rows)}; compression_x = "
                   "uncompressed upload bytes / this schedule's upload bytes. Mean ± std over seeds.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summary:
        ax.errorbar(s["total_bytes_up"] / 1e6, s["student_accuracy"], yerr=s["student_accuracy_std"], fmt="o")
        ax.annotate(s["schedule"], (s["total_bytes_up"] / 1e6, s["student_accuracy"]), fontsize=8)
    ax.set_xlabel("total MB uploaded")
    ax.set_ylabel("student accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_bytes.png"), dpi=120)


if __name__ == "__main__":
    main()
