"""Benchmark: populations far larger than memory, client stores, several processes.

Each setting runs in its own process (so peak RSS is its own) and prints one
JSON line; the parent collects them, adds ratios against the smallest
population measured in the same run, checks the goals and prints a JSON line
last (also saved to benchmarks/results/scale.json).

* FedAvg W1 (MLP 784-200-200-10, C = 100, 40 rows per client resampled from
  MNIST-5k) at N = 10^2 .. 10^6: seconds per round, peak RSS, setup seconds
  (partition + placement).
* FedKD with digits-size private teachers (64-128-128-10, student 64-64-10,
  C = 10, 20 rows per client) at N = 10^3 .. 10^5 with the host and disk
  stores (and the device store at 10^3 as the reference): seconds per round,
  peak RSS, bytes on disk, checkpoint seconds.
* The same FedKD through ``fk.run``, the path users run (disk store, local
  tests on 20% of each client's rows, evaluation every 10 rounds, checkpoints
  every 50, ``--run-rounds`` rounds): the run's wall time split into rounds,
  evaluation and checkpoints, and peak RSS.
* 1 process x 2 devices against 2 processes x 1 device on loopback (W1, N = 10^4).
* Replicas: bytes held on each device by W1 at N = 10^4 on 2 devices with the
  index-based population against the same population copied per client (the
  old ``[N, M, D]`` layout), and by FedKD at N = 10^3 with the replicated
  device store against the host store (measured from ``jax.live_arrays()``).

    python benchmarks/scale.py [--quick] [--rounds 20] [--run-rounds 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
W1_N = (100, 10_000, 100_000, 1_000_000)
KD_N = (1_000, 10_000, 100_000)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_bytes() -> dict[int, int]:
    """Bytes of live jax arrays held on each device (shards counted where they live)."""
    import jax

    out: dict[int, int] = {}
    for a in jax.live_arrays():
        for sh in a.addressable_shards:
            out[sh.device.id] = out.get(sh.device.id, 0) + sh.data.nbytes
    return out


def run_child_path(args) -> dict:
    """FedKD through ``fk.run``, the path users run: evaluation every 10 rounds (local
    tests on 20% of each client's rows), checkpoints every 50, the run's own store."""
    import fedkd_jax as fk

    tmp = tempfile.mkdtemp(prefix="fedkd-scale-run-")
    t0 = time.perf_counter()
    res = fk.run({"data": {"num_clients": args.n, "partition": "iid", "examples_per_client": 20},
                  "run": {"rounds": args.rounds, "eval_every": 10, "checkpoint_every": 50,
                          "client_store": args.store}}, os.path.join(tmp, "run"))
    wall = time.perf_counter() - t0
    t = res.timing
    rounds_s = [r["round_time"] for r in res.rows]
    return {"kind": "fedkd-run", "n": args.n, "store": args.store, "rounds": res.rounds, "process_s": wall,
            "run_s": t["total"], "dispatch_s": t["dispatch"], "eval_s": t["evaluation"],
            "checkpoint_s": t["checkpoints"], "first_dispatch_s": rounds_s[0] * 10,
            "s_per_round_after_first": sum(rounds_s[10:]) / max(1, len(rounds_s) - 10),
            "eval_plus_checkpoint_fraction": (t["evaluation"] + t["checkpoints"]) / t["total"],
            "evaluations": sum(1 for r in res.rows if r.get("eval_time") is not None),
            "first_eval_s": next(r["eval_time"] for r in res.rows if r.get("eval_time") is not None),
            "teacher_acc_mean": res.final.get("teacher_acc_mean"), "test_accuracy": res.final.get("test_accuracy"),
            "peak_rss_mb": _rss_mb()}


def child(args) -> dict:
    import fedkd_jax as fk

    if args.kind == "fedkd-run":
        return run_child_path(args)

    if not os.environ.get("FEDKD_COORDINATOR"):
        fk.configure_cpu_devices()
    from fedkd_jax import distributed

    distributed.initialize()
    import jax
    import numpy as np
    import optax

    from fedkd_jax.builders import auto_group_size
    from fedkd_jax.runner.checkpoint import Checkpointer
    from fedkd_jax.runner.prefetch import Prefetcher

    t0 = time.perf_counter()
    if args.kind == "w1":
        ds = fk.data.load_mnist5k()
        fd = fk.federate(ds, partition="iid", num_clients=args.n, seed=0, examples_per_client=40, test_fraction=0.0)
        if args.copied:
            fd = fd.copied()  # every client's rows copied into the pool: the old per-client layout
        model = fk.make_model("mlp", num_features=784, num_classes=10, hidden=(200, 200))
        alg = fk.fedavg(model, optax.sgd(0.05), optax.sgd(1.0), batch_size=10)
        cohort, per = 100, 5
    else:
        ds = fk.data.load_digits()
        fd = fk.federate(ds, partition="iid", num_clients=args.n, seed=0, examples_per_client=20, test_fraction=0.0)
        student = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(64,))
        teacher = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(128, 128))
        alg = fk.algorithms.fedkd(student, teacher, optax.sgd(0.05), optax.sgd(0.05), optax.sgd(1.0), batch_size=10)
        cohort, per = 10, 10
    tmp = tempfile.mkdtemp(prefix="fedkd-scale-")
    group = (auto_group_size(-(-cohort // jax.device_count())) if args.group_size == "auto"
             else int(args.group_size))
    sim = fk.Simulator(alg, fd, cohort_size=cohort, store=args.store, store_dir=os.path.join(tmp, "store"),
                       group_size=group)
    pool = sim.put_data()
    state = sim.put_state(sim.init(0))
    jax.block_until_ready(pool)
    setup = time.perf_counter() - t0

    pre = Prefetcher(sim, fk.engine.cohort.key_bits(state.key), pool)
    t = time.perf_counter()
    plan, gathered, rows = pre.take(0, per, None, state.key)
    state, _ = sim.execute(state, rows, plan, gathered)  # compile + warm-up
    first = time.perf_counter() - t
    written, done = plan.union, per
    rounds = args.rounds - args.rounds % per or per
    pre.request(done, per)
    t = time.perf_counter()
    while done < per + rounds:
        plan, gathered, rows = pre.take(done, per, written, state.key)
        if done + per < per + rounds:
            pre.request(done + per, per)
        state, m = sim.execute(state, rows, plan, gathered)
        written, done = plan.union, done + per
    per_round = (time.perf_counter() - t) / rounds
    pre.close()
    per_device = device_bytes()
    out = {"kind": args.kind, "n": args.n, "store": args.store if sim.stateful else None, "copied": args.copied,
           "device_mb_max": max(per_device.values()) / 2**20, "device_mb_total": sum(per_device.values()) / 2**20,
           "processes": jax.process_count(), "devices": jax.device_count(), "group_size": group,
           "cohort": cohort, "s_per_round": per_round,
           "first_dispatch_s": first, "setup_s": setup}
    if sim.stateful:
        ck = Checkpointer(os.path.join(tmp, "checkpoints"), store=sim.store)
        ck.start_fresh()
        t = time.perf_counter()
        ck.save(done, state)
        ck.wait()
        out["checkpoint_s"] = time.perf_counter() - t
        ck.close()
        out["store_disk_bytes"] = sim.store.disk_bytes()
        out["touched_clients"] = int(sim.store.touched.sum())
        out["per_client_bytes"] = sim.store.per_client_bytes
        sim.store.close()
    out["peak_rss_mb"] = _rss_mb()
    stats = jax.local_devices()[0].memory_stats() or {}  # GPU/TPU report their allocator's peak; CPU none
    if "peak_bytes_in_use" in stats:
        out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    return out


def run_child(kind: str, n: int, store: str, rounds: int, *, processes: int = 1, devices: int | None = None,
              copied: bool = False, group_size: int | str = "auto") -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--child", kind, "--n", str(n), "--store", store,
            "--rounds", str(rounds), "--group-size", str(group_size)] + (["--copied"] if copied else [])
    env = dict(os.environ)
    if devices:
        env["FEDKD_CPU_DEVICES"] = str(devices)
    if processes > 1:
        argv = [sys.executable, "-c", "import sys; from fedkd_jax.launch import launch_script; sys.exit(launch_script())",
                str(processes), str(devices or 1), *argv[1:]]
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode != 0:
        return {"kind": kind, "n": n, "store": store, "error": p.stderr.strip().splitlines()[-1:] or [str(p.returncode)]}
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"kind": kind, "n": n, "error": "no output"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="small populations only")
    ap.add_argument("--child", choices=("w1", "fedkd", "fedkd-run"))
    ap.add_argument("--run-rounds", type=int, default=200, help="rounds of the fk.run settings (evaluated every 10, "
                                                                "checkpointed every 50)")
    ap.add_argument("--n", type=int)
    ap.add_argument("--store", default="host")
    ap.add_argument("--copied", action="store_true", help="child: copy every client's rows (the old layout)")
    ap.add_argument("--group-size", default="auto", help="child: run.group_size (auto: 1 on CPU, wider on GPU/TPU)")
    args = ap.parse_args()
    if args.child:
        args.kind = args.child
        res = child(args)
        import jax

        if jax.process_index() == 0:
            print(json.dumps(res), flush=True)
        return

    w1_ns = W1_N[:2] if args.quick else W1_N
    kd_ns = KD_N[:1] if args.quick else KD_N
    results = {"w1": [], "fedkd": [], "processes": [], "replicas": []}
    for n in w1_ns:
        r = run_child("w1", n, "host", args.rounds)
        results["w1"].append(r)
        print(json.dumps(r), flush=True)
    r = run_child("fedkd", kd_ns[0], "device", args.rounds)
    results["fedkd"].append(r)
    print(json.dumps(r), flush=True)
    for n in kd_ns:
        for store in ("host", "disk"):
            r = run_child("fedkd", n, store, args.rounds)
            results["fedkd"].append(r)
            print(json.dumps(r), flush=True)
    results["fedkd_run"] = []
    for n in kd_ns:  # the path users run: fk.run with evaluation and checkpoints
        r = run_child("fedkd-run", n, "disk", args.run_rounds)
        results["fedkd_run"].append(r)
        print(json.dumps(r), flush=True)
    for procs, devs in ((1, 2), (2, 1)):
        r = run_child("w1", 10_000, "host", args.rounds, processes=procs, devices=devs)
        results["processes"].append(r)
        print(json.dumps(r), flush=True)
    for copied in (False, True):
        r = run_child("w1", 10_000, "host", args.rounds, devices=2, copied=copied)
        results["replicas"].append(r)
        print(json.dumps(r), flush=True)
    rep = [r for r in results["replicas"] if "error" not in r]
    if len(rep) == 2:
        results["w1_copied_vs_indexed_device_bytes"] = rep[1]["device_mb_total"] / rep[0]["device_mb_total"]
    dev_host = [next((r for r in results["fedkd"] if r.get("n") == kd_ns[0] and r.get("store") == s
                      and "error" not in r), None) for s in ("device", "host")]
    if all(dev_host):
        results["fedkd_device_vs_host_store_device_bytes"] = dev_host[0]["device_mb_total"] / dev_host[1]["device_mb_total"]

    ok = [r for r in results["w1"] if "error" not in r]
    base = ok[0] if ok else None
    for r in ok:
        r["round_ratio_vs_smallest"] = r["s_per_round"] / base["s_per_round"]
    kd_dev = next((r for r in results["fedkd"] if r.get("store") == "device" and "error" not in r), None)
    for r in results["fedkd"]:
        if kd_dev and "error" not in r:
            r["round_ratio_vs_device_1e3"] = r["s_per_round"] / kd_dev["s_per_round"]
    big = next((r for r in ok if r["n"] == max(w1_ns)), None)
    kd_big = [r for r in results["fedkd"] if r.get("n") == max(kd_ns) and "error" not in r]
    goals = {}
    if big and base:
        goals["w1_round_largest_within_1.25x"] = big["round_ratio_vs_smallest"] <= 1.25
        goals["w1_peak_rss_largest_under_3GB"] = big["peak_rss_mb"] < 3 * 1024
        goals["w1_setup_largest_under_30s"] = big["setup_s"] < 30
    if kd_big and kd_dev:
        goals["fedkd_largest_rss_under_4GB"] = all(r["peak_rss_mb"] < 4 * 1024 for r in kd_big)
        goals["fedkd_largest_round_within_1.5x_device_1e3"] = all(r["round_ratio_vs_device_1e3"] <= 1.5 for r in kd_big)
    kd_run = [r for r in results["fedkd_run"] if r.get("n") == max(kd_ns) and "error" not in r]
    if kd_run:
        goals["fedkd_run_largest_rss_under_4GB"] = kd_run[0]["peak_rss_mb"] < 4 * 1024
        goals["fedkd_run_largest_eval_plus_checkpoints_under_25pct"] = kd_run[0]["eval_plus_checkpoint_fraction"] < 0.25
    pr = [r for r in results["processes"] if "error" not in r]
    if len(pr) == 2:
        results["two_processes_vs_one_round_ratio"] = pr[1]["s_per_round"] / pr[0]["s_per_round"]
    import jax

    summary = {"benchmark": "scale", "machine": platform.machine(), "cpus": os.cpu_count(),
               "jax": jax.__version__, "rounds": args.rounds, "results": results, "goals": goals}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    if not args.quick:
        with open(os.path.join(HERE, "results", "scale.json"), "w") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
