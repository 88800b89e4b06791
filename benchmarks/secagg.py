"""Benchmark: secure aggregation's cost per round, complete graph (Bonawitz et al. 2017)
against SecAgg+'s sparse graph (Bell et al. 2020), relative to the plain round.

Workload (the issue's): scikit-learn digits resampled IID over 2,000 clients of
20 examples each (no local test split), the default models (FedKD: student MLP
64-64-10, private teachers 64-128-128-10, SVD-compressed uploads), clipping to
norm 10, 1 local epoch of batch 10. ``--algorithms fedkd,fedavg`` adds FedAvg
with the MLP 64-64-10, whose plain round is far cheaper (2 SGD steps per
client): the hardest case for a ratio. Each cohort (100 and 1,000) times, in the same process:

* ``plain``: clipping only;
* ``full``: ``secagg.neighbors=full``, the complete graph (threefry masks);
* ``auto``: ``secagg.neighbors=auto``, SecAgg+ with Bell et al.'s k and t
  for the cohort (sigma = 40, eta = 30, gamma = 0.05, delta = 1/3) and the
  counter-mode hash PRG;
* ``auto_threefry``: the same graph with threefry masks (what the cheaper
  PRG buys).

Each is compiled and (when timed for several rounds) run once untimed first.
Reported: median seconds per round, the ratio to the plain round, the
graph's k and t, the bytes one client uploads. The complete graph at cohort
1,000 takes about a minute a round: it is timed for one round (its first),
for the first algorithm only, or skipped with ``--skip-full-1000``.
JSON is the last line and is saved to benchmarks/results/secagg.json.

    python benchmarks/secagg.py [--rounds 3] [--cohorts 100,1000] [--algorithms fedkd,fedavg] [--skip-full-1000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import fedkd_jax as fk

fk.configure_cpu_devices()  # one CPU device per core, before JAX starts

import jax
import numpy as np

from fedkd_jax.builders import build_algorithm, build_data, build_model, build_simulator
from fedkd_jax.config import load_config
from fedkd_jax.plan import make_plan
from fedkd_jax.privacy import secagg
from fedkd_jax.settings import secagg_neighbors, secagg_threshold

COMMON = [
    "data.dataset=digits", "data.partition=iid", "data.num_clients=2000",
    "data.examples_per_client=20", "data.test_fraction=0.0", "privacy.clip_norm=10",
    "client.local_epochs=1", "client.batch_size=10", "run.progress=false",
]
MODES = {"plain": [], "full": ["secagg.enabled=true", "secagg.neighbors=full"],
         "auto": ["secagg.enabled=true", "secagg.neighbors=auto"],
         "auto_threefry": ["secagg.enabled=true", "secagg.neighbors=auto"]}


def time_mode(mode: str, cohort: int, rounds: int, out_dir: str, algorithm: str = "fedkd") -> dict:
    cfg = make_plan(load_config(None, COMMON + MODES[mode] + [f"run.cohort_size={cohort}",
                                                              f"algorithm={algorithm}"])).config
    data = build_data(cfg)
    model = build_model(cfg, data)
    alg = build_algorithm(cfg, model, data)
    hashed = secagg.PRGS["hash"]
    if mode == "auto_threefry":  # the configuration picks the hash for SecAgg+: swap it while building
        secagg.PRGS["hash"] = secagg.PRGS["threefry"]
    try:
        sim = build_simulator(cfg, data, alg, out_dir=out_dir)
    finally:
        secagg.PRGS["hash"] = hashed
    dev = sim.put_data()
    state = sim.put_state(sim.init(0))
    t = time.perf_counter()
    sim.lower(state, dev).compile()
    compile_s = time.perf_counter() - t
    if rounds > 1:  # untimed: the first call still fills jit's own caches (small against a 1-minute round)
        state, _ = sim.step(state, dev)
        jax.block_until_ready(state)
    times, nbytes = [], 0
    for _ in range(rounds):
        t = time.perf_counter()
        state, m = sim.step(state, dev)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
        nbytes = int(np.asarray(m["bytes_up_clients"]).max())
    row = {"algorithm": algorithm, "mode": mode, "cohort": cohort, "rounds_timed": rounds,
           "sec_per_round": float(np.median(times)),
           "compile_sec": compile_s, "bytes_up_per_client": nbytes}
    if mode != "plain":
        k = secagg_neighbors(cfg)
        row.update(neighbors=cohort - 1 if k is None else k, threshold=secagg_threshold(cfg),
                   aborted=float(np.asarray(m["secagg_aborted"]).sum()))
    if sim.store is not None:
        sim.store.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds timed per mode (the complete graph at 1,000: 1)")
    ap.add_argument("--cohorts", default="100,1000")
    ap.add_argument("--skip-full-1000", action="store_true", help="do not time the complete graph at cohort >= 1,000")
    ap.add_argument("--algorithms", default="fedkd,fedavg")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "secagg.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_alg, algorithm in enumerate(args.algorithms.split(",")):
            for cohort in (int(c) for c in args.cohorts.split(",")):
                plain = None
                for mode in MODES:
                    big_full = mode == "full" and cohort >= 1000
                    if big_full and (args.skip_full_1000 or n_alg > 0):
                        continue
                    row = time_mode(mode, cohort, 1 if big_full else args.rounds,
                                    os.path.join(tmp, f"{algorithm}-{mode}-{cohort}"), algorithm)
                    plain = row if mode == "plain" else plain
                    row["ratio_to_plain"] = row["sec_per_round"] / plain["sec_per_round"]
                    graph = "" if mode == "plain" else f"  k={row['neighbors']} t={row['threshold']}"
                    print(f"{algorithm:6s} cohort {cohort:5d}  {mode:13s} {row['sec_per_round']:8.3f} s/round  "
                          f"{row['ratio_to_plain']:7.2f}x plain  {row['bytes_up_per_client']:,} B/client{graph}",
                          flush=True)
                    rows.append(row)
    checks = {}
    for r in rows:
        if r["mode"] == "auto" and r["cohort"] == 1000:
            checks[f"{r['algorithm']}_auto_ratio_at_1000"] = r["ratio_to_plain"]
            checks[f"{r['algorithm']}_within_5x"] = r["ratio_to_plain"] <= 5.0
            print(f"{r['algorithm']}: SecAgg+ at cohort 1,000 is {r['ratio_to_plain']:.2f}x the plain round "
                  f"(goal <= 5x: {r['ratio_to_plain'] <= 5.0})")
    out = {"benchmark": "secagg", "devices": jax.device_count(), "workload": COMMON, "rows": rows, "checks": checks}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
