"""``fedkd`` command line.

    fedkd run [--config FILE] [--set section.key=value ...] [--out DIR]
    fedkd resume RUN_DIR [--set run.rounds=N ...]
    fedkd launch --processes N [--devices-per-process K] [--timeout S] -- run ...
    fedkd sweep [--config FILE] --grid section.key=v1,v2 [--grid ...] --seeds N [--out DIR]
    fedkd privacy calibrate --epsilon E --delta D --rounds R --cohort C --clients N [--sampling poisson]
    fedkd audit RUN_DIR
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedkd", description="Federated knowledge-distillation simulator (JAX).")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment (default: FedKD on digits)")
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
    sw = sub.add_parser("sweep", help="many runs of a grid x seeds, batched into one compiled program per shape")
    sw.add_argument("--config", help="YAML file of base settings")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one base setting; repeatable")
    sw.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                    help="a swept setting and its values; repeatable (the grid is their product)")
    sw.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 for every grid point (default 1)")
    sw.add_argument("--out", help="sweep directory (default: runs/sweep-<algorithm>-<dataset>-<time>)")
    sw.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    priv = sub.add_parser("privacy", help="privacy tools: calibrate the noise for a target epsilon")
    psub = priv.add_subparsers(dest="privacy_command", required=True)
    cal = psub.add_parser("calibrate", help="the noise multiplier reaching (epsilon, delta) after R rounds")
    cal.add_argument("--epsilon", type=float, required=True)
    cal.add_argument("--delta", type=float, required=True)
    cal.add_argument("--rounds", type=int, required=True)
    cal.add_argument("--cohort", type=int, required=True)
    cal.add_argument("--clients", type=int, required=True)
    cal.add_argument("--sampling", choices=("fixed", "poisson"), default="poisson",
                     help="poisson (add-or-remove-one; the default with DP) or fixed (replace-one: ~2x the noise)")
    cal.add_argument("--accountant", choices=("rdp", "pld"), default="rdp")
    aud = sub.add_parser("audit", help="membership-inference audit of a finished run")
    aud.add_argument("run_dir")
    aud.add_argument("--shadows", type=int, default=4,
                     help="shadow models for the calibrated attack (>= 2; below 64 one global variance)")
    aud.add_argument("--members", type=int, default=500, help="member / non-member rows scored (each, at most)")
    aud.add_argument("--client", type=int, default=None,
                     help="FedKD: whose private teacher to audit (default: the sampled client with the most "
                          "held-out rows)")
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


def _calibrate(args) -> int:
    from fedkd_jax.errors import FedKDError
    from fedkd_jax.privacy import RELATION, Mechanism, calibrate, epsilon

    try:
        if args.rounds < 1:
            from fedkd_jax.errors import ConfigError

            raise ConfigError("--rounds", f"must be a positive integer; got {args.rounds}")
        z = calibrate(args.epsilon, args.delta, rounds=args.rounds, cohort_size=args.cohort, num_clients=args.clients,
                      sampling=args.sampling, accountant=args.accountant)
    except FedKDError as e:
        print(f"fedkd: error: {e}", file=sys.stderr)
        return 2
    import math

    z = math.ceil(z * 1e4) / 1e4  # printed to 4 decimals: rounded up, so it stays within the budget
    eps = epsilon(Mechanism(z, args.clients, args.cohort, args.sampling), args.rounds, args.delta,
                  accountant=args.accountant)
    print(f"noise_multiplier {z:.4f}")
    print(f"gives epsilon {eps:.4f} at delta {args.delta:g} after {args.rounds} rounds of {args.cohort} of "
          f"{args.clients} clients ({args.sampling} sampling, {RELATION[args.sampling]} neighbours, "
          f"{args.accountant.upper()} accountant)")
    print(f"use: --set privacy.noise_multiplier={z:.4f} --set privacy.sampling={args.sampling}")
    return 0


def _sweep(args) -> int:
    from fedkd_jax import configure_cpu_devices
    from fedkd_jax.config import devices_value, load_config
    from fedkd_jax.errors import FedKDError

    try:
        cfg = load_config(args.config, args.overrides)
        if args.seeds < 1:
            from fedkd_jax.errors import ConfigError

            raise ConfigError("--seeds", f"must be a positive integer; got {args.seeds}")
        out = args.out or os.path.join("runs", f"sweep-{cfg.algorithm}-{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
        configure_cpu_devices(devices_value(cfg.run.devices))
        configure_compile_cache()
        from fedkd_jax.sweeps import run_sweep

        res = run_sweep(cfg, args.grid, args.seeds, out, progress=not args.no_progress and cfg.run.progress)
    except FedKDError as e:
        print(f"fedkd: error: {e}", file=sys.stderr)
        return 2
    if res.interrupted:
        print(f"stopped by signal; checkpoints saved. Resume with the same command (--out {out}).")
        return 0
    print(f"finished {len(res.runs)} runs in {res.seconds:.1f} s ({res.groups} program group(s))")
    for s in res.summary:
        label = ", ".join(f"{k}={s[k]}" for k in res.keys) or "base"
        acc = s.get("test_accuracy_mean")
        print(f"  {label}: test accuracy {acc:.4f} ± {s['test_accuracy_std']:.4f} over {s['seeds']} seed(s)"
              if acc is not None else f"  {label}: no evaluation")
    print(f"outputs in {out}: sweep.csv, sweep.parquet, summary.csv, report.md, plots, runs/")
    return 0


def configure_compile_cache() -> None:
    from fedkd_jax.compile_cache import configure_compile_cache as configure

    configure()


def _audit(args) -> int:
    from fedkd_jax import configure_cpu_devices
    from fedkd_jax.errors import FedKDError

    configure_cpu_devices()
    configure_compile_cache()
    from fedkd_jax.audit import audit_run

    try:
        report = audit_run(args.run_dir, shadows=args.shadows, members=args.members, client=args.client)
    except FedKDError as e:
        print(f"fedkd: error: {e}", file=sys.stderr)
        return 2
    print(report.markdown)
    print(f"report written to {report.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "launch":
        return _launch(args)
    if args.command == "privacy":
        return _calibrate(args)
    if args.command == "audit":
        return _audit(args)
    if args.command == "sweep":
        return _sweep(args)
    # Import after parsing so `fedkd --help` is fast; importing fedkd_jax does not start JAX.
    from fedkd_jax import configure_cpu_devices, distributed
    from fedkd_jax.config import devices_value, load_config
    from fedkd_jax.errors import FedKDError
    from fedkd_jax.paths import check_run_dir, check_writable_dir
    from fedkd_jax.runner import run_experiment

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
        configure_cpu_devices(None if joining else devices_value(cfg.run.devices))
        configure_compile_cache()
        joined = distributed.initialize()
        try:
            result = run_experiment(cfg, out, progress=not args.no_progress and cfg.run.progress)
        except (FedKDError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001
            if not joined:
                raise
            # In a multi-process job a lost peer surfaces as a collective or connection
            # error; one line is enough, the launcher names the process that died.
            import jax

            print(f"fedkd: error: process {jax.process_index()} stopped: lost contact with another process "
                  f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). "
                  "Resume from the last checkpoint with the same command.", file=sys.stderr)
            return 3
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
    t = result.timing
    if t:
        print(f"time: rounds {t['dispatch']:.1f} s, evaluation {t['evaluation']:.1f} s, "
              f"checkpoints {t['checkpoints']:.1f} s (eval_time, eval_seconds, checkpoint_seconds in metrics.jsonl)")
    if "test_accuracy" in f:
        local = (f"per-client accuracy mean {f['client_acc_mean']:.3f} "
                 f"(p10 {f['client_acc_p10']:.3f}, p90 {f['client_acc_p90']:.3f})"
                 if f.get("client_acc_mean") is not None and np.isfinite(f["client_acc_mean"])
                 else "no local test splits (data.test_fraction=0)")
        if "test_loss" in f:
            print(f"global test accuracy {f['test_accuracy']:.4f}, loss {f['test_loss']:.4f}; {local}")
        else:  # no single global model (fd, fedproto, fedmd: the clients' own; feddf with groups: one per group)
            print(f"global test accuracy {f['test_accuracy']:.4f} (no single global model: the mean over the "
                  f"groups' models or the clients' own); on the local tests {local}")
    groups = sorted(k[: -len("_test_accuracy")] for k in f if k.endswith("_test_accuracy") and "proto" not in k)
    if groups:
        print("per group: " + "; ".join(
            f"{g} test {f[g + '_test_accuracy']:.3f}" + (f" (prototype {f[g + '_proto_test_accuracy']:.3f})"
                                                          if g + "_proto_test_accuracy" in f else "")
            + (f", local {f[g + '_local_acc_mean']:.3f}" if g + "_local_acc_mean" in f else "") for g in groups)
            + f"; spread {f.get('group_acc_spread', float('nan')):.3f}")
    if "teacher_acc_mean" in f:
        print(f"private teachers on their local tests: mean {f['teacher_acc_mean']:.3f} "
              f"(p10 {f['teacher_acc_p10']:.3f}, p90 {f['teacher_acc_p90']:.3f})")
    if f.get("epsilon") is not None:
        print(f"privacy: epsilon {f['epsilon']:.3f} at delta {f['delta']:g} ({f['epsilon_relation']} neighbours); "
              f"covers the global model and test_*, server_*, dp_clip_norm; analyst-only, computed from un-noised "
              f"client data: {', '.join(f.get('privacy_analyst_only', []))} (see privacy.json)")
        if f.get("noise_from_seed"):
            print("privacy: the noise derives from run.seed (exact resume): whoever holds this run directory can "
                  "regenerate and subtract it; privacy.secure_noise=true draws it from OS entropy instead")
    if f.get("cum_bytes_up") is not None:
        print(f"communication: {f['cum_bytes_up'] / 1e6:.2f} MB up, {f['cum_bytes_down'] / 1e6:.2f} MB down")
        if f.get("cum_bytes_down_per_round") is not None:  # compressed downlink: see fedkd_jax.runner.downlink
            print(f"  down = what each sampled client needs (the deltas it missed or the whole model); "
                  f"one compressed delta per sampled client would be {f['cum_bytes_down_per_round'] / 1e6:.2f} MB, "
                  "true only if every client took part every round")
    store = ", checkpoints-clients/" if os.path.isdir(os.path.join(result.run_dir, "checkpoints-clients")) else ""
    print(f"outputs in {result.run_dir}: config.yaml, config.json, metrics.jsonl, metrics.csv, accuracy.png, "
          f"checkpoints/{store}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
