"""Benchmark: a heterogeneous round (three architectures) as one program, against the alternatives.

Workload: MNIST-5k, 100 IID clients of 40 examples; three architecture
groups of equal shares: MLP 784-64-10, MLP 784-200-200-10 and a CNN (conv
16, conv 32, dense 64); FD (Jeong et al. 2018: cross-entropy plus
distillation towards per-label global logits), one local epoch, batch 10,
SGD lr 0.05. Cohorts 10 and 100 (stratified: each group gets its share).

Three ways to run the same rounds, in one process:

* ``one_program``: fedkd_jax's round, every group's clients as their own
  batch inside one jitted program (``rounds_per_dispatch`` rounds a dispatch);
* ``groups_in_turn``: the same engine, but each group is its own simulator
  (its own program over its own clients) and the three run one after
  another every round, as a library without architecture groups would;
* ``client_loop``: plain JAX, one client at a time, a Python loop over the
  cohort calling one jitted local-training function per architecture
  (PFLlib's and HtFLlib's structure), then the per-label sums in numpy.

Printed per cohort: median seconds per round after warm-up, client updates
per second, and the two alternatives' time as a ratio of ``one_program``'s.
JSON last, saved to benchmarks/results/hetero.json.

    python benchmarks/hetero.py [--rounds 10] [--cohorts 10,100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import fedkd_jax as fk

fk.configure_cpu_devices()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

LR, BATCH, EPC, N = 0.05, 10, 40, 100
SHARES = (1 / 3, 1 / 3, 1 / 3)


def population():
    return fk.federate(fk.data.load_mnist5k(), partition="iid", num_clients=N, seed=0, examples_per_client=EPC,
                       test_fraction=0.0, global_test_fraction=0.2)


def models():
    return [fk.make_model("mlp", num_features=784, num_classes=10, hidden=(64,)),
            fk.make_model("mlp", num_features=784, num_classes=10, hidden=(200, 200)),
            fk.make_model("cnn", num_features=784, num_classes=10, channels=(16, 32), hidden=(64,),
                          image_shape=(28, 28, 1))]


def timed(step, rounds: int, per_call: int = 1) -> float:
    step()  # warm-up: compile
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) / per_call)
    return float(np.median(times))


def one_program(fd_data, member, cohort, rounds, per_dispatch):
    alg = fk.hetero.fd(models(), optax.sgd(LR), num_classes=10, batch_size=BATCH)
    sim = fk.Simulator(alg, fd_data, cohort_size=cohort, groups=member)
    pool, box = sim.put_data(), [sim.put_state(sim.init(0))]

    def step():
        box[0], m = sim.run(box[0], pool, per_dispatch)
        jax.block_until_ready(m)

    return timed(step, rounds, per_dispatch), sim.layout.cohort


def groups_in_turn(fd_data, member, cohorts):
    sims = []
    for g, (model, c) in enumerate(zip(models(), cohorts)):
        ids = np.flatnonzero(member == g)
        rows = [fd_data.client_rows(int(i)) for i in ids]
        sub = fd_data.replace(train_rows=np.concatenate(rows),
                              train_offsets=np.concatenate([[0], np.cumsum([len(r) for r in rows])]),
                              test_rows=np.zeros(0, np.int64), test_offsets=np.zeros(len(ids) + 1, np.int64))
        alg = fk.hetero.fd([model], optax.sgd(LR), num_classes=10, batch_size=BATCH)
        sim = fk.Simulator(alg, sub, cohort_size=c)
        sims.append([sim, sim.put_data(), sim.put_state(sim.init(g))])

    def step():
        for s in sims:
            s[2], m = s[0].run(s[2], s[1], 1)
            jax.block_until_ready(m)

    return step


def client_loop(fd_data, member, cohorts):
    """Plain JAX: one jitted local update per architecture, a Python loop over the cohort."""
    opt = optax.sgd(LR)
    ms = models()
    params = {int(i): ms[member[i]].init(jax.random.key(int(i))) for i in range(N)}
    x_all, y_all = jnp.asarray(fd_data.x), jnp.asarray(fd_data.y)

    def make_update(model):
        def loss(p, xb, yb, target, valid):
            logits = model.apply(p, xb)[0]
            ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1))
            t = jax.nn.log_softmax(target[yb])
            kl = jnp.sum(jnp.exp(t) * (t - jax.nn.log_softmax(logits)), -1)
            return ce + jnp.sum(kl * valid[yb]) / jnp.maximum(jnp.sum(valid[yb]), 1), logits

        @jax.jit
        def update(p, rows, key, target, valid):
            order = jax.random.permutation(key, rows)
            st = opt.init(p)

            def body(carry, idx):
                p, st, sums, counts = carry
                xb, yb = x_all[idx], y_all[idx]
                (_, logits), g = jax.value_and_grad(loss, has_aux=True)(p, xb, yb, target, valid)
                u, st = opt.update(g, st, p)
                oh = jax.nn.one_hot(yb, 10)
                return (optax.apply_updates(p, u), st, sums + oh.T @ logits, counts + oh.sum(0)), None

            init = (p, st, jnp.zeros((10, 10)), jnp.zeros(10))
            (p, _, sums, counts), _ = jax.lax.scan(body, init, order.reshape(-1, BATCH))
            return p, sums, counts

        return update

    updates = [make_update(m) for m in ms]
    members = [np.flatnonzero(member == g) for g in range(3)]
    state = {"target": jnp.zeros((10, 10)), "valid": jnp.zeros(10), "round": 0}
    rows = {int(i): jnp.asarray(fd_data.client_rows(int(i)), jnp.int32) for i in range(N)}

    def step():
        rng = np.random.default_rng(state["round"])
        state["round"] += 1
        sums, counts = np.zeros((10, 10)), np.zeros(10)
        for g, c in enumerate(cohorts):
            for i in rng.choice(members[g], c, replace=False):
                i = int(i)
                params[i], s, n = updates[g](params[i], rows[i], jax.random.key(i), state["target"], state["valid"])
                sums += np.asarray(s)
                counts += np.asarray(n)
        have = counts > 0
        state["target"] = jnp.where(have[:, None], sums / np.maximum(counts, 1)[:, None], state["target"])
        state["valid"] = jnp.maximum(state["valid"], have)

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--cohorts", default="10,100")
    ap.add_argument("--per-dispatch", type=int, default=5, help="rounds per dispatch of the one-program engine")
    args = ap.parse_args()
    data = population()
    member = fk.hetero.assign_groups(N, SHARES, seed=0)
    out = {"backend": jax.default_backend(), "devices": jax.device_count(), "machine": platform.machine(),
           "workload": "FD, MNIST-5k, 100 clients x 40, groups mlp[64] / mlp[200,200] / cnn[16,32]+64", "cohorts": {}}
    for c in (int(v) for v in args.cohorts.split(",")):
        one, cohorts = one_program(data, member, c, args.rounds, args.per_dispatch)
        turn = timed(groups_in_turn(data, member, cohorts), args.rounds)
        loop = timed(client_loop(data, member, cohorts), max(3, args.rounds // 2))
        row = {"group_cohorts": list(cohorts), "one_program_s": one, "groups_in_turn_s": turn, "client_loop_s": loop,
               "updates_per_s": c / one, "groups_in_turn_over_one": turn / one, "client_loop_over_one": loop / one}
        out["cohorts"][c] = row
        print(f"C={c:4d} {cohorts}: one program {one * 1e3:8.1f} ms ({c / one:7.0f} updates/s) | groups in turn "
              f"{turn * 1e3:8.1f} ms ({turn / one:.2f}x) | client loop {loop * 1e3:8.1f} ms ({loop / one:.2f}x)")
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hetero.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
