"""Benchmark: checkpoint overhead and restore time for FedKD with 1,000 private teachers.

Workload: FedKD on MNIST-5k with 1,000 clients of 40 examples each, resampled
IID from the 4,000 training rows. The teachers are private MLPs
784-200-200-10 and the shared student is an MLP 784-100-10. Each round
samples 10 clients and runs 1 local epoch (batch 10). The store holds
1,000 teachers plus their feature projections: about 880 MB.

The same rounds are timed twice in one process: once with a checkpoint every
10 rounds, and once without checkpoints. Overhead is
``(with - without) / with``. Restore time is the time to rebuild the latest
checkpoint (small state by orbax, client store from its chain), verified.
For comparison, a full orbax save of the whole state is timed once. JSON is
the last line and is saved to benchmarks/results/checkpoint.json.

    python benchmarks/checkpoint.py [--rounds 100] [--every 10] [--cohort 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import fedkd_jax as fk

fk.configure_cpu_devices()  # one CPU device per core, before JAX starts

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedkd_jax.builders import build_algorithm, build_compressor, build_data, build_model
from fedkd_jax.config import load_config
from fedkd_jax.runner.checkpoint import Checkpointer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--cohort", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2, help="alternate with/without this many times; medians reported")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "checkpoint.json"))
    args = ap.parse_args()

    cfg = load_config(None, [
        "algorithm=fedkd", "data.dataset=mnist5k", "data.partition=iid", "data.num_clients=1000",
        "data.examples_per_client=40", "data.test_fraction=0.0", "model.hidden=[100]",
        "distill.teacher_hidden=[200,200]", f"run.cohort_size={args.cohort}", f"run.rounds={args.rounds}",
    ])
    data = build_data(cfg)
    model = build_model(cfg, data)
    alg = build_algorithm(cfg, model, data)
    sim = fk.Simulator(alg, data, cohort_size=args.cohort, compressor=build_compressor(cfg),
                       downlink=build_compressor(cfg, downlink=True), store="host")
    dev = sim.put_data()
    init = sim.put_state(sim.init(0))
    store_mb = sim.store.per_client_bytes * data.num_clients / 1e6
    sim.run(init, dev, args.every)  # compile

    def train(checkpoint_dir: str | None):
        sim.reset_store()
        ckpt = Checkpointer(checkpoint_dir, keep=3, store=sim.store) if checkpoint_dir else None
        if ckpt:
            ckpt.start_fresh()
        state = init
        t0 = time.perf_counter()
        for r in range(args.every, args.rounds + 1, args.every):
            state, m = sim.run(state, dev, args.every)
            if ckpt:
                ckpt.save(r, state)
        if ckpt:
            ckpt.wait()  # the last save's cost counts too
        seconds = time.perf_counter() - t0
        return seconds, ckpt, state

    tmp = tempfile.mkdtemp(prefix="fedkd-ckpt-bench-")
    with_s, without_s = [], []
    blocking, writer_cpu = [], []
    for rep in range(args.repeats):
        os.sync()  # no writeback from an earlier repeat inside a timed run
        without_s.append(train(None)[0])
        d = os.path.join(tmp, f"rep{rep}", "checkpoints")
        os.sync()
        s, ckpt, final = train(d)
        with_s.append(s)
        blocking.append(ckpt.blocking_seconds)
        writer_cpu.append(ckpt.store.writer_cpu_seconds)
        if rep < args.repeats - 1:
            ckpt.close()
    final_clients = jax.device_get(sim.client_states(final.key))
    sim.reset_store()
    t = time.perf_counter()
    restored, step = ckpt.restore_latest(init)
    restore_s = time.perf_counter() - t
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(final_clients),
                                                    jax.tree.leaves(jax.device_get(sim.client_states(restored.key)))))
    files = sorted(os.listdir(ckpt.store_dir))
    disk_mb = sum(os.path.getsize(os.path.join(ckpt.store_dir, f)) for f in files) / 1e6
    ckpt.close()

    # reference: one full orbax snapshot of the whole state (what a naive checkpoint writes each time)
    full_dir = os.path.join(tmp, "full")
    mngr = ocp.CheckpointManager(full_dir)
    t = time.perf_counter()
    mngr.save(args.rounds, args=ocp.args.StandardSave({"state": final, "clients": final_clients}))
    mngr.wait_until_finished()
    full_s = time.perf_counter() - t
    mngr.close()
    shutil.rmtree(tmp, ignore_errors=True)

    w, wo = float(np.median(with_s)), float(np.median(without_s))
    result = {
        "benchmark": "checkpoint",
        "clients": data.num_clients, "cohort": args.cohort, "rounds": args.rounds, "every": args.every,
        "store_mb": store_mb,
        "train_seconds_without_checkpoints": wo,
        "all_without": without_s,
        "all_with": with_s,
        "train_seconds_with_checkpoints": w,
        "overhead_fraction": (w - wo) / w,
        "save_blocking_seconds": float(np.median(blocking)),
        "writer_cpu_seconds": float(np.median(writer_cpu)),
        "restore_seconds": restore_s,
        "restored_round": step,
        "restored_store_bit_identical": bool(same),
        "store_files_on_disk": files,
        "store_mb_on_disk": disk_mb,
        "full_orbax_snapshot_seconds": full_s,
        "devices": jax.device_count(),
    }
    print("per repeat, without / with:", [f"{a:.2f}/{b:.2f}" for a, b in zip(without_s, with_s)])
    print(f"per run: save() blocked the loop {np.median(blocking):.2f} s; background writer used "
          f"{np.median(writer_cpu):.2f} s of CPU ({args.rounds // args.every} checkpoints)")
    print(f"store {store_mb:.0f} MB; {args.rounds} rounds: {wo:.2f} s without checkpoints, {w:.2f} s with one every "
          f"{args.every} rounds -> overhead {100 * result['overhead_fraction']:.1f}% (goal < 5%)")
    print(f"restore of round {step}: {restore_s:.2f} s (store bit-identical: {same}); store files on disk {disk_mb:.0f} MB; "
          f"one full orbax snapshot of the state: {full_s:.2f} s")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
