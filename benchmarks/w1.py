"""Benchmark W1: FedAvg round throughput vs a hand-written JAX loop and vs matmul peak.

Workload: MNIST-5k (4,000 train rows, 1,000 held out), IID clients of 40
examples, MLP 784-200-200-10 (He-normal, zero bias), 1 local epoch, batch 10,
SGD lr 0.05, FedAvg. Cohorts C = 10 and 100 on 100 clients, and C = 1,000 on
a 10,000-client population resampled from the same rows.

Printed per C: median seconds per round after warm-up, client updates per
second, compile time, achieved GFLOP/s and its ratio to a float32 2048x2048
matmul measured in the same run, and the same workload written by hand (a
Python loop over the cohort calling one jitted per-client training function,
then averaging) with the engine's speed-up over it. JSON is the last line and
is saved to benchmarks/results/w1.json.

    python benchmarks/w1.py [--rounds 20] [--cohorts 10,100,1000] [--group-sizes 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import fedkd_jax as fk

fk.configure_cpu_devices()  # one CPU device per core, before JAX starts

import jax
import jax.numpy as jnp
import numpy as np
import optax

HIDDEN = (200, 200)
LR, BATCH, EPC = 0.05, 10, 40


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices()[0])
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(ts)) / 1e9


def train_flops_per_example(sizes) -> int:
    """Forward 2*W, weight gradients 2*W, input gradients 2*W except the first layer."""
    weights = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    return 6 * sum(weights) - 2 * weights[0]


def make_population(num_clients: int, seed: int = 0):
    ds = fk.data.load_mnist5k()
    return fk.federate(ds, partition="iid", num_clients=num_clients, seed=seed,
                       examples_per_client=EPC, test_fraction=0.0, global_test_fraction=0.2)


def bench_engine(fd, cohort: int, rounds: int, group_size: int):
    model = fk.make_model("mlp", num_features=784, num_classes=10, hidden=HIDDEN)
    alg = fk.fedavg(model, optax.sgd(LR), optax.sgd(1.0), batch_size=BATCH, local_epochs=1)
    sim = fk.Simulator(alg, fd, cohort_size=cohort, group_size=group_size)
    data = sim.put_data()
    state = sim.put_state(sim.init(0))
    t = time.perf_counter()
    sim.lower(state, data).compile()
    compile_s = time.perf_counter() - t
    state, _ = sim.step(state, data)  # warm-up (fills jit's own cache)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        state, m = sim.step(state, data)
        times.append(time.perf_counter() - t)
    ev = fk.engine.make_evaluator(model.apply)(alg.model_params(state.server), sim.eval_data())
    return float(np.median(times)), compile_s, float(ev["test_accuracy"]), rounds + 1


def bench_hand_loop(fd, cohort: int, rounds: int):
    """How a careful user writes it: one jitted per-client function, a Python loop, an average."""
    model = fk.make_model("mlp", num_features=784, num_classes=10, hidden=HIDDEN)
    opt = optax.sgd(LR)

    def loss(p, x, y):
        logits, _ = model.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def local(p, x, y):  # x [S, B, 784]
        def step(carry, b):
            p, s = carry
            u, s = opt.update(jax.grad(loss)(p, *b), s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (p, opt.init(p)), (x, y))[0][0]

    @jax.jit
    def average(ps):
        return jax.tree.map(lambda *a: sum(a) / len(a), *ps)

    dev = jax.devices()[0]
    rows = fd.row_table(np.arange(fd.num_clients))[:, :EPC]  # each client's own padded copy, as a user would
    xs = jax.device_put(jnp.asarray(fd.x[rows]), dev)
    ys = jax.device_put(jnp.asarray(fd.y[rows]), dev)
    params = jax.device_put(model.init(jax.random.key(0)), dev)
    rng = np.random.default_rng(0)
    steps = EPC // BATCH

    def one_round(params):
        ids = rng.choice(fd.num_clients, cohort, replace=False)
        outs = []
        for c in ids:
            perm = rng.permutation(EPC)
            outs.append(local(params, xs[c, perm].reshape(steps, BATCH, -1), ys[c, perm].reshape(steps, BATCH)))
        return jax.block_until_ready(average(outs))

    params = one_round(params)  # warm-up / compile
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        params = one_round(params)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds per engine measurement")
    ap.add_argument("--hand-rounds", type=int, default=5, help="timed rounds of the hand-written loop")
    ap.add_argument("--cohorts", default="10,100,1000")
    ap.add_argument("--group-sizes", default="1", help="engine group sizes to report (first is the headline)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "w1.json"))
    args = ap.parse_args()

    mm = matmul_gflops()
    flops_ex = train_flops_per_example([784, *HIDDEN, 10])
    pops = {}
    results = []
    for c in [int(v) for v in args.cohorts.split(",")]:
        n = 10_000 if c > 100 else 100
        if n not in pops:
            pops[n] = make_population(n)
        fd = pops[n]
        hand_rounds = max(2, args.hand_rounds if c <= 100 else 2)
        hand = bench_hand_loop(fd, c, hand_rounds)
        for g in [int(v) for v in args.group_sizes.split(",")]:
            med, comp, acc, done = bench_engine(fd, c, args.rounds if c <= 100 else max(3, args.rounds // 4), g)
            gflops = c * EPC * flops_ex / med / 1e9
            row = {
                "cohort": c,
                "population": n,
                "group_size": g,
                "devices": jax.device_count(),
                "sec_per_round": med,
                "client_updates_per_sec": c / med,
                "compile_sec": comp,
                "gflops": gflops,
                "matmul_gflops": mm,
                "fraction_of_matmul": gflops / mm,
                "hand_loop_sec_per_round": hand,
                "speedup_vs_hand_loop": hand / med,
                "test_accuracy_after_rounds": acc,
                "rounds_trained": done,
            }
            results.append(row)
            print(
                f"C={c:5d} (N={n}, group {g}, {jax.device_count()} dev): {med * 1e3:8.2f} ms/round  "
                f"{c / med:8.0f} client-updates/s  compile {comp:.2f} s  {gflops:6.1f} GFLOP/s "
                f"({100 * gflops / mm:4.1f}% of matmul {mm:.0f})  hand loop {hand * 1e3:8.2f} ms "
                f"-> {hand / med:5.2f}x  acc after {done} rounds {acc:.3f}",
                flush=True,
            )
    out = {
        "benchmark": "W1",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                    "backend": jax.default_backend(), "devices": jax.device_count()},
        "flops_per_example": flops_ex,
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
