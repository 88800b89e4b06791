"""Grouped clients (``run.group_size`` >= 2, the accelerator path) equal group size 1, and never hang.

Every algorithm of ``ALGORITHM_BUILDERS`` trains two rounds (one dispatch)
at group sizes 1, 2 and 4, and each grouped run must equal its group-size-1
run: integer metrics (bytes, contributing clients) and the weight sum
exactly, everything else to float tolerance (a vmapped group's batched dots
round differently from one client's, so exact equality does not hold).

The matrix runs in two worker subprocesses (this file, run as a script),
pinned to two cores with two CPU devices, each step under a watchdog
(``faulthandler``: a step that does not return dumps the stacks and exits),
so a deadlock fails the test within ``STEP_TIMEOUT`` instead of stalling the
suite, naming the configuration.

It catches the hang of grouped clients with SVD compression on CPU devices:
the student's 64 x 40 kernel gives the compressor a 40 x 40 Gram matrix whose
eigh (~5 * 40^3 FLOP) is above the 200k FLOP at which jaxlib 0.10 splits a
batch over XLA's intra-op pool; with two devices on two cores (the pool's
size), both pool threads block waiting for chunks no thread is left to run.
(Without the fix in ``fedkd_jax.compression._eigh`` it fails on the FedAvg
and FedKD cells with compression=svd, devices=2, group=2.)

Cost: the round programs dominate (~2 s of CPU each to trace and compile,
at XLA's lowest optimisation level), so by default the matrix is a covering
subset of 28 programs (~65 s of CPU, ~35 s on two idle cores): FedKD (the
default algorithm, the one that hung, and the only one with per-client state,
so the only one whose store matters) in full (devices 1 / 2 x compression
none / svd x group 1 / 2 / 4 x store device / host / disk, the three stores
sharing one compiled program), and every other algorithm with svd on 2
devices (group 1 / 2) and without compression on 1 device (group 1 / 4).
Two architecture-group methods (fd, heterofl) run on 2 devices at group 1
and 2 with two groups. ``FEDKD_FULL_GROUP_MATRIX=1`` runs the full product
for every homogeneous algorithm and every heterogeneous one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 2
GROUPS = (1, 2, 4)
STORES = ("device", "host", "disk")
STEP_TIMEOUT = 120  # seconds for one step (build, or compile and run one configuration): a hang trips it
MATRIX_TIMEOUT = 900  # both workers together, a backstop
BASE = [
    "data.num_clients=12",
    "data.proxy_fraction=0.1",
    "model.hidden=[40]",  # see the module docstring: wide enough for jaxlib to split a batched eigh
    "distill.teacher_hidden=[12]",
    "distill.server_steps=2",
    "distill.server_batch_size=16",
    "distill.val_fraction=0",
    "distill.warmup_rounds=1",
    "run.cohort_size=8",  # a multiple of devices x group: no padding, so every group size sees the same clients
    f"run.rounds={ROUNDS}",
    "client.local_steps=1",
    "client.batch_size=8",
]


# Architecture groups (fedkd_jax.hetero): two groups, each its own vmapped batch inside the round.
# One logit method and one width method stand for their families (fedproto and fedmd share fd's
# path, fedrolex heterofl's) unless the full matrix is asked for.
HETERO = {
    "fd": ["model.groups=[{kind: mlp, hidden: [40], share: 0.5}, {kind: mlp, hidden: [24, 24], share: 0.5}]"],
    "fedproto": ["model.groups=[{kind: mlp, hidden: [40], share: 0.5}, {kind: mlp, hidden: [24], share: 0.5}]",
                 "model.proto_dim=16"],
    "fedmd": ["model.groups=[{kind: mlp, hidden: [40], share: 0.5}, {kind: mlp, hidden: [24], share: 0.5}]",
              "distill.public_subset=16"],
    "heterofl": ["model.groups=[{width: 1.0, share: 0.5}, {width: 0.5, share: 0.5}]"],
    "fedrolex": ["model.groups=[{width: 1.0, share: 0.5}, {width: 0.5, share: 0.5}]"],
}
HETERO_DEFAULT = ("fd", "heterofl")


def matrix(algorithms, full: bool):
    """``[(algorithm, compression, devices, groups)]``: the cells, each with its group-size-1 reference."""
    cells = []
    for alg in algorithms:
        if alg in HETERO:  # no compression (the width methods refuse it), two devices, groups of 2
            if full or alg in HETERO_DEFAULT:
                cells.append((alg, "none", 2, (1, 2)))
            continue
        if full or alg == "fedkd":
            cells += [(alg, comp, d, GROUPS) for comp in ("none", "svd") for d in (1, 2)]
        else:
            cells += [(alg, "svd", 2, (1, 2)), (alg, "none", 1, (1, 4))]
    return cells


def shards(cells, n: int):
    """``cells`` split over ``n`` workers, balanced by their number of programs (greedy)."""
    out, load = [[] for _ in range(n)], [0] * n
    for cell in sorted(cells, key=lambda c: -len(c[3])):
        i = load.index(min(load))
        out[i].append(cell)
        load[i] += len(cell[3])
    return out


# --------------------------------------------------------------------- pytest side
def test_group_sizes_equal_group_size_one_and_never_hang():
    import time

    from fedkd_jax.builders import ALGORITHM_BUILDERS

    full = os.environ.get("FEDKD_FULL_GROUP_MATRIX") == "1"
    cells = matrix(list(ALGORITHM_BUILDERS), full)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["JAX_PLATFORMS"] = "cpu"
    # Compile time dominates and does not change what is tested (the deadlock is at run time).
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                        " --xla_llvm_disable_expensive_passes=true").strip()
    # Two workers (tracing and compiling hold one core each), both on the same two cores.
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(part)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for part in shards(cells, 2)]
    deadline = time.monotonic() + MATRIX_TIMEOUT
    rows, failures = [], []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        rows += lines
        if p.returncode != 0:
            started = [r["start"] for r in lines if "start" in r]
            failures.append(f"a worker exited {p.returncode} during {started[-1] if started else 'start-up'!r} "
                            f"(a hang trips its watchdog after {STEP_TIMEOUT} s):\n{err[-3000:]}")
    assert not failures, "\n".join(failures)
    done = [r for r in rows if "run" in r]
    expected = sum(len(g) * (len(STORES) if a == "fedkd" else 1) for a, _, _, g in cells)
    assert len(done) == expected, (len(done), expected)
    bad = [r for r in done if not r["ok"]]
    assert not bad, "\n".join(f"{r['run']}: {r['diff']}" for r in bad)
    # the configurations that hung before the fix ran (and finished)
    assert any(r["run"].startswith("fedkd compression=svd devices=2 group=2") for r in done)
    print(f"group matrix: {len(done)} runs of {sum(len(c[3]) for c in cells)} programs; workers "
          + ", ".join(f"{r['elapsed']:.1f} s" for r in rows if "programs" in r))


# --------------------------------------------------------------------- subprocess side
def _worker(cells) -> None:  # pragma: no cover - runs in the subprocess
    import dataclasses
    import faulthandler
    import tempfile
    import time

    # The deadlock needs every thread of XLA's intra-op pool (sized from the CPU
    # affinity) inside a device's batched LAPACK call: two cores, two devices.
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 2:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    import numpy as np

    import fedkd_jax as fk
    from fedkd_jax.builders import build_algorithm, build_data, build_model, build_simulator
    from fedkd_jax.config import load_config, resolve_defaults
    from fedkd_jax.store import make_store

    t_start = time.perf_counter()

    def emit(**row):
        row["elapsed"] = round(time.perf_counter() - t_start, 2)
        print(json.dumps(row), flush=True)

    def watch(what):
        """(Re)arm the watchdog: a step that does not return in time dumps every thread and exits."""
        emit(start=what)
        faulthandler.dump_traceback_later(STEP_TIMEOUT, exit=True)

    def host(tree):
        return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]

    tmp = tempfile.TemporaryDirectory(prefix="fedkd-group-matrix-")
    data = None
    for alg_name, comp, devices, groups in cells:
        watch(f"build {alg_name} compression={comp} devices={devices}")
        cfg = resolve_defaults(load_config(None, [f"algorithm={alg_name}", f"compression.method={comp}", *BASE,
                                                  *HETERO.get(alg_name, [])]))
        data = build_data(cfg) if data is None else data  # the same data for every cell
        alg = build_algorithm(cfg, build_model(cfg, data), data)
        stores = STORES if alg_name == "fedkd" else ("device",)  # the store path is the same for all
        refs = {}
        for g in groups:
            c = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, group_size=str(g)))
            sim = build_simulator(c, data, alg, out_dir=tmp.name, mesh=fk.client_mesh(devices))
            assert sim.group_size == g and sim.padded_cohort == sim.cohort_size
            pool = sim.put_data()
            for store in stores:  # the stores share the compiled round
                run = f"{alg_name} compression={comp} devices={devices} group={g} store={store}"
                watch(f"run {run}")
                if sim.store is not None:
                    if store != "device":
                        sim.store = make_store(store, sim.client_template, sim.num_clients, mesh=sim.mesh,
                                               directory=os.path.join(tmp.name, run.replace(" ", "_")))
                    sim.reset_store()
                state, metrics = sim.run(sim.init(0), pool, ROUNDS)
                res = {"server": host(state.server),
                       "clients": host(sim.client_states(state.key)) if sim.store is not None else [],
                       "metrics": {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}}
                if g == 1:
                    refs[store] = res
                    emit(run=run, ok=True, diff=[])
                    continue
                ref, diff = refs[store], []
                for k, a in ref["metrics"].items():
                    b = res["metrics"][k]
                    exact = np.issubdtype(a.dtype, np.integer) or k == "weight_sum"
                    if not (np.array_equal(a, b) if exact else
                            np.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)):
                        diff.append(f"metric {k}: {a.tolist()} vs {b.tolist()}")
                for part in ("server", "clients"):
                    for i, (a, b) in enumerate(zip(ref[part], res[part])):
                        if not np.allclose(a, b, rtol=1e-4, atol=1e-5):
                            diff.append(f"{part} leaf {i}: max |diff| {float(np.max(np.abs(a - b))):.3g}")
                emit(run=run, ok=not diff, diff=diff[:6])
            if sim.store is not None:
                getattr(sim.store, "close", lambda: None)()
    faulthandler.cancel_dump_traceback_later()
    emit(programs=sum(len(c[3]) for c in cells))
    tmp.cleanup()


if __name__ == "__main__":
    _worker([tuple(c) for c in json.loads(sys.argv[1])])
