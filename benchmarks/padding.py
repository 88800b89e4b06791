"""Benchmark: heavy-tailed client sizes, before and after the dynamic local loop.

Natural partitions are heavy-tailed (FEMNIST writers hold roughly 10-400
examples). A round used to run every client's local loop to the largest
client's step count (the empty batches changed nothing but still cost a
step); it now runs each client's real steps only. This measures both in one
run: the current code, and the code of ``--base`` (a commit, checked out in a
temporary git worktree and run in a subprocess).

Workload: MNIST-5k over 100 clients with Dirichlet(``--alpha``) quantity skew
(``data.partition=quantity``), FedAvg, MLP 784-200-200-10, batch 10, one
local epoch, cohorts 10 and 100. Printed per cohort: seconds per round
(median of ``--rounds``), the padding waste (the share of computed local
steps that held no real row: before, ``1 - sum(real steps) / (C * max
steps)`` in expectation; now 0 with one client per group) and the ratio
now / before. JSON last, saved to benchmarks/results/padding.json.

    python benchmarks/padding.py [--base cded706] [--rounds 20] [--alpha 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def child(rounds: int, alpha: float, cohorts: list[int]) -> dict:
    import time

    import fedkd_jax as fk

    fk.configure_cpu_devices()
    import jax
    import numpy as np
    import optax

    ds = fk.data.load_mnist5k()
    fd = fk.federate(ds, partition="quantity", num_clients=100, seed=0, alpha=alpha, test_fraction=0.0)
    steps = np.ceil(fd.counts / 10)
    out = {"sizes": {"min": int(fd.counts.min()), "median": float(np.median(fd.counts)), "max": int(fd.counts.max())},
           "expected_padding_waste_before": float(1 - steps.mean() / steps.max()), "cohorts": {}}
    for c in cohorts:
        model = fk.make_model("mlp", num_features=784, num_classes=10, hidden=(200, 200))
        sim = fk.Simulator(fk.fedavg(model, optax.sgd(0.05), optax.sgd(1.0), batch_size=10), fd, cohort_size=c)
        data = sim.put_data()
        state = sim.put_state(sim.init(0))
        state, _ = sim.step(state, data)  # compile
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            state, m = sim.step(state, data)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t)
        out["cohorts"][str(c)] = {"s_per_round": float(np.median(times)),
                                  "train_loss_last": float(np.asarray(m["train_loss"]).reshape(-1)[-1])}
    return out


def run(pythonpath: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--rounds", str(args.rounds),
                        "--alpha", str(args.alpha), "--cohorts", args.cohorts],
                       capture_output=True, text=True, env=env, timeout=1800, cwd=pythonpath)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or [str(p.returncode)])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="cded706", help="commit with the padded local loop")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--cohorts", default="10,100")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.rounds, args.alpha, [int(c) for c in args.cohorts.split(",")])))
        return
    with tempfile.TemporaryDirectory(prefix="fedkd-padding-base-") as tmp:
        base_dir = os.path.join(tmp, "base")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "-q", "--detach", base_dir, args.base], check=True)
        try:
            before = run(base_dir, args)
            now = run(ROOT, args)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base_dir], check=False)
    result = {"benchmark": "padding", "base": args.base, "before": before, "now": now, "ratios": {}}
    if "error" not in before and "error" not in now:
        for c in now["cohorts"]:
            b, n = before["cohorts"][c], now["cohorts"][c]
            result["ratios"][c] = n["s_per_round"] / b["s_per_round"]
            print(f"C={c}: before {b['s_per_round'] * 1e3:.1f} ms (padding waste "
                  f"{before['expected_padding_waste_before']:.0%}), now {n['s_per_round'] * 1e3:.1f} ms: "
                  f"{result['ratios'][c]:.2f}x; last train loss {b['train_loss_last']:.4f} / {n['train_loss_last']:.4f}")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "padding.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
