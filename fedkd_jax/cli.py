"""``fedkd`` command line.

    fedkd run [--config FILE] [--set section.key=value ...] [--out DIR]
    fedkd resume RUN_DIR [--set run.rounds=N ...]
    fedkd launch --processes N [--devices-per-process K] [--timeout S] -- run ...
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedkd", description="Federated knowledge-distillation simulator (JAX).")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment (defaults: FedAvg on digits)")
    run.add_argument("--config", help="YAML file of settings (see README for keys)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one setting; repeatable, e.g. --set run.rounds=50")
    run.add_argument("--out", help="run directory (default: runs/<algorithm>-<dataset>-<time>)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    res = sub.add_parser("resume", help="continue a run from its newest checkpoint (same as `run --out RUN_DIR`)")
    res.add_argument("run_dir", help="a run directory written by `fedkd run`")
    res.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="change a setting that does not alter results, e.g. --set run.rounds=2000")
    res.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    lau = sub.add_parser("launch", help="run one job as N processes on 127.0.0.1 (jax.distributed)")
    lau.add_argument("--processes", type=int, required=True, help="number of processes (>= 1)")
    lau.add_argument("--devices-per-process", type=int, default=None,
                     help="CPU devices each process exposes (default: cores / processes)")
    lau.add_argument("--timeout", type=float, default=60.0, help="seconds to reach the coordinator (default 60)")
    lau.add_argument("cmd", nargs=argparse.REMAINDER, help="-- run|resume ... (the fedkd command to run)")
    return p


def _launch(args) -> int:
    from fedkd_jax.errors import FedKDError
    from fedkd_jax.launch import launch

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if command[:1] == ["run"] and "--out" not in command and not any(c.startswith("--out=") for c in command):
        command = [*command, "--out", os.path.join("runs", f"launch-{time.strftime('%Y%m%d-%H%M%S')}")]
    per = args.devices_per_process or max(1, (os.cpu_count() or 1) // max(args.processes, 1))
    try:
        return launch(args.processes, command, devices_per_process=per, timeout=args.timeout)
    except FedKDError as e:
        print(f"fedkd: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "launch":
        return _launch(args)
    # Import after parsing so `fedkd --help` is fast; importing fedkd_jax does not start JAX.
    from fedkd_jax import configure_cpu_devices, distributed
    from fedkd_jax.config import load_config
    from fedkd_jax.errors import FedKDError
    from fedkd_jax.paths import check_run_dir, check_writable_dir
    from fedkd_jax.run import run_experiment

    try:
        if args.command == "resume":
            check_run_dir("run_dir", args.run_dir)
            cfg = load_config(None, args.overrides, base=os.path.join(args.run_dir, "config.json"))
            out = args.run_dir
        else:
            cfg = load_config(args.config, args.overrides)
            out = args.out or os.path.join("runs", f"{cfg.algorithm}-{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
        check_writable_dir("--out" if args.command == "run" else "run_dir", out)
        joining = bool(os.environ.get(distributed.ENV_COORDINATOR)) or distributed.cluster_detected()
        # In a multi-process job each process exposes its own cores; run.devices sizes the global mesh.
        configure_cpu_devices(None if joining else cfg.run.devices)
        distributed.initialize()
        result = run_experiment(cfg, out, progress=not args.no_progress and cfg.run.progress)
    except FedKDError as e:
        print(f"fedkd: error: {e}", file=sys.stderr)
        return 2
    if not distributed.is_primary():
        return 0
    for note in result.notes:
        print(f"fedkd: warning: {note}", file=sys.stderr)
    if result.resumed_from is not None:
        print(f"resumed from the checkpoint of round {result.resumed_from}")
    if result.interrupted:
        print(f"stopped by signal after round {result.rounds}; checkpoint saved. "
              f"Resume with: fedkd resume {result.run_dir}")
        return 0
    f = result.final
    print(f"finished {result.rounds} rounds in {result.seconds:.1f} s (first dispatch incl. compile {result.first_dispatch_seconds:.1f} s)")
    if "test_accuracy" in f:
        print(
            f"global test accuracy {f['test_accuracy']:.4f}, loss {f['test_loss']:.4f}; "
            f"per-client accuracy mean {f.get('client_acc_mean', float('nan')):.3f} "
            f"(p10 {f.get('client_acc_p10', float('nan')):.3f}, p90 {f.get('client_acc_p90', float('nan')):.3f})"
        )
    if "teacher_acc_mean" in f:
        print(f"private teachers on their local tests: mean {f['teacher_acc_mean']:.3f} "
              f"(p10 {f['teacher_acc_p10']:.3f}, p90 {f['teacher_acc_p90']:.3f})")
    if f.get("cum_bytes_up") is not None:
        print(f"communication: {f['cum_bytes_up'] / 1e6:.2f} MB up, {f['cum_bytes_down'] / 1e6:.2f} MB down")
    store = ", checkpoints-clients/" if os.path.isdir(os.path.join(result.run_dir, "checkpoints-clients")) else ""
    print(f"outputs in {result.run_dir}: config.yaml, config.json, metrics.jsonl, metrics.csv, accuracy.png, "
          f"checkpoints/{store}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
