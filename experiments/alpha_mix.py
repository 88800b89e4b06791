"""Experiment (c): the CE/KD mix alpha in {0.1, 0.5, 0.9} of server-teacher KD
(loss = alpha * CE + (1 - alpha) * T^2 * KL, T = 2) on digits, Dirichlet 0.1 and 0.5.

    python experiments/alpha_mix.py [--seeds 0,1,2] [--quick]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parse_args, rounds_note, run_grid, seeds_of, summarize, write_markdown  # noqa: E402
from sweep_plot import line_plot  # noqa: E402

BASE = ["algorithm=server_teacher_kd", "data.dataset=digits", "data.partition=dirichlet", "data.num_clients=50",
        "data.proxy_fraction=0.1", "run.cohort_size=10", "model.hidden=[32]", "distill.teacher_hidden=[128,128]",
        "distill.temperature=2"]


def cells(args):
    for skew in (["0.5"] if args.quick else ["0.1", "0.5"]):
        for mix in ([0.5] if args.quick else [0.1, 0.5, 0.9]):
            for seed in seeds_of(args):
                rounds = 3 if args.quick else 200
                yield ({"label_alpha": skew, "mix_alpha": mix, "seed": seed},
                       BASE + [f"data.alpha={skew}", f"distill.alpha={mix}", f"run.rounds={rounds}",
                               f"run.eval_every={rounds}", f"run.seed={seed}"])


def main(argv=None):
    args = parse_args(__doc__, argv)
    rows = run_grid("alpha_mix", cells(args), results_dir=args.results, runs_dir=args.runs)
    out = args.results or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "alpha_mix")
    metrics = ["student_accuracy"]
    summary = summarize(rows, ["label_alpha", "mix_alpha"], metrics)
    write_markdown(os.path.join(out, "summary.md"), "Experiment (c): CE/KD mix alpha (server-teacher KD)", summary,
                   ["label_alpha", "mix_alpha"], metrics, note=f"digits, 50 clients, T = 2, {rounds_note(rows)}; mean ± std over seeds.")
    line_plot(summary, "mix_alpha", "student_accuracy", "label_alpha", os.path.join(out, "accuracy_vs_mix.png"))


if __name__ == "__main__":
    main()
