"""Privacy experiments: utility and leakage against epsilon, secure-aggregation and HE costs.

1. Accuracy against epsilon (1, 2, 4, 8, inf) for FedAvg and FedKD on a
   population of 10,000 clients (20 digits rows each, resampled), 100 per
   round, 100 rounds, delta = 1e-5, Poisson sampling (rate C/N, DP's
   default; add-or-remove-one epsilon). The noise multiplier for each
   epsilon is calibrated with
   dp-accounting; clip norm 1 (FedKD: the student's upload).
2. Membership-inference AUC of each run's shared model (and, for FedKD, a
   private teacher) against epsilon (``fedkd audit``'s attacks), and a
   leakage study where there is something to leak: FedAvg on MNIST-5k, 50
   clients of 80 rows, 10 per round, 20 local epochs, MLP 784-512-10, 100
   rounds (the model overfits its members), at the same epsilons.
3. Secure aggregation: seconds per round against cohort size and dropout
   rate, beside the same clipped round without it, and bytes per client.
4. Homomorphic (CKKS) aggregation: seconds per round and bytes per client
   against plaintext, and the largest error of the decrypted sum.

    python experiments/privacy.py [--seeds 0,1] [--quick] [--only dp,leakage,secagg,he]
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HERE, ROOT, parse_args, run_grid, seeds_of  # noqa: E402

EPSILONS = ("1", "2", "4", "8", "inf")
PARTS = ("dp", "leakage", "secagg", "he")


def leakage_cells(args, rounds):
    for eps in EPSILONS:
        for seed in seeds_of(args)[:1]:
            extra = [] if eps == "inf" else [f"privacy.target_epsilon={eps}", "privacy.clip_norm=1.0",
                                             "privacy.delta=1e-3"]
            yield ({"epsilon": eps, "seed": seed}, [
                "algorithm=fedavg", "data.dataset=mnist5k", "data.partition=iid", "data.num_clients=50",
                "data.test_fraction=0.0", "client.local_epochs=20", "model.hidden=[512]", "run.cohort_size=10",
                f"run.rounds={rounds}", f"run.eval_every={rounds}", f"run.seed={seed}", *extra])


def audit_rows(rows, runs, keys, quick):
    from fedkd_jax.audit import audit_run
    from fedkd_jax.runner.resume import saved_config

    for row in rows:
        cell = "-".join(f"{k}={row[k]}" for k in keys)
        row["noise_multiplier"] = saved_config(os.path.join(runs, cell)).privacy.noise_multiplier
        rep = audit_run(os.path.join(runs, cell), shadows=2 if quick else 4, members=200 if quick else 500)
        for name, r in rep.results.items():
            key = "student" if name == "shared model" else "teacher"
            row[f"{key}_loss_auc"] = r["loss_auc"]
            row[f"{key}_calibrated_auc"] = r["calibrated_auc"]
            row[f"{key}_calibrated_tpr_at_1pct_fpr"] = r["calibrated_tpr_at_1pct_fpr"]


def write_csv(path, rows):
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            try:
                r[k] = None if v == "" else float(v) if k not in ("algorithm", "epsilon") else v
            except ValueError:
                pass
    return rows


def dp_cells(args, clients, cohort, rounds):
    for alg in ("fedavg", "fedkd"):
        for eps in EPSILONS:
            for seed in seeds_of(args):
                extra = [] if eps == "inf" else [f"privacy.target_epsilon={eps}", "privacy.clip_norm=1.0",
                                                 "privacy.delta=1e-5"]
                yield ({"algorithm": alg, "epsilon": eps, "seed": seed}, [
                    f"algorithm={alg}", "data.dataset=digits", "data.partition=iid", f"data.num_clients={clients}",
                    "data.examples_per_client=20", "data.test_fraction=0.0", "client.weighting=uniform",
                    f"run.cohort_size={cohort}", f"run.rounds={rounds}", f"run.eval_every={rounds}",
                    f"run.seed={seed}", "run.client_store=host", *extra])


def secagg_costs(quick: bool) -> list[dict]:
    import fedkd_jax as fk
    import jax
    import optax

    from fedkd_jax.aggregation import chain, mean
    from fedkd_jax.privacy import gaussian, secure_aggregation

    fd = fk.federate(fk.data.load_digits(), partition="iid", num_clients=200, seed=0, examples_per_client=20,
                     test_fraction=0.0)
    model = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(64,))
    alg = fk.fedavg(model, optax.sgd(0.05), optax.sgd(1.0), batch_size=10)
    out = []
    for cohort in ((10,) if quick else (10, 20, 50)):
        for dropout in ((0.0,) if quick else (0.0, 0.1, 0.3)):
            clip = gaussian(0.0, 1.0, expected_clients=cohort)
            row = {"cohort": cohort, "dropout": dropout}
            for name, agg in (("plain", chain(clip, mean("uniform"))),
                              ("secagg", chain(clip, mean("uniform"), secure_aggregation(
                                  bits=32, frac_bits=16, num_clients=fd.num_clients, dropout_rate=dropout)))):
                sim = fk.Simulator(alg, fd, cohort_size=cohort, aggregator=agg)
                pool = sim.put_data()
                state, m = sim.run(sim.init(0), pool, 20)  # compile (the round count is static)
                jax.block_until_ready(state)
                t = time.perf_counter()
                state, m = sim.run(state, pool, 20)
                jax.block_until_ready(state)
                row[f"{name}_s_per_round"] = (time.perf_counter() - t) / 20
                row[f"{name}_bytes_per_client"] = int(np.asarray(m["bytes_up_clients"]).max())
                if name == "secagg":
                    row["dropped_per_round"] = float(np.mean(np.asarray(m["secagg_dropped"])))
            row["overhead"] = row["secagg_s_per_round"] / row["plain_s_per_round"]
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def he_costs(quick: bool) -> list[dict]:
    import fedkd_jax as fk
    import optax

    from fedkd_jax.privacy import he

    if not he.available():
        return [{"note": "TenSEAL not installed (pip install 'fedkd_jax[he]')"}]
    fd = fk.federate(fk.data.load_digits(), partition="dirichlet", num_clients=50, seed=0, alpha=0.5)
    model = fk.make_model("mlp", num_features=64, num_classes=10, hidden=(64,))
    alg = fk.fedavg(model, optax.sgd(0.05), optax.sgd(1.0), batch_size=10)
    sim = fk.Simulator(alg, fd, cohort_size=10)
    pool = sim.put_data()
    rounds = 3 if quick else 20
    ev = fk.engine.make_evaluator(model.apply)
    plain, plog = he.run_rounds(sim, sim.init(0), pool, rounds)
    enc, elog = he.run_rounds(sim, sim.init(0), pool, rounds, ckks=he.CKKS())
    acc_p = float(ev(alg.model_params(plain.server), sim.eval_data())["test_accuracy"])
    acc_e = float(ev(alg.model_params(enc.server), sim.eval_data())["test_accuracy"])
    d = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(alg.model_params(plain.server)))
    row = {"rounds": rounds, "params": d, "plain_s_per_round": float(np.median([r.seconds for r in plog])),
           "he_s_per_round": float(np.median([r.seconds for r in elog])),
           "he_encrypt_s_per_round": float(np.median([r.encrypt_seconds for r in elog])),
           "plain_bytes_per_client": 4 * d, "he_bytes_per_client": elog[-1].bytes_up_per_client,
           "max_abs_error": max(r.max_abs_error for r in elog), "plain_accuracy": acc_p, "he_accuracy": acc_e}
    row["time_overhead"] = row["he_s_per_round"] / row["plain_s_per_round"]
    print(json.dumps(row), flush=True)
    return [row]


def main(argv=None):
    args = parse_args(__doc__, argv, only=PARTS)
    parts = args.only
    out = args.results or os.path.join(HERE, "results", "privacy")
    runs = args.runs or os.path.join(ROOT, "runs", "experiments", "privacy")
    os.makedirs(out, exist_ok=True)
    clients, cohort, rounds = (2000, 20, 5) if args.quick else (10_000, 100, 100)

    def extract(hist):
        return {"epsilon_reached": hist[-1].get("epsilon"), "rounds_run": hist[-1]["round"]}

    if "dp" in parts:
        rows = run_grid("privacy", dp_cells(args, clients, cohort, rounds), results_dir=out, runs_dir=runs,
                        extract=extract)
        audit_rows(rows, runs, ("algorithm", "epsilon", "seed"), args.quick)
        write_csv(os.path.join(out, "results.csv"), rows)
    if "leakage" in parts:
        leak_runs = os.path.join(runs, "leakage")
        import tempfile

        leak = run_grid("privacy-leakage", leakage_cells(args, 5 if args.quick else 100),
                        results_dir=tempfile.mkdtemp(prefix="fedkd-leakage-"), runs_dir=leak_runs, extract=extract)
        audit_rows(leak, leak_runs, ("epsilon", "seed"), args.quick)
        write_csv(os.path.join(out, "leakage.csv"), leak)
    costs_path = os.path.join(out, "costs.json")
    costs = json.load(open(costs_path)) if os.path.exists(costs_path) else {"secagg": [], "he": []}
    if "secagg" in parts:
        costs["secagg"] = secagg_costs(args.quick)
    if "he" in parts:
        costs["he"] = he_costs(args.quick)
    with open(costs_path, "w") as f:
        json.dump(costs, f, indent=2)
    rows = read_csv(os.path.join(out, "results.csv"))
    leak = read_csv(os.path.join(out, "leakage.csv"))
    write_summary(out, rows, leak, costs["secagg"], costs["he"], clients, cohort, rounds)
    plot(out, rows, leak)


def _agg(rows, alg, eps, key):
    v = [r[key] for r in rows if r["algorithm"] == alg and str(r["epsilon"]) == eps and r.get(key) is not None]
    return (float(np.mean(v)), float(np.std(v))) if v else (None, None)


def _f(m, d=3):
    return "–" if m[0] is None else f"{m[0]:.{d}f} ± {m[1]:.{d}f}"


def write_summary(out, rows, leak, sa, hc, clients, cohort, rounds):
    lines = ["# Privacy experiments", "",
             f"{clients:,} clients (20 digits rows each), {cohort} per round expected (Poisson sampling, DP's default), "
             f"{rounds} rounds, clip norm 1, delta 1e-5; epsilon is add-or-remove-one (RDP accountant); the noise "
             "multiplier is calibrated to "
             "reach each epsilon at the last round. Mean ± std over seeds.", "",
             "| algorithm | epsilon | student accuracy | student MIA AUC (loss / calibrated) | teacher MIA AUC (calibrated) |",
             "|---|---|---|---|---|"]
    for alg in ("fedavg", "fedkd"):
        for eps in EPSILONS:
            acc = _agg(rows, alg, eps, "student_accuracy")
            la, ca = _agg(rows, alg, eps, "student_loss_auc"), _agg(rows, alg, eps, "student_calibrated_auc")
            ta = _agg(rows, alg, eps, "teacher_calibrated_auc")
            lines.append(f"| {alg} | {eps} | {_f(acc)} | {_f(la)} / {_f(ca)} | {_f(ta)} |")
    lines += ["", "## Leakage where there is something to leak", "",
              "FedAvg on MNIST-5k, 50 clients of 80 rows (iid, disjoint), 10 per round, 20 local epochs, MLP 784-512-10, "
              "100 rounds, clip norm 1, delta 1e-3 (Poisson sampling, add-or-remove-one): the model overfits its members. 500 member rows "
              "(training rows of clients sampled at least once) against 500 global test rows (the clients hold no "
              "held-out rows here); calibrated = offline LiRA with 4 shadow models and one global variance "
              "(Carlini et al. 2022).", "",
              "| epsilon | noise multiplier | test accuracy | loss-attack AUC | calibrated AUC | TPR at 1% FPR |",
              "|---|---|---|---|---|---|"]
    for r in leak:
        z = r.get("noise_multiplier")
        lines.append(f"| {r['epsilon']} | {'–' if z in (None, '') else f'{float(z):.2f}'} | "
                     f"{float(r['student_accuracy']):.3f} | {float(r['student_loss_auc']):.3f} | "
                     f"{float(r['student_calibrated_auc']):.3f} | {float(r['student_calibrated_tpr_at_1pct_fpr']):.3f} |")
    lines += ["", "## Secure aggregation cost", "", "FedAvg, digits MLP 64-64-10 (4,810 parameters), clip norm 1, "
              "32-bit ring, 16 fractional bits.", "",
              "| cohort | dropout | plain s/round | secagg s/round | overhead | bytes/client plain → secagg | dropped/round |",
              "|---|---|---|---|---|---|---|"]
    for r in sa:
        lines.append(f"| {r['cohort']} | {r['dropout']} | {r['plain_s_per_round']:.4f} | {r['secagg_s_per_round']:.4f} | "
                     f"{r['overhead']:.1f}x | {r['plain_bytes_per_client']:,} → {r['secagg_bytes_per_client']:,} | "
                     f"{r.get('dropped_per_round', 0):.1f} |")
    lines += ["", "## Homomorphic (CKKS) aggregation cost", ""]
    for r in hc:
        if "note" in r:
            lines.append(r["note"])
            continue
        lines += ["| | plaintext | CKKS |", "|---|---|---|",
                  f"| seconds per round | {r['plain_s_per_round']:.3f} | {r['he_s_per_round']:.3f} "
                  f"({r['time_overhead']:.1f}x; encryption {r['he_encrypt_s_per_round']:.3f}) |",
                  f"| bytes per client | {r['plain_bytes_per_client']:,} | {r['he_bytes_per_client']:,} |",
                  f"| test accuracy after {r['rounds']} rounds | {r['plain_accuracy']:.4f} | {r['he_accuracy']:.4f} |",
                  f"| largest error of the decrypted sum | – | {r['max_abs_error']:.2e} |"]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(out, rows, leak):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows and not leak:  # e.g. --only secagg,he before any dp or leakage run: nothing to plot
        print(f"no dp or leakage results in {out} yet: privacy_vs_epsilon.png not drawn")
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = list(range(len(EPSILONS)))
    for alg in ("fedavg", "fedkd"):
        acc = [_agg(rows, alg, e, "student_accuracy") for e in EPSILONS]
        auc = [_agg(rows, alg, e, "student_calibrated_auc") for e in EPSILONS]
        _errorbar(a1, xs, acc, label=alg)
        _errorbar(a2, xs, auc, label=f"{alg} student")
    if leak:
        by = {str(r["epsilon"]): float(r["student_calibrated_auc"]) for r in leak}
        a2.plot(xs, [by.get(e) for e in EPSILONS], marker="s", label="fedavg, overfit (MNIST-5k, 50 clients)")
    for ax, yl in ((a1, "test accuracy"), (a2, "membership-inference AUC (calibrated)")):
        ax.set_xticks(xs, EPSILONS)
        ax.set_xlabel("epsilon (delta 1e-5)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    a2.axhline(0.5, color="gray", lw=0.8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "privacy_vs_epsilon.png"), dpi=120)
    plt.close(fig)


def _errorbar(ax, xs, aggs, *, label):
    """Mean ± std at the epsilons that have runs (a cell without runs is left out, not None)."""
    pts = [(x, m, s) for x, (m, s) in zip(xs, aggs) if m is not None]
    if pts:
        x, m, s = zip(*pts)
        ax.errorbar(x, m, yerr=s, marker="o", capsize=3, label=label)


if __name__ == "__main__":
    main()
