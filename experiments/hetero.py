"""Heterogeneous clients: the methods for mixed architectures, each against its paper's claim.

Data: scikit-learn's digits (8x8, what ships offline), so absolute numbers are
not the papers'; the comparisons are within one setting.

* ``fedmd`` (Li & Wang 2019): 10 participants, each its own architecture
  (8 distinct: MLPs and CNNs of different widths), Dirichlet(0.5) private
  data, a labeled public set of held-out rows. Each participant's model on
  the global test set under FedMD against the same participant trained alone
  (transfer learning on the public set, then its private data: FedMD with
  the digest step off, the paper's baseline). The claim: every participant
  gains.
* ``bytes`` (FD, Jeong et al. 2018; FedProto, Tan et al. 2022): accuracy
  against bytes uploaded, three architecture groups, against FedAvg on one
  shared architecture (the middle one).
* ``width`` (HeteroFL, Diao et al. 2021; FedRolex, Alam et al. 2022): a
  mixed-capacity population (widths 1, 1/2, 1/4 of a CNN) against the
  full-width model alone and the smallest model alone (FedAvg), and
  FedRolex's rolling window against HeteroFL's static slice.
* ``table``: every method on one population of three architectures:
  per-group accuracy, bytes and seconds per round.

    python experiments/hetero.py [--seeds 0,1] [--quick] [--only fedmd,bytes,width,table]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HERE, parse_args, run_grid, seeds_of, summarize, write_markdown  # noqa: E402

NAME = "hetero"
PARTS = ("fedmd", "bytes", "width", "table")
FEDMD_MODELS = [
    "{kind: mlp, hidden: [16]}", "{kind: mlp, hidden: [32]}", "{kind: mlp, hidden: [64]}",
    "{kind: mlp, hidden: [128]}", "{kind: mlp, hidden: [32, 32]}", "{kind: mlp, hidden: [64, 64]}",
    "{kind: cnn, hidden: [32], channels: [8]}", "{kind: cnn, hidden: [64], channels: [16, 32]}",
    "{kind: mlp, hidden: [16]}", "{kind: cnn, hidden: [32], channels: [8]}",
]
THREE = ("model.groups=[{kind: mlp, hidden: [32], share: 0.4}, {kind: mlp, hidden: [128, 128], share: 0.3}, "
         "{kind: cnn, hidden: [64], channels: [16, 32], share: 0.3}]")
BASE = ["data.dataset=digits", "data.partition=dirichlet", "data.alpha=0.5", "run.eval_every=10"]


def group_metrics(prefixes):
    def extract(hist):
        ev = [r for r in hist if r.get("test_accuracy") is not None][-1]
        out = {}
        for k, v in ev.items():
            if k.endswith(("_test_accuracy", "_local_acc_mean")) or k == "group_acc_spread":
                out[k] = v
        rt = [r["round_time"] for r in hist if r.get("round_time") is not None]
        out["seconds_per_round"] = sorted(rt)[len(rt) // 2] if rt else None
        return out
    return extract


def fedmd_cells(seeds, rounds):
    groups = "model.groups=[" + ", ".join(m[:-1] + f", clients: [{i}]}}" for i, m in enumerate(FEDMD_MODELS)) + "]"
    common = BASE + ["algorithm=fedmd", "data.num_clients=10", "run.cohort_size=10", "data.proxy_fraction=0.2",
                     "client.optimizer=adam", "client.lr=0.001", "distill.public_epochs=5", "distill.public_subset=300",
                     f"run.rounds={rounds}", groups]
    for s in seeds:
        yield {"method": "fedmd", "seed": s}, common + [f"run.seed={s}"]
        yield {"method": "alone", "seed": s}, common + [f"run.seed={s}", "distill.digest_epochs=0"]


def bytes_cells(seeds, rounds):
    common = BASE + ["data.num_clients=50", "run.cohort_size=10", f"run.rounds={rounds}"]
    for s in seeds:
        yield {"method": "fd", "seed": s}, common + ["algorithm=fd", THREE, f"run.seed={s}"]
        yield {"method": "fedproto", "seed": s}, common + ["algorithm=fedproto", THREE, "model.proto_dim=32",
                                                          f"run.seed={s}"]
        yield {"method": "fedavg (mlp 128-128)", "seed": s}, common + [
            "algorithm=fedavg", "model.hidden=[128, 128]", f"run.seed={s}"]


def width_cells(seeds, rounds):
    common = BASE + ["data.num_clients=50", "run.cohort_size=10", f"run.rounds={rounds}", "model.kind=cnn",
                     "model.hidden=[64]", "model.channels=[16, 32]"]
    mixed = ("model.groups=[{kind: cnn, width: 1.0, share: 0.34}, {kind: cnn, width: 0.5, share: 0.33}, "
             "{kind: cnn, width: 0.25, share: 0.33}]")
    for s in seeds:
        for alg in ("heterofl", "fedrolex"):
            yield {"method": alg, "seed": s}, common + [f"algorithm={alg}", mixed, f"run.seed={s}"]
        yield {"method": "fedavg full width", "seed": s}, common + ["algorithm=fedavg", f"run.seed={s}"]
        yield {"method": "fedavg width 1/4", "seed": s}, common + [
            "algorithm=fedavg", "model.hidden=[16]", "model.channels=[4, 8]", f"run.seed={s}"]


def table_cells(seeds, rounds, methods):
    common = BASE + ["data.num_clients=50", "run.cohort_size=10", f"run.rounds={rounds}", "data.proxy_fraction=0.1"]
    extra = {"fedproto": ["model.proto_dim=32"], "fedkd": ["model.hidden=[32]"], "fedmd": ["distill.public_subset=150"]}
    widths = ["model.kind=cnn", "model.hidden=[64]", "model.channels=[16, 32]",
              "model.groups=[{width: 0.25, share: 0.4}, {width: 0.5, share: 0.3}, {width: 1.0, share: 0.3}]"]
    for s in seeds:
        for m in methods:
            groups = widths if m in ("heterofl", "fedrolex") else [THREE]
            yield {"method": m, "seed": s}, common + [f"algorithm={m}", f"run.seed={s}"] + groups + extra.get(m, [])


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv, only=PARTS)
    seeds = seeds_of(args)
    quick = args.quick
    results = os.path.join(HERE, "results", NAME)
    parts = args.only or PARTS
    if "fedmd" in parts:
        rows = run_grid(f"{NAME}-fedmd", fedmd_cells(seeds, 10 if quick else 40), extract=group_metrics(None),
                        results_dir=os.path.join(results, "fedmd"))
        cols = [f"g{i}_test_accuracy" for i in range(len(FEDMD_MODELS))]
        summary = summarize(rows, ["method"], cols)
        write_markdown(os.path.join(results, "fedmd", "summary.md"), "FedMD: each participant, FedMD vs alone",
                       summary, ["method"], cols, note="g<i>: participant i's own architecture (models in the "
                       "script's FEDMD_MODELS); accuracy of its model on the global test set.")
    if "bytes" in parts:
        rows = run_grid(f"{NAME}-bytes", bytes_cells(seeds, 20 if quick else 100), extract=group_metrics(None),
                        results_dir=os.path.join(results, "bytes"))
        cols = ["student_accuracy", "client_accuracy_mean", "g0_proto_test_accuracy", "g1_proto_test_accuracy",
                "g2_proto_test_accuracy", "total_bytes_up", "seconds_per_round"]
        write_markdown(os.path.join(results, "bytes", "summary.md"), "FD and FedProto: accuracy against bytes",
                       summarize(rows, ["method"], cols), ["method"], cols,
                       note="student_accuracy: fd / fedproto: the clients' own models on the global test set (mean "
                            "over evaluated clients); fedavg: the global model. client_accuracy_mean: the same models "
                            "on the clients' local tests. g<i>_proto_test_accuracy: FedProto's nearest-prototype "
                            "inference per group.")
    if "width" in parts:
        rows = run_grid(f"{NAME}-width", width_cells(seeds, 20 if quick else 100), extract=group_metrics(None),
                        results_dir=os.path.join(results, "width"))
        cols = ["student_accuracy", "client_accuracy_mean", "g0_test_accuracy", "g1_test_accuracy",
                "g2_test_accuracy", "total_bytes_up"]
        write_markdown(os.path.join(results, "width", "summary.md"), "HeteroFL and FedRolex: mixed widths",
                       summarize(rows, ["method"], cols), ["method"], cols)
    if "table" in parts:
        methods = ("fd", "fedproto", "fedmd", "feddf", "fedkd", "heterofl", "fedrolex")
        rows = run_grid(f"{NAME}-table", table_cells(seeds, 20 if quick else 60, methods),
                        extract=group_metrics(None), results_dir=os.path.join(results, "table"))
        cols = ["student_accuracy", "g0_test_accuracy", "g1_test_accuracy", "g2_test_accuracy", "group_acc_spread",
                "total_bytes_up", "seconds_per_round"]
        write_markdown(os.path.join(results, "table", "summary.md"), "Every heterogeneous method, three groups",
                       summarize(rows, ["method"], cols), ["method"], cols,
                       note="groups: g0 mlp 64-32, g1 mlp 64-128-128, g2 cnn 16/32 + dense 64 (shares 0.4/0.3/0.3); "
                            "fedkd: the groups are the private teachers of an mlp-32 student; heterofl and fedrolex: "
                            "widths 1/4, 1/2, 1 of that cnn (g0, g1, g2)")


if __name__ == "__main__":
    main()
