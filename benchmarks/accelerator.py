"""Accelerator readiness: W1, W2, the scale benchmark and a sweep, measured by one command.

    python benchmarks/accelerator.py [--quick] [--out DIR] [--parts w1,w2,scale,sweep]

First a child process detects the backend (cpu / gpu / tpu, device kind and
count, and each device's memory where ``device.memory_stats()`` reports it).
The sizes follow from it: ``accelerator`` on a GPU or TPU (the benchmarks'
full workloads, group sizes up to a device's whole cohort slice), ``cpu``
on a CPU, and ``quick`` with ``--quick`` whatever the backend (tiny sizes: a
smoke test that checks every part runs, not a measurement). Then each part
runs in a process of its own, so its peak memory is its own, a GPU's memory
is free again for the next part, and a crash stays inside its part:

* ``w1`` (functions of ``benchmarks/w1.py``): FedAvg W1 per cohort at
  ``run.group_size=auto`` and at explicit group sizes, against the
  hand-written loop and a float32 matmul measured in the same process.
* ``w2`` (``benchmarks/w2.py``): FedKD against FedAvg of the teacher's and
  of the student's size, per group size: time and upload bytes as ratios.
* ``scale`` (``benchmarks/scale.py``, each setting in its own process): W1
  at growing populations, FedKD with private teachers in the device, host
  and disk client stores, at ``run.group_size=auto``.
* ``sweep`` (``benchmarks/sweep.py``): the FedKD temperature x seed sweep
  batched at ``run.runs_per_device=auto`` and at explicit counts, against
  the same runs one after another (not with ``--quick``).

What ``auto`` means is the library's own choice, recorded per part:
``run.group_size=auto`` (``fedkd_jax.builders.auto_group_size``) is 1 on
CPU and a device's whole cohort slice, up to 64 clients, on GPU/TPU;
``run.runs_per_device=auto`` (``fedkd_jax.sweeps.engine.auto_runs_per_device``)
is 1 on CPU and as many runs as fit in half a device's memory on GPU/TPU.
The explicit values beside it show which setting is fastest.

``--quick`` compiles with most of XLA's optimisations off
(``JAX_DISABLE_MOST_OPTIMIZATIONS=1`` unless set): at tiny sizes compiling
is most of the time and this halves it, so its figures check the plumbing,
not the speed.

A part that fails, or a name in ``--parts`` that is not a part, is recorded
with its error and the other parts still run. Every invocation compiles from
cold: the children share a fresh persistent compilation cache (unless
``FEDKD_COMPILE_CACHE`` or ``JAX_COMPILATION_CACHE_DIR`` is set), so
compile times are a first run's and a sweep's runs one after another reuse
each other's programs as they would for a user.

Writes ``accelerator.json`` and ``accelerator.md`` (one table row per part
and setting: s/round, throughput, ratios) to ``--out`` (default
``benchmarks/results/``) and prints the JSON as the last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = ("w1", "w2", "scale", "sweep")

# Sizes per profile. Group sizes: explicit values swept beside auto ("all": a device's whole cohort slice).
PROFILES = {
    "quick": {
        "timeout_s": 600,
        "w1": {"cohorts": [10], "rounds": 3, "hand_rounds": 2, "group_sizes": [1, 2], "matmul_n": 512},
        "w2": {"rounds": 3, "group_sizes": [], "overrides": ["data.dataset=digits"]},
        "scale": {"rounds": 5, "w1_n": [], "fedkd": [[1_000, "host"]]},
        "sweep": {"rounds": 4, "temps": [1.0, 2.0], "seeds": [0], "run": {"rounds_per_dispatch": 2},
                  "runs_per_device": ["auto", 2], "sequential": False},
    },
    "cpu": {
        "timeout_s": 4 * 3600,
        "w1": {"cohorts": [10, 100, 1000], "rounds": 20, "hand_rounds": 5, "group_sizes": [1, 2, 5], "matmul_n": 2048},
        "w2": {"rounds": 20, "group_sizes": [2], "overrides": []},
        "scale": {"rounds": 20, "w1_n": [100, 10_000, 1_000_000],
                  "fedkd": [[1_000, "device"], [1_000, "host"], [100_000, "host"], [100_000, "disk"]]},
        "sweep": {"rounds": 200, "temps": [1.0, 2.0, 4.0, 8.0], "seeds": [0, 1, 2], "run": {}, "sequential": True,
                  "runs_per_device": ["auto", 2]},
    },
    "accelerator": {
        "timeout_s": 4 * 3600,
        "w1": {"cohorts": [10, 100, 1000], "rounds": 20, "hand_rounds": 5,
               "group_sizes": [1, 4, 16, 64, 256, "all"], "matmul_n": 8192},
        "w2": {"rounds": 20, "group_sizes": [1, 5, "all"], "overrides": []},
        "scale": {"rounds": 20, "w1_n": [100, 10_000, 1_000_000],
                  "fedkd": [[1_000, "device"], [1_000, "host"], [100_000, "host"], [100_000, "disk"]]},
        "sweep": {"rounds": 100, "temps": [1.0, 2.0, 4.0, 8.0], "seeds": [0, 1, 2], "run": {}, "sequential": True,
                  "runs_per_device": ["auto", 1, 2, 4, 12]},
    },
}


# ----------------------------------------------------------------------------- helpers


def group_sizes(explicit, per_device: int, auto: int) -> list[int]:
    """The group sizes to measure: ``auto`` and each explicit one that fits a device's cohort slice."""
    sizes = {auto}
    for g in explicit:
        g = per_device if g == "all" else int(g)
        if 1 <= g <= per_device:
            sizes.add(g)
    return sorted(sizes)


def _row(part_setting: str, sec: float, throughput: float, unit: str, ratios: dict, **extra) -> dict:
    return {"setting": part_setting, "sec_per_round": sec, "throughput": throughput, "throughput_unit": unit,
            "ratios": ratios, **extra}


def _vs_best(rows: list[dict], key) -> None:
    """Each row's time over the fastest row with the same ``key(row)`` (1.0 is the best setting)."""
    best: dict = {}
    for r in rows:
        best[key(r)] = min(best.get(key(r), math.inf), r["sec_per_round"])
    for r in rows:
        r["ratios"]["vs_best"] = r["sec_per_round"] / best[key(r)]


# ----------------------------------------------------------------------------- parts (run in a child)


def part_w1(p: dict) -> dict:
    import w1  # configures one CPU device per core before JAX starts
    import jax

    from fedkd_jax.builders import auto_group_size

    devices = jax.device_count()
    mm = w1.matmul_gflops(p["matmul_n"])
    flops_ex = w1.train_flops_per_example([784, *w1.HIDDEN, 10])
    rows, auto, pops = [], {}, {}
    for c in p["cohorts"]:
        n = 10_000 if c > 100 else 100
        if n not in pops:
            pops[n] = w1.make_population(n)
        per_device = -(-c // devices)
        auto[f"C={c}"] = g_auto = auto_group_size(per_device)
        hand = w1.bench_hand_loop(pops[n], c, p["hand_rounds"] if c <= 100 else 2)
        for g in group_sizes(p["group_sizes"], per_device, g_auto):
            med, comp, acc, done = w1.bench_engine(pops[n], c, p["rounds"] if c <= 100 else max(3, p["rounds"] // 4), g)
            gflops = c * w1.EPC * flops_ex / med / 1e9
            rows.append(_row(f"C={c} N={n} group {g}" + (" (auto)" if g == g_auto else ""), med, c / med,
                             "client updates/s", {"vs_hand_loop": hand / med, "of_matmul": gflops / mm},
                             cohort=c, population=n, group_size=g, auto=g == g_auto, compile_s=comp,
                             gflops=gflops, hand_loop_sec_per_round=hand, test_accuracy=acc, rounds_trained=done))
    _vs_best(rows, lambda r: r["cohort"])
    return {"rows": rows, "auto": {"group_size": auto}, "matmul_gflops": mm, "devices": devices}


def part_w2(p: dict) -> dict:
    import w2
    import jax

    from fedkd_jax.builders import auto_group_size

    cohort = int(next(v.split("=")[1] for v in w2.COMMON if v.startswith("run.cohort_size=")))
    per_device = -(-cohort // jax.device_count())
    g_auto = auto_group_size(per_device)
    rows = []
    for g in group_sizes(p["group_sizes"], per_device, g_auto):
        res = {name: w2.run_method(name, p["rounds"], 0, group_size=g, overrides=p["overrides"]) for name in w2.METHODS}
        student, teacher = res["fedavg_student_size"], res["fedavg_teacher_size"]
        for name, r in res.items():
            sec = r["sec_per_round"]
            rows.append(_row(f"{name} group {g}" + (" (auto)" if g == g_auto else ""), sec, cohort / sec,
                             "client updates/s",
                             {"time_vs_student_fedavg": sec / student["sec_per_round"],
                              "bytes_vs_teacher_fedavg": r["bytes_up_per_round"] / teacher["bytes_up_per_round"]},
                             method=name, group_size=g, auto=g == g_auto, compile_s=r["compile_sec"],
                             holdout_accuracy=r["holdout_accuracy"], bytes_up_per_round=r["bytes_up_per_round"]))
    _vs_best(rows, lambda r: r["method"])
    return {"rows": rows, "auto": {"group_size": g_auto}, "overrides": p["overrides"]}


def part_scale(p: dict) -> dict:
    import scale  # its children import JAX; this process does not, so a GPU stays free for them

    settings = [("w1", n, "host") for n in p["w1_n"]] + [("fedkd", n, store) for n, store in p["fedkd"]]
    rows, errors, first = [], [], {}
    for kind, n, store in settings:
        r = scale.run_child(kind, n, store, p["rounds"])
        label = f"{kind} N={n:,}" + (f" {store} store" if kind == "fedkd" else "")
        if "error" in r:
            errors.append(f"{label}: {r['error']}")
            continue
        first.setdefault(kind, r)
        sec = r["s_per_round"]
        rows.append(_row(label, sec, r["cohort"] / sec, "client updates/s",
                         {f"vs_{first[kind]['n']}": sec / first[kind]["s_per_round"]},
                         kind=kind, n=n, store=store, group_size=r["group_size"], auto=True,
                         peak_rss_mb=r["peak_rss_mb"], device_peak_mb=r.get("device_peak_mb"),
                         setup_s=r["setup_s"], first_dispatch_s=r["first_dispatch_s"]))
    return {"rows": rows, "errors": errors, "auto": {"group_size": sorted({r["group_size"] for r in rows})}}


def part_sweep(p: dict) -> dict:
    import sweep  # its children import JAX

    kw = {"temps": p["temps"], "seeds": p["seeds"]}
    runs = len(p["temps"]) * len(p["seeds"])
    rows, errors, auto = [], [], None
    seq = sweep.run_child("sequential", p["rounds"], run=p["run"], **kw) if p["sequential"] else None
    results = [(f"{runs} runs one after another", seq, False)] if seq is not None else []
    for rpd in p["runs_per_device"]:
        r = sweep.run_child("batched", p["rounds"], run={**p["run"], "runs_per_device": rpd}, **kw)
        if rpd == "auto" and "error" not in r:
            auto = r["runs_per_device"]
        setting = f"auto ({r.get('runs_per_device')})" if rpd == "auto" else str(rpd)
        label = f"{runs} runs batched, runs_per_device {setting}"
        results.append((label, r, rpd == "auto"))
    for label, r, is_auto in results:
        if "error" in r:
            errors.append(f"{label}: {r['error']}")
            continue
        sec = r["compute_s"] / r["run_rounds"]
        ratios = {}
        if seq is not None and "error" not in seq:
            ratios = {"end_to_end_vs_sequential": seq["wall_s"] / r["wall_s"],
                      "throughput_vs_sequential": (seq["compute_s"] / seq["run_rounds"]) / sec}
        rows.append(_row(label, sec, 1 / sec, "run-rounds/s", ratios, mode=r["mode"], wall_s=r["wall_s"],
                         runs_per_device=r.get("runs_per_device"), runs_per_wave=r.get("runs_per_wave"),
                         auto=is_auto, peak_rss_mb=r["peak_rss_mb"], device_peak_mb=r.get("device_peak_mb"),
                         mean_test_accuracy=r["mean_test_accuracy"]))
    _vs_best(rows, lambda r: 0)
    return {"rows": rows, "errors": errors, "auto": {"runs_per_device": auto}, "runs": runs, "rounds": p["rounds"]}


PART_FUNCS = {"w1": part_w1, "w2": part_w2, "scale": part_scale, "sweep": part_sweep}


def detect() -> dict:
    import fedkd_jax as fk

    fk.configure_cpu_devices()
    import jax
    import jaxlib

    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = {}
    return {"backend": jax.default_backend(), "device_kind": dev.device_kind, "device_count": jax.device_count(),
            "process_count": jax.process_count(), "memory_bytes_per_device": stats.get("bytes_limit"),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}


def child(name: str, profile: str) -> dict:
    if name == "detect":
        return detect()
    if name not in PART_FUNCS:
        sys.exit(f"unknown part {name!r}; the parts are {', '.join(PARTS)}")
    out = PART_FUNCS[name](PROFILES[profile][name])
    if name in ("w1", "w2"):  # scale and sweep measure in their own children
        import jax

        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
        if all(v is not None for v in peaks):
            out["device_peak_mb"] = max(peaks) / 2**20
    return out


# ----------------------------------------------------------------------------- parent


def run_child(name: str, profile: str, env: dict, timeout: float) -> dict:
    """One part (or ``detect``) in its own process: its JSON with ``ok`` and ``wall_s``, or its error."""
    t = time.perf_counter()
    # a session of its own: a timeout (or Ctrl-C here) ends the part's own children too
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", name, "--profile", profile],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except BaseException as e:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        if not isinstance(e, subprocess.TimeoutExpired):
            raise
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t}
    wall = time.perf_counter() - t
    line = next((s for s in reversed(stdout.splitlines()) if s.startswith("{")), None)
    if p.returncode != 0 or line is None:
        tail = [s for s in stderr.strip().splitlines() if s.strip()]
        return {"ok": False, "error": tail[-1] if tail else f"exit status {p.returncode}",
                "stderr_tail": tail[-20:], "wall_s": wall}
    out = json.loads(line)
    out["ok"] = not out.get("errors")
    out["wall_s"] = wall
    return out


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


RATIO_NAMES = {"vs_hand_loop": "x hand loop", "of_matmul": "of matmul", "vs_best": "x best",
               "time_vs_student_fedavg": "x student FedAvg time", "bytes_vs_teacher_fedavg": "x teacher FedAvg bytes",
               "end_to_end_vs_sequential": "x sequential end to end",
               "throughput_vs_sequential": "x sequential throughput"}


def _ratios(r: dict) -> str:
    out = []
    for k, v in r["ratios"].items():
        if k == "of_matmul":
            out.append(f"{100 * v:.0f}% of matmul")
        elif k.startswith("vs_") and k not in RATIO_NAMES:  # scale: against the smallest population
            out.append(f"{v:.2f}x N={int(k[3:]):,}")
        else:
            out.append(f"{v:.2f}{RATIO_NAMES.get(k, ' ' + k)}")
    return "; ".join(out)


def markdown(summary: dict) -> str:
    b = summary["backend"]
    mem = b.get("memory_bytes_per_device")
    note = (" Compiled with most XLA optimisations off: these figures check that every part runs, not its speed."
            if summary.get("unoptimised") else "")
    lines = [f"# Accelerator readiness ({summary['profile']} sizes)", "",
             f"Backend {b.get('backend', '?')} ({b.get('device_kind', '?')}) x {b.get('device_count', '?')} device(s), "
             f"memory per device {f'{mem / 2**30:.1f} GiB' if mem else 'not reported'}; jax {b.get('jax', '?')}; "
             f"{b.get('cpu_count', '?')} CPU cores. Total {summary['wall_s']:.0f} s.{note}", "",
             "| part | setting | s/round | throughput | ratios |", "|---|---|---|---|---|"]
    for name, part in summary["parts"].items():
        for r in part.get("rows", []):
            lines.append(f"| {name} | {r['setting']} | {_num(r['sec_per_round'])} | "
                         f"{_num(r['throughput'])} {r['throughput_unit']} | {_ratios(r)} |")
        for e in ([part["error"]] if "error" in part else part.get("errors", [])):
            lines.append(f"| {name} | – | – | – | error: {str(e).replace('|', '/')} |")
    lines += ["", "| part | status | wall s | peak host MB | peak device MB | auto |", "|---|---|---|---|---|---|"]
    for name, part in summary["parts"].items():
        rss = part.get("peak_rss_mb")
        rss = max([r["peak_rss_mb"] for r in part.get("rows", []) if r.get("peak_rss_mb")] + ([rss] if rss else []),
                  default=None)
        dev = part.get("device_peak_mb") or max([r["device_peak_mb"] for r in part.get("rows", [])
                                                 if r.get("device_peak_mb")], default=None)
        status = "ok" if part["ok"] else ("failed" if "error" in part else "some settings failed")
        lines.append(f"| {name} | {status} | {part['wall_s']:.1f} | {f'{rss:,.0f}' if rss else '–'} | "
                     f"{f'{dev:,.0f}' if dev else '–'} | {json.dumps(part.get('auto', {}))} |")
    lines += ["", "s/round: median seconds per round after warm-up (sweep: per run-round, compile excluded); "
              "x best: against the fastest setting of the same cohort / method (sweep: of the part).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes whatever the backend (a smoke test)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for accelerator.json / .md")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--profile", choices=tuple(PROFILES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.profile)), flush=True)
        return

    t0 = time.perf_counter()
    env = dict(os.environ)
    cache = None
    if not env.get("FEDKD_COMPILE_CACHE") and not env.get("JAX_COMPILATION_CACHE_DIR"):
        cache = env["FEDKD_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="fedkd-accel-cache-")
    if args.quick:  # a smoke test: compiling dominates tiny sizes, and XLA's optimisations double it
        env.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    try:
        backend = run_child("detect", "quick", env, 600)
        backend.pop("wall_s", None)
        if not backend.pop("ok"):
            print(f"backend detection failed: {backend['error']}", file=sys.stderr)
        profile = "quick" if args.quick else ("cpu" if backend.get("backend", "cpu") == "cpu" else "accelerator")
        parts = {}
        for name in [s.strip() for s in args.parts.split(",") if s.strip()]:
            parts[name] = run_child(name, profile, env, PROFILES[profile]["timeout_s"])
            state = "ok" if parts[name]["ok"] else f"error: {parts[name].get('error') or parts[name].get('errors')}"
            print(f"{name}: {state} ({parts[name]['wall_s']:.1f} s)", flush=True)
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    summary = {"benchmark": "accelerator", "profile": profile, "sizes": {k: PROFILES[profile].get(k) for k in parts},
               "backend": backend,
               "unoptimised": env.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "").lower() in ("1", "true"),
               "wall_s": time.perf_counter() - t0, "parts": parts}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "accelerator.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.out, "accelerator.md"), "w") as f:
        f.write(markdown(summary))
    print(markdown(summary))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
