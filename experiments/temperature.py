"""Experiment (b): distillation temperature T in {1, 2, 4, 8}, for FedKD (mutual KL
at temperature T) and server-teacher KD (alpha 0.5), on digits with Dirichlet(0.5).

    python experiments/temperature.py [--seeds 0,1,2] [--quick]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parse_args, rounds_note, run_grid, seeds_of, summarize, write_markdown  # noqa: E402
from sweep_plot import line_plot  # noqa: E402

BASE = ["data.dataset=digits", "data.partition=dirichlet", "data.alpha=0.5", "data.num_clients=50",
        "data.proxy_fraction=0.1", "run.cohort_size=10", "model.hidden=[32]", "distill.teacher_hidden=[128,128]"]


def cells(args):
    for algo in ("fedkd", "server_teacher_kd"):
        for temp in ([2] if args.quick else [1, 2, 4, 8]):
            for seed in seeds_of(args):
                rounds = 3 if args.quick else 200
                yield ({"algorithm": algo, "temperature": temp, "seed": seed},
                       BASE + [f"algorithm={algo}", f"distill.temperature={temp}", f"run.rounds={rounds}",
                               f"run.eval_every={rounds}", f"run.seed={seed}"])


def main(argv=None):
    args = parse_args(__doc__, argv)
    rows = run_grid("temperature", cells(args), results_dir=args.results, runs_dir=args.runs)
    out = args.results or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "temperature")
    metrics = ["student_accuracy", "teacher_accuracy_mean"]
    summary = summarize(rows, ["algorithm", "temperature"], metrics)
    write_markdown(os.path.join(out, "summary.md"), "Experiment (b): distillation temperature", summary,
                   ["algorithm", "temperature"], metrics, note=f"digits, 50 clients, Dirichlet(0.5), {rounds_note(rows)}; mean ± std over seeds.")
    line_plot(summary, "temperature", "student_accuracy", "algorithm", os.path.join(out, "accuracy_vs_temperature.png"), logx=True)


if __name__ == "__main__":
    main()
