"""Benchmark: the standard workloads' shapes at their real population sizes.

* (a) FEMNIST: 3,400 writers whose sizes follow FEMNIST's (LEAF reports a
  mean of 226 and a standard deviation of 88 images per writer; drawn here
  from a log-normal with that mean and spread, clipped to 10-465), 28x28
  images, 62 classes, the FedAvg CNN of McMahan et al. (``femnist_cnn``,
  1,690,046 parameters), batch 20, one local epoch, cohorts 10 and 100.
* (b) The pfl-research CIFAR-10 benchmark setting: 1,000 users x 50 images,
  cohort 50, batch 10, one local epoch, local SGD 0.1, their ``simple_cnn``
  (two unpadded 3x3 convolutions of 32 and 64, one 2x2 pool, dense 128: the
  same network as ``femnist_cnn_dropout``, 1,626,442 parameters).

The images are synthetic (uniform pixels, random labels) of the real shapes
and population sizes: a round's cost does not depend on the pixel values,
and the real files are not on this machine. Each setting runs in its own process and reports
seconds per round (median after one compile round), peak RSS (with the
pool on every device and with ``data.pool=host``), and the
padding waste the dynamic local loop avoids (the share of steps a round
padded to the largest client would have run empty). JSON last, saved to
benchmarks/results/workloads.json.

    python benchmarks/workloads.py [--rounds 3] [--parts femnist,cifar10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def femnist_sizes(n: int, rng) -> "np.ndarray":  # noqa: F821 - numpy imported in the child
    import numpy as np

    mean, sd = 226.0, 88.0
    s2 = np.log(1 + (sd / mean) ** 2)
    return np.clip(np.round(rng.lognormal(np.log(mean) - s2 / 2, np.sqrt(s2), n)), 10, 465).astype(np.int64)


def population(part: str):
    import numpy as np

    import fedkd_jax as fk
    from fedkd_jax.data.datasets import Dataset

    rng = np.random.default_rng(0)
    if part == "femnist":
        sizes, shape, classes = femnist_sizes(3400, rng), (28, 28, 1), 62
    else:
        sizes, shape, classes = np.full(1000, 50), (32, 32, 3), 10
    n = int(sizes.sum())
    x = rng.random((n, int(np.prod(shape))), dtype=np.float32)
    y = rng.integers(0, classes, n).astype(np.int32)
    ds = Dataset(part, x, y, classes, shape, np.repeat(np.arange(len(sizes)), sizes))
    return fk.federate(ds, partition="natural", num_clients=len(sizes), seed=0, test_fraction=0.0)


def child(part: str, cohort: int, rounds: int, pool: str = "device") -> dict:
    import fedkd_jax as fk

    fk.configure_cpu_devices()
    fk.configure_compile_cache()
    import jax
    import numpy as np
    import optax

    t0 = time.perf_counter()
    fd = population(part)
    if part == "femnist":
        model = fk.make_model("femnist_cnn", num_features=784, num_classes=62, image_shape=(28, 28, 1))
        batch, lr = 20, 0.1
    else:
        # pfl-research's simple_cnn is the same network as femnist_cnn_dropout (1,626,442 parameters)
        model = fk.make_model("femnist_cnn_dropout", num_features=3072, num_classes=10, image_shape=(32, 32, 3))
        batch, lr = 10, 0.1
    sim = fk.Simulator(fk.fedavg(model, optax.sgd(lr), optax.sgd(1.0), batch_size=batch), fd, cohort_size=cohort,
                       pool=pool)
    data = sim.put_data()
    state = sim.put_state(sim.init(0))
    setup = time.perf_counter() - t0
    t = time.perf_counter()
    state, _ = sim.step(state, data)
    jax.block_until_ready(state)
    first = time.perf_counter() - t
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        state, m = sim.step(state, data)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
    steps = np.ceil(fd.counts / batch)
    return {"part": part, "pool": pool, "clients": fd.num_clients, "cohort": cohort, "rows": int(len(fd.x)),
            "sizes": {"min": int(fd.counts.min()), "mean": float(fd.counts.mean()), "max": int(fd.counts.max())},
            "params": model.num_params, "s_per_round": float(np.median(times)), "first_round_s": first,
            "setup_s": setup, "padding_waste_avoided": float(1 - steps.mean() / steps.max()),
            "train_loss": float(np.asarray(m["train_loss"]).reshape(-1)[-1]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parts", default="femnist,cifar10")
    ap.add_argument("--child", nargs=2, metavar=("PART", "COHORT"))
    ap.add_argument("--pool", default="device,host", help="pools to measure (data.pool): device, host")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.rounds, args.pool)))
        return
    settings = {"femnist": (10, 100), "cifar10": (50,)}
    results = []
    for part in args.parts.split(","):
        for c, pool in ((c, pool) for c in settings[part] for pool in args.pool.split(",")):
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", part, str(c),
                                "--rounds", str(args.rounds), "--pool", pool], capture_output=True, text=True,
                               timeout=3600)
            r = (json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else
                 {"part": part, "cohort": c, "error": (p.stderr.strip().splitlines() or [str(p.returncode)])[-1]})
            results.append(r)
            print(json.dumps(r), flush=True)
    import jax

    summary = {"benchmark": "workloads", "machine": platform.machine(), "cpus": os.cpu_count(),
               "backend": jax.default_backend(), "jax": jax.__version__, "data": "synthetic pixels, real shapes",
               "results": results}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "workloads.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
