"""Experiment (a): FedAvg (student size), FedAvg (teacher size), FedKD, server-teacher
KD and FedDF on digits and MNIST-5k, Dirichlet alpha in {0.1, 0.5, 100}, 3 seeds.

Reports final student (global) accuracy on the held-out test set, mean teacher
accuracy on the clients' local test splits (FedKD's private teachers), and the
total bytes uploaded and downloaded.

    python experiments/compare_algorithms.py [--seeds 0,1,2] [--quick]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parse_args, run_grid, seeds_of, summarize, write_markdown  # noqa: E402

DATASETS = {
    # student, teacher widths; rounds
    "digits": ("[32]", "[128,128]", 200),
    "mnist5k": ("[100]", "[200,200]", 100),
}
ALGORITHMS = {
    "fedavg_student": lambda s, t: ["algorithm=fedavg", f"model.hidden={s}"],
    "fedavg_teacher_size": lambda s, t: ["algorithm=fedavg", f"model.hidden={t}"],
    "fedkd": lambda s, t: ["algorithm=fedkd", f"model.hidden={s}", f"distill.teacher_hidden={t}"],
    "server_teacher_kd": lambda s, t: ["algorithm=server_teacher_kd", f"model.hidden={s}", f"distill.teacher_hidden={t}",
                                       "distill.temperature=2", "distill.alpha=0.5"],
    "feddf": lambda s, t: ["algorithm=feddf", f"model.hidden={s}"],
}


def cells(args):
    for ds, (s, t, rounds) in DATASETS.items():
        for alpha in (["0.5"] if args.quick else ["0.1", "0.5", "100"]):
            for seed in seeds_of(args):
                for name, extra in ALGORITHMS.items():
                    yield ({"dataset": ds, "alpha": alpha, "algorithm": name, "seed": seed}, [
                        f"data.dataset={ds}", "data.partition=dirichlet", f"data.alpha={alpha}",
                        "data.num_clients=50", "data.proxy_fraction=0.1", "run.cohort_size=10",
                        f"run.rounds={3 if args.quick else rounds}", f"run.eval_every={3 if args.quick else rounds}",
                        f"run.seed={seed}", *extra(s, t),
                    ])


def main(argv=None):
    args = parse_args(__doc__, argv)
    rows = run_grid("compare_algorithms", cells(args), results_dir=args.results, runs_dir=args.runs)
    out = args.results or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compare_algorithms")
    metrics = ["student_accuracy", "teacher_accuracy_mean", "total_bytes_up", "total_bytes_down"]
    summary = summarize(rows, ["dataset", "alpha", "algorithm"], metrics)
    write_markdown(os.path.join(out, "summary.md"), "Experiment (a): algorithms x datasets x label skew", summary,
                   ["dataset", "alpha", "algorithm"], metrics,
                   note="50 clients (Dirichlet label skew alpha), 10 per round; 10% of the training pool held out as the "
                        "unlabeled proxy set for every method (used by FedDF and server-teacher KD). Mean ± std over seeds.")
    plot(summary, out)


def plot(summary, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({s["dataset"] for s in summary})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for s in [s for s in summary if s["dataset"] == ds]:
            ax.errorbar(s["total_bytes_up"] / 1e6, s["student_accuracy"], yerr=s["student_accuracy_std"], fmt="o", ms=4)
            ax.annotate(f"{s['algorithm']} a={s['alpha']}", (s["total_bytes_up"] / 1e6, s["student_accuracy"]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("total MB uploaded")
        ax.set_ylabel("student accuracy")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_bytes.png"), dpi=120)


if __name__ == "__main__":
    main()
