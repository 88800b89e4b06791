"""Benchmark W2: FedKD vs FedAvg of the teacher-size and of the student-size model.

Workload: MNIST-5k's 4,000 training rows over 20 clients by Dirichlet label
skew (alpha 0.5). Each client's rows are split 80/20 into local train and
local test, and the other 1,000 rows are a global holdout that no client
holds. All 20 clients train every round: 1 local epoch, batch 10, SGD lr 0.05,
for 20 rounds. The teacher is an MLP 784-200-200-10 (private, FedKD only)
and the student an MLP 784-100-10 (shared). FedKD uploads its student's
update compressed by SVD with energy 0.95 -> 0.98.

Reported per method: training seconds per round (median, evaluation
excluded); holdout accuracy of the global (student) model; mean accuracy on
the local test splits of the clients' teachers (FedKD) or of the global
model (FedAvg); bytes uploaded per round. Then the goal checks, with the
FLOP ratio that teacher + student imply. JSON is the last line and is saved
to benchmarks/results/w2.json.

    python benchmarks/w2.py [--rounds 20] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import fedkd_jax as fk

fk.configure_cpu_devices()  # one CPU device per core, before JAX starts

import jax
import numpy as np

from fedkd_jax.builders import (auto_group_size, build_algorithm, build_compressor, build_data, build_model,
                                client_weighting)
from fedkd_jax.config import load_config
from fedkd_jax.engine import make_evaluator, make_personal_evaluator, summarize_clients

COMMON = [
    "data.dataset=mnist5k", "data.partition=dirichlet", "data.alpha=0.5", "data.num_clients=20",
    "data.test_fraction=0.2", "data.global_test_fraction=0.2",
    "client.lr=0.05", "client.batch_size=10", "client.local_epochs=1",
    "distill.teacher_hidden=[200,200]", "distill.teacher_lr=0.05",
    "compression.energy_start=0.95", "compression.energy_end=0.98",
    "run.cohort_size=20",
]
METHODS = {
    "fedkd": ["algorithm=fedkd", "model.hidden=[100]", "compression.method=svd"],
    "fedavg_teacher_size": ["algorithm=fedavg", "model.hidden=[200,200]", "compression.method=none"],
    "fedavg_student_size": ["algorithm=fedavg", "model.hidden=[100]", "compression.method=none"],
}


def flops_per_example(sizes) -> int:
    w = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    return 6 * sum(w) - 2 * w[0]


def run_method(name: str, rounds: int, seed: int, *, group_size: int | None = None, overrides=()) -> dict:
    """One method of W2. ``group_size``: clients vmapped together per device (``None``:
    ``run.group_size=auto``); ``overrides``: extra ``key=value`` settings over the workload's."""
    cfg = load_config(None, COMMON + METHODS[name] + [f"run.rounds={rounds}", f"run.seed={seed}", *overrides])
    data = build_data(cfg)
    model = build_model(cfg, data)
    alg = build_algorithm(cfg, model, data)
    group = group_size or auto_group_size(-(-cfg.run.cohort_size // jax.device_count()))
    sim = fk.Simulator(alg, data, cohort_size=cfg.run.cohort_size, group_size=group, compressor=build_compressor(cfg),
                       downlink=build_compressor(cfg, downlink=True), weighting=client_weighting(cfg))
    dev = sim.put_data()
    state = sim.put_state(sim.init(seed))
    t = time.perf_counter()
    sim.lower(state, dev).compile()
    compile_s = time.perf_counter() - t
    times, up, down = [], [], []
    for r in range(rounds):
        t = time.perf_counter()
        state, m = sim.step(state, dev)
        times.append(time.perf_counter() - t)
        up.append(float(np.asarray(m["bytes_up_clients"]).sum()))
        down.append(cfg.run.cohort_size * float(m["bytes_down_client"]) if "bytes_down_client" in m
                    else sim.round_bytes()[1])
    evd = sim.eval_data()
    ev = make_evaluator(model.apply)(alg.model_params(state.server), evd)
    if alg.personal_model is not None:
        local = make_personal_evaluator(alg.personal_model.apply)(alg.personal_params(sim.client_states(state.key)), evd)
    else:
        local = ev["client_accuracy"]
    local_summary = summarize_clients(np.asarray(local), prefix="local")
    # the first timed round includes jit's own cache fill; the median ignores it
    return {
        "method": name,
        "group_size": group,
        "sec_per_round": float(np.median(times)),
        "compile_sec": compile_s,
        "holdout_accuracy": float(ev["test_accuracy"]),
        "local_test_accuracy_mean": local_summary["local_mean"],
        "bytes_up_per_round": float(np.mean(up)),
        "bytes_up_first_round": up[0],
        "bytes_up_last_round": up[-1],
        "bytes_down_per_round": float(np.mean(down)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; figures are averaged")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "w2.json"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = {name: [run_method(name, args.rounds, s) for s in seeds] for name in METHODS}
    summary = {}
    for name, runs in per_seed.items():
        keys = [k for k in runs[0] if k != "method"]
        summary[name] = {k: float(np.mean([r[k] for r in runs])) for k in keys}
        if len(runs) > 1:
            summary[name]["holdout_accuracy_std"] = float(np.std([r["holdout_accuracy"] for r in runs]))
        s = summary[name]
        print(f"{name:20s} {s['sec_per_round'] * 1e3:7.1f} ms/round  holdout acc {s['holdout_accuracy']:.4f}  "
              f"local-test acc {s['local_test_accuracy_mean']:.4f}  bytes up/round {s['bytes_up_per_round'] / 1e6:.3f} MB", flush=True)

    kd, big, small = summary["fedkd"], summary["fedavg_teacher_size"], summary["fedavg_student_size"]
    implied = (flops_per_example([784, 200, 200, 10]) + flops_per_example([784, 100, 10])) / flops_per_example([784, 100, 10])
    checks = {
        "student_accuracy_vs_student_fedavg": kd["holdout_accuracy"] - small["holdout_accuracy"],
        "bytes_ratio_vs_teacher_fedavg": kd["bytes_up_per_round"] / big["bytes_up_per_round"],
        "time_ratio_vs_student_fedavg": kd["sec_per_round"] / small["sec_per_round"],
        "flop_ratio_implied": implied,
    }
    checks["goal_accuracy_met"] = checks["student_accuracy_vs_student_fedavg"] >= 0
    checks["goal_bytes_met"] = checks["bytes_ratio_vs_teacher_fedavg"] <= 0.2
    checks["goal_time_met"] = checks["time_ratio_vs_student_fedavg"] <= implied
    print(f"FedKD student - student FedAvg holdout accuracy: {checks['student_accuracy_vs_student_fedavg']:+.4f} "
          f"(goal >= 0: {checks['goal_accuracy_met']})")
    print(f"FedKD bytes up / teacher-size FedAvg: {checks['bytes_ratio_vs_teacher_fedavg']:.3f} (goal <= 0.2: {checks['goal_bytes_met']})")
    print(f"FedKD time / student FedAvg time: {checks['time_ratio_vs_student_fedavg']:.2f} vs FLOP ratio {implied:.2f} "
          f"(goal <=: {checks['goal_time_met']})")
    out = {"benchmark": "W2", "rounds": args.rounds, "seeds": seeds, "devices": jax.device_count(),
           "summary": summary, "checks": checks, "per_seed": per_seed}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
