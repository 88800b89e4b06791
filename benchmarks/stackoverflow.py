"""Benchmark: Stack Overflow next-word prediction at its real scale, pool on disk.

The real TFF files are not on this machine, so the corpus is SYNTHETIC, of
the real size: 342,477 clients holding 135,818,730 training sentences (TFF's
Stack Overflow training split). Client sizes are log-normal (mean 396.6,
sigma 1.2) clipped to 1-10,000 and then adjusted, one sentence at a time, to
sum exactly to the total. Each sentence has 1 + Binomial(24, 0.45) words
(over 20 is cut to 20), each word drawn from a Zipf(1.1) law over a
100,000-word language whose 10,000 most frequent words are the vocabulary
(the rest map to out-of-vocabulary); rows are laid out as TFF's preprocessing
makes them (``[bos] words [eos]``, 20 input ids, targets shifted by one, -1
at padding; pad 0, words 1..10,000, oov 10,001, bos 10,002, eos 10,003).
The corpus is written in chunks straight into a ``data.pool=disk`` pool file
(:mod:`fedkd_jax.store.pool_file`, ids uint16 / int16): it is never whole in
memory.

The round is Reddi et al. 2021's setting: cohort 50, batch 16, one local
epoch, at most 256 sentences per client (each client's first 256: rows are
i.i.d. here, so this is the same as a seeded choice, which would need a sort
of all 135.8M rows), ``nwp_lstm`` (embedding 96, LSTM 670, 4,050,748
parameters), client SGD 10^-0.5, FedAdam 10^-2. Rounds run as the run loop
runs them: the prefetcher gathers the next dispatch's rows from the pool
file on its thread. The global test set is small (10,000 generated
sentences, as Reddi et al.'s companion code validates on), evaluated once.

Reported: corpus generation time, pool file size, seconds per round (median
after a compile round), peak RSS (``VmHWM``, which counts the pool file's
mapped pages: they are page cache, reclaimable) after the rounds and after
the evaluation, anonymous memory (``RssAnon``, the largest seen after each
round), and the size the pool
would take on every device as float32 / int32 against this machine's
memory. There is no switch for the local loop padded to the largest client
(it was removed for the dynamic loop; ``benchmarks/padding.py`` measures it
against an older commit), so the padded figure is the share of local steps
a padded round would run empty, computed from the sizes, not measured.
Before the rounds the pool file is flushed and dropped from the page cache,
as a file an earlier run wrote would be, so the rounds read it from disk.
JSON last, saved to benchmarks/results/stackoverflow.json; the pool file is
deleted at the end unless ``--keep`` (kept, it is reused by the next run with
the same ``--dir``, ``--clients``, ``--sentences`` and ``--seed``).

    python benchmarks/stackoverflow.py [--rounds 3] [--dir DIR] [--keep]
    python benchmarks/stackoverflow.py --clients 2000 --sentences 800000 --rounds 1 --width 0.0625  # small mode
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENTS, SENTENCES = 342_477, 135_818_730
VOCAB, SEQ_LEN, LANGUAGE = 10_000, 20, 100_000
PAD, OOV, BOS, EOS = 0, VOCAB + 1, VOCAB + 2, VOCAB + 3
NUM_CLASSES = VOCAB + 4
MAX_SIZE, SIGMA, CAP = 10_000, 1.2, 256
TEST_SENTENCES = 10_000
CHUNK = 1 << 18


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def client_sizes(n: int, total: int, rng) -> "np.ndarray":  # noqa: F821 - numpy imported lazily
    """``n`` log-normal sizes (mean ``total / n``) in ``[1, MAX_SIZE]`` summing exactly to ``total``."""
    import numpy as np

    mean = total / n
    s = np.clip(np.round(rng.lognormal(np.log(mean) - SIGMA**2 / 2, SIGMA, n)), 1, MAX_SIZE).astype(np.int64)
    diff = total - int(s.sum())
    while diff:  # add (remove) the difference, in proportion to each client's room above 1 (below the cap)
        room = MAX_SIZE - s if diff > 0 else s - 1
        step = np.minimum(rng.multinomial(abs(diff), room / room.sum()), room)
        s += step if diff > 0 else -step
        diff = total - int(s.sum())
    return s


def word_table(rng_bits: int = 20) -> "np.ndarray":  # noqa: F821
    """``2^rng_bits`` token ids whose uniform choice follows Zipf(1.1) over the language,
    words past the vocabulary mapped to OOV."""
    import numpy as np

    p = 1.0 / np.arange(1, LANGUAGE + 1) ** 1.1
    cdf = np.cumsum(p / p.sum())
    rank = np.searchsorted(cdf, (np.arange(2**rng_bits) + 0.5) / 2**rng_bits) + 1
    return np.where(rank <= VOCAB, rank, OOV).astype(np.uint16)


def sentences(m: int, rng, table) -> tuple["np.ndarray", "np.ndarray"]:  # noqa: F821
    """``m`` rows ``(x [m, 20] uint16, y [m, 20] int16)`` as TFF's preprocessing lays them out."""
    import numpy as np

    words = np.minimum(1 + rng.binomial(24, 0.45, m), SEQ_LEN)
    seq = np.empty((m, SEQ_LEN + 1), np.uint16)
    seq[:, 0] = BOS
    seq[:, 1:] = table[rng.integers(0, len(table), (m, SEQ_LEN), dtype=np.uint32)]
    pos = np.arange(SEQ_LEN + 1)
    seq[pos[None, :] > words[:, None]] = PAD
    short = np.flatnonzero(words < SEQ_LEN)
    seq[short, words[short] + 1] = EOS
    y = seq[:, 1:].astype(np.int16)
    y[y == PAD] = -1
    return seq[:, :SEQ_LEN], y


def generate(directory: str, key: str, clients: int, total: int, seed: int) -> dict:
    """Write the corpus into pool file ``key`` under ``directory`` (reused when complete)."""
    import numpy as np

    from fedkd_jax.store import pool_file

    path = os.path.join(directory, key)
    found = pool_file.open_pool(path)
    if found is not None and found[1].get("clients") == clients and found[1].get("rows") == total:
        return {"corpus_s": None, "corpus": "reused", "path": path}
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    sizes = client_sizes(clients, total, rng)
    table = word_table()
    with pool_file.PoolWriter(directory, key, rows=total, x_shape=(SEQ_LEN,), x_dtype=np.uint16,
                              y_shape=(SEQ_LEN,), y_dtype=np.int16, field="--dir") as w:
        for start in range(0, total, CHUNK):
            x, y = sentences(min(CHUNK, total - start), rng, table)
            w.write(start, x, y)
        w.add("offsets", np.concatenate([[0], np.cumsum(sizes)]))
        tx, ty = sentences(TEST_SENTENCES, rng, table)
        w.add("test_x", tx)
        w.add("test_y", ty)
        w.finish({"task": "next_token", "num_classes": NUM_CLASSES, "clients": clients, "seed": seed,
                  "host_bytes": total * SEQ_LEN * 8})
    return {"corpus_s": time.perf_counter() - t0, "corpus": "generated", "path": path,
            "generate_peak_rss_mb": _status_mb("VmHWM")}


def drop_cache(path: str) -> float:
    """Flush the pool file and drop it from the page cache, as for a file an earlier run wrote
    (freshly written pages would otherwise be mapped in large blocks and counted in RSS); seconds."""
    t = time.perf_counter()
    for name in ("x.npy", "y.npy"):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return time.perf_counter() - t


def federated(path: str):
    """The pool file as a population: each client's first ``CAP`` sentences train."""
    import numpy as np

    import fedkd_jax as fk
    from fedkd_jax.store import pool_file

    a, _ = pool_file.open_pool(path)
    offsets = a["offsets"]
    counts = np.minimum(np.diff(offsets), CAP).astype(np.int32)
    train_offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    idx = np.int32 if offsets[-1] < 2**31 else np.int64
    shift = (offsets[:-1] - train_offsets[:-1]).astype(idx)
    rows = np.repeat(shift, counts) + np.arange(int(train_offsets[-1]), dtype=idx)
    n = len(counts)
    return fk.FederatedData(
        x=a["x"], y=a["y"], train_rows=rows, train_offsets=train_offsets,
        test_rows=np.zeros(0, np.int32), test_offsets=np.zeros(n + 1, np.int64),
        global_x=a["test_x"].astype(np.float32), global_y=a["test_y"].astype(np.int32), num_classes=NUM_CLASSES,
        name="stackoverflow-synthetic", task="next_token",
        special_tokens={"pad": PAD, "oov": OOV, "bos": BOS, "eos": EOS}, accuracy_ignore=(OOV, EOS))


def child(args) -> dict:
    import fedkd_jax as fk

    fk.configure_cpu_devices()
    fk.configure_compile_cache()
    import jax
    import numpy as np
    import optax

    from fedkd_jax.algorithms import server_optimizer
    from fedkd_jax.builders import auto_group_size
    from fedkd_jax.engine.cohort import key_bits
    from fedkd_jax.engine.pool import gather_rows
    from fedkd_jax.runner.evaluate import make_evaluate
    from fedkd_jax.runner.prefetch import Prefetcher

    t0 = time.perf_counter()
    fd = federated(args.child)
    model = fk.make_model("nwp_lstm", num_features=SEQ_LEN, num_classes=NUM_CLASSES, width=args.width)
    alg = fk.fedavg(model, optax.sgd(10**-0.5), server_optimizer("fedadam", lr=0.01, tau=1e-5, form="optax"),
                    batch_size=16, local_epochs=1)
    group = auto_group_size(-(-args.cohort // jax.device_count()))
    sim = fk.Simulator(alg, fd, cohort_size=args.cohort, group_size=group, pool="disk")
    pool = sim.put_data()
    state = sim.put_state(sim.init(0))
    setup = time.perf_counter() - t0
    pre = Prefetcher(sim, key_bits(state.key), pool)
    t = time.perf_counter()
    plan, _, rows = pre.take(0, 1, None, state.key)
    prepare_s = time.perf_counter() - t  # plan + gather, on this thread the first time; then on the prefetcher's
    if args.rounds > 1:
        pre.request(1, 1)
    t = time.perf_counter()
    state, m = sim.execute(state, rows, plan)
    first = time.perf_counter() - t
    times, losses, anon = [], [float(np.asarray(m["train_loss"])[0])], [_status_mb("RssAnon")]
    for r in range(1, args.rounds):
        t = time.perf_counter()
        plan, _, rows = pre.take(r, 1, None, state.key)
        if r + 1 < args.rounds:
            pre.request(r + 1, 1)
        state, m = sim.execute(state, rows, plan)
        times.append(time.perf_counter() - t)
        losses.append(float(np.asarray(m["train_loss"])[0]))
        anon.append(_status_mb("RssAnon"))
    pre.close()
    nxt = sim.plan(key_bits(state.key), args.rounds, 1)
    t = time.perf_counter()
    gather_rows(pool, nxt)  # what the prefetcher's thread does for each dispatch
    gather_again_s = time.perf_counter() - t
    peak_rounds = _status_mb("VmHWM")
    ev = {}
    if args.eval:
        t = time.perf_counter()
        ev = make_evaluate(sim, np.arange(1), pool=pool)(state)
        ev = {"eval_s": time.perf_counter() - t, "test_accuracy": ev.get("test_accuracy"),
              "test_loss": ev.get("test_loss")}
    steps = np.ceil(fd.counts / 16)
    return {"setup_s": setup, "first_round_s": first, "round_s": times,
            "s_per_round": float(np.median(times)) if times else None, "train_loss": losses,
            "prepare_first_s": prepare_s, "gather_s": gather_again_s, "train_rows": int(fd.counts.sum()),
            "params": model.num_params, "devices": jax.device_count(), "group_size": group,
            "backend": jax.default_backend(), "jax": jax.__version__, **ev,
            "padding_waste_avoided": float(1 - steps.mean() / steps.max()),
            "peak_rss_rounds_mb": peak_rounds, "peak_rss_mb": _status_mb("VmHWM"), "rss_anon_max_mb": max(anon),
            "rss_file_mb": _status_mb("RssFile"), "rss_anon_mb": _status_mb("RssAnon")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--sentences", type=int, default=SENTENCES)
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds to run; those after the compile round are timed (0: write the corpus only)")
    ap.add_argument("--cohort", type=int, default=50)
    ap.add_argument("--width", type=float, default=1.0, help="nwp_lstm width multiplier (1: Reddi et al.'s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="where the pool file goes (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the pool file (reused by the next run)")
    ap.add_argument("--no-eval", dest="eval", action="store_false", help="skip the evaluation")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "stackoverflow.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if not 1 <= args.clients <= args.sentences:
        ap.error("need 1 <= --clients <= --sentences")
    import numpy as np

    from fedkd_jax.store.base import physical_memory_bytes

    directory = args.dir or tempfile.mkdtemp(prefix="fedkd-stackoverflow-")
    os.makedirs(directory, exist_ok=True)
    key = f"stackoverflow-synthetic-{args.clients}-{args.sentences}-seed{args.seed}"
    need = args.sentences * SEQ_LEN * 4  # uint16 x + int16 y
    have = shutil.disk_usage(directory).free
    if not os.path.isdir(os.path.join(directory, key)) and have < need * 1.1:
        sys.exit(f"--dir {directory!r}: {have / 1e9:.1f} GB free, the pool file needs {need / 1e9:.1f} GB")
    load = [os.getloadavg()[0]]  # another busy process on the machine shows here
    gen = generate(directory, key, args.clients, args.sentences, args.seed)
    from fedkd_jax.store.pool_file import pool_bytes

    sizes = np.diff(np.load(os.path.join(gen["path"], "offsets.npy")))
    gen["flush_s"] = drop_cache(gen["path"])
    cmd = [sys.executable, os.path.abspath(__file__), "--child", gen["path"], "--rounds", str(args.rounds),
           "--cohort", str(args.cohort), "--width", str(args.width)] + ([] if args.eval else ["--no-eval"])
    res = {}
    if args.rounds > 0:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=4 * 3600)
        res = (json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else
               {"error": (p.stderr.strip().splitlines() or [str(p.returncode)])[-1]})
    load.append(os.getloadavg()[0])
    from fedkd_jax.engine.pool import choose_pool

    device_pool = args.sentences * SEQ_LEN * (4 + 4)  # float32 x + int32 y, what data.pool=device places
    devices = res.get("devices", 1)
    on_cpu = res.get("backend", "cpu") == "cpu"
    memory = physical_memory_bytes()
    summary = {
        "benchmark": "stackoverflow", "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average_1min": {"start": load[0], "end": load[1]},
        "data": "SYNTHETIC corpus of the real size (the real TFF Stack Overflow files are absent): log-normal "
                "client sizes, Zipf(1.1) words; small global test set of 10,000 generated sentences",
        "clients": args.clients, "sentences": args.sentences, "seq_len": SEQ_LEN, "vocab": VOCAB,
        "num_classes": NUM_CLASSES, "sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                                              "mean": float(sizes.mean()), "p99": float(np.percentile(sizes, 99)),
                                              "max": int(sizes.max()), "sum": int(sizes.sum())},
        "setting": {"cohort": args.cohort, "batch": 16, "local_epochs": 1, "max_sentences_per_client": CAP,
                    "model": "nwp_lstm", "width": args.width, "client_lr": 10**-0.5, "server": "fedadam 1e-2"},
        "corpus": gen["corpus"], "corpus_s": gen["corpus_s"], "generate_peak_rss_mb": gen.get("generate_peak_rss_mb"),
        "flush_and_drop_cache_s": gen["flush_s"],
        "gb": "10^9 bytes", "pool_file_gb": pool_bytes(gen["path"]) / 1e9,
        "pool_dtypes": {"x": "uint16", "y": "int16"},
        "device_pool_gb": device_pool / 1e9, "machine_memory_gb": memory / 1e9,
        # data.pool=device keeps the float32 / int32 rows on the host and a replica on every device
        # (on a CPU backend the devices are this machine's memory)
        "device_pool_total_gb": device_pool * (1 + devices * on_cpu) / 1e9,
        "device_pool_fits_memory": device_pool * (1 + devices * on_cpu) <= memory,
        "auto_pool": choose_pool("auto", pool_bytes=device_pool, num_devices=devices, budget_gb=None),
        "padded_local_loop": "no switch in this code (removed for the dynamic loop); padding_waste_avoided is "
                             "the share of steps a padded round would run empty, computed from the sizes",
        **res,
    }
    if not args.keep:
        shutil.rmtree(gen["path"], ignore_errors=True)
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    summary["pool_file_kept"] = args.keep
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
