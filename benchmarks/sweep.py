"""Benchmark: a 12-run sweep batched into one program against the same runs one after another.

The sweep: FedKD on digits at the experiment scripts' scale (50 clients,
Dirichlet 0.5, 10 per round, student 64-32-10, teacher 64-128-128-10, SVD
compression up and down), temperatures {1, 2, 4, 8} x seeds {0, 1, 2},
``--rounds`` rounds each. Two child processes:

* ``batched``: ``fk.sweep`` (one compiled program for all 12 runs, waves of
  one run per device);
* ``sequential``: the 12 runs with ``fk.run`` one after another, each built
  and compiled on its own, as the experiment scripts did before.

Each reports wall time, peak RSS and the time spent in rounds after each
program's first dispatch (compile excluded); the parent prints the ratios
and a JSON line last (saved to benchmarks/results/sweep.json).

    python benchmarks/sweep.py [--rounds 200]
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
BASE = {"algorithm": "fedkd", "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": 50},
        "model": {"hidden": [32]}, "distill": {"teacher_hidden": [128, 128]},
        "run": {"cohort_size": 10, "eval_every": 50, "checkpoint_every": 100000, "keep_checkpoints": 1,
                "progress": False}}
TEMPS = [1.0, 2.0, 4.0, 8.0]
SEEDS = [0, 1, 2]


def _compute_seconds(rows) -> tuple[float, int]:
    """Seconds in rounds after the first dispatch (its compile), and those rounds."""
    first_wall = None
    total, n = 0.0, 0
    for r in rows:
        if first_wall is None:
            first_wall = r["wall_time"]
        if r["wall_time"] > first_wall:
            total += r["round_time"]
            n += 1
    return total, n


def child(mode: str, rounds: int, *, temps=TEMPS, seeds=SEEDS, run: dict | None = None) -> dict:
    """One mode of the sweep in this process. ``run``: extra ``run.*`` settings (e.g.
    ``runs_per_device``, ``rounds_per_dispatch``) over :data:`BASE`'s."""
    import fedkd_jax as fk

    fk.configure_cpu_devices()
    base = json.loads(json.dumps(BASE))
    base["run"].update(run or {}, rounds=rounds)
    out = tempfile.mkdtemp(prefix=f"fedkd-sweep-bench-{mode}-")
    t0 = time.perf_counter()
    compute, n = 0.0, 0
    accs = []
    extra = {}
    if mode == "batched":
        res = fk.sweep(base, {"distill.temperature": list(temps)}, list(seeds), out)
        for r in res.runs:
            c, k = _compute_seconds(r["result"].rows)
            compute, n = compute + c, n + k
            accs.append(r["result"].final.get("test_accuracy"))
        compute /= res.runs_per_wave[0]  # the runs of a wave share one dispatch's time (one group here)
        extra = {"runs_per_device": res.runs_per_device[0], "runs_per_wave": res.runs_per_wave[0]}
    else:
        for t in temps:
            for s in seeds:
                cfg = json.loads(json.dumps(base))
                cfg["distill"]["temperature"] = t
                cfg["run"]["seed"] = s
                res = fk.run(cfg, os.path.join(out, f"t{t}-s{s}"))
                c, k = _compute_seconds(res.rows)
                compute, n = compute + c, n + k
                accs.append(res.final.get("test_accuracy"))
    wall = time.perf_counter() - t0
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}  # GPU/TPU report their allocator's peak; CPU none
    if "peak_bytes_in_use" in stats:
        extra["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    return {"mode": mode, "runs": len(temps) * len(seeds), "wall_s": wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "compute_s": compute, "run_rounds": n, "mean_test_accuracy": sum(accs) / len(accs), **extra}


def run_child(mode: str, rounds: int, *, temps=TEMPS, seeds=SEEDS, run: dict | None = None,
              timeout: float = 7200) -> dict:
    """:func:`child` in a process of its own (its peak RSS is its own); its JSON, or ``{"error": ...}``."""
    argv = [sys.executable, os.path.abspath(__file__), "--child", mode, "--rounds", str(rounds),
            "--temps", ",".join(map(str, temps)), "--seeds", ",".join(map(str, seeds)),
            "--run-json", json.dumps(run or {})]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    line = next((l for l in reversed(p.stdout.splitlines()) if l.startswith("{")), None)
    if line and p.returncode == 0:
        return json.loads(line)
    return {"mode": mode, "error": p.stderr.strip().splitlines()[-3:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--child", choices=("batched", "sequential"))
    ap.add_argument("--temps", default=",".join(map(str, TEMPS)), help=argparse.SUPPRESS)
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help=argparse.SUPPRESS)
    ap.add_argument("--run-json", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rounds, temps=[float(t) for t in args.temps.split(",")],
                               seeds=[int(s) for s in args.seeds.split(",")], run=json.loads(args.run_json))),
              flush=True)
        return
    results = {}
    for mode in ("batched", "sequential"):
        results[mode] = run_child(mode, args.rounds)
        print(json.dumps(results[mode]), flush=True)
    b, s = results["batched"], results["sequential"]
    summary = {"benchmark": "sweep", "runs": len(TEMPS) * len(SEEDS), "rounds": args.rounds,
               "machine": platform.machine(), "cpus": os.cpu_count(), "results": results}
    if "error" not in b and "error" not in s:
        summary["speedup_end_to_end"] = s["wall_s"] / b["wall_s"]
        summary["throughput_ratio_without_compile"] = (s["compute_s"] / s["run_rounds"]) / (b["compute_s"] / b["run_rounds"])
        summary["peak_rss_ratio"] = b["peak_rss_mb"] / s["peak_rss_mb"]
        summary["goal_3x_end_to_end_met"] = summary["speedup_end_to_end"] >= 3.0
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "sweep.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
