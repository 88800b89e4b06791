"""The run loop: rounds in compiled chunks, evaluation, logs, checkpoints, resume, plot.

A run directory holds ``config.json`` (the resolved config), the logs and
``checkpoints/``. Running into a directory that already holds a run resumes
it from its newest verified checkpoint, provided the settings that change
results are the same (see :mod:`fedkd_jax.run.resume`). Every random choice
derives from (seed, round, client) and the chunk boundaries are fixed multiples
of the cadences, so a resumed run reproduces the uninterrupted one bit for bit
on the same machine and device count.

SIGTERM or SIGINT stops the run after the current chunk of rounds; the
loop then writes a checkpoint, waits for it and returns ``interrupted=True``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from fedkd_jax import distributed
from fedkd_jax.builders import build_algorithm, build_data, build_model, build_simulator
from fedkd_jax.config import Config, resolve_defaults, to_dict, to_yaml, validate
from fedkd_jax.engine import (
    Simulator,
    eval_clients,
    fetch,
    make_evaluator,
    make_personal_evaluator,
    summarize_clients,
)
from fedkd_jax.engine.cohort import key_bits
from fedkd_jax.errors import CheckpointError, ConfigError
from fedkd_jax.paths import check_writable_dir
from fedkd_jax.run.checkpoint import Checkpointer
from fedkd_jax.run.prefetch import Prefetcher
from fedkd_jax.run.client_store import IntegrityError
from fedkd_jax.run.outputs import MetricsLog, plot_accuracy
from fedkd_jax.run.resume import check_compatible, complete_rows, saved_config


@dataclass
class RunResult:
    run_dir: str
    rounds: int
    final: dict[str, Any]
    seconds: float
    first_dispatch_seconds: float
    resumed_from: int | None = None
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)


_NOT_LOGGED = ("weight_sum", "bytes_up_clients", "bytes_down_client", "clients_contributing")


def _next_boundary(r: int, every: int) -> int:
    return (r // every + 1) * every


def _privacy(cfg: Config, num_clients: int):
    """Resolve DP settings that need the population (delta, calibrated noise); the accountant."""
    from fedkd_jax.builders import privacy_delta
    from fedkd_jax.config import dp_enabled
    from fedkd_jax.privacy import Accountant, Mechanism, calibrate

    if not dp_enabled(cfg):
        return cfg, None
    p = cfg.privacy
    delta = privacy_delta(cfg, num_clients)
    z = p.noise_multiplier
    if z is None:
        z = calibrate(p.target_epsilon, delta, rounds=cfg.run.rounds, cohort_size=cfg.run.cohort_size,
                      num_clients=num_clients, sampling=p.sampling, accountant=p.accountant)
    cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(p, noise_multiplier=float(z), delta=float(delta)))
    return cfg, Accountant(Mechanism(float(z), num_clients, cfg.run.cohort_size, p.sampling), delta, kind=p.accountant)


def _evaluator(sim: Simulator, ev_ids: np.ndarray):
    """``(state) -> dict`` of global metrics, per-client accuracy summary and,
    for algorithms with personal models (FedKD teachers), their accuracy summary,
    on the clients ``ev_ids`` (all of them, or a fixed sample of a large population)."""
    algorithm = sim.algorithm
    ev_data = sim.eval_data(ev_ids)
    global_eval = make_evaluator(algorithm.model.apply)
    personal_eval = None
    if algorithm.personal_model is not None:
        personal_eval = make_personal_evaluator(algorithm.personal_model.apply)

    def evaluate(state) -> dict[str, Any]:
        ev = {k: fetch(v) for k, v in global_eval(algorithm.model_params(state.server), ev_data).items()}
        out = {k: float(v) for k, v in ev.items() if np.ndim(v) == 0}
        out.update(summarize_clients(ev["client_accuracy"]))
        if personal_eval is not None:
            params = algorithm.personal_params(sim.client_states(state.key, ev_ids))
            out.update(summarize_clients(fetch(personal_eval(params, ev_data)), prefix="teacher_acc"))
        return out

    return evaluate


class _StopFlag:
    """Turns SIGTERM / SIGINT into a flag checked between chunks (main thread only)."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C really stops
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def run_experiment(cfg: Config, out_dir: str, *, progress: bool | None = None) -> RunResult:
    """Run ``cfg`` into ``out_dir``, or resume the run already there.

    Everything that can be wrong with the input (config, data, an incompatible
    existing run) raises before anything is compiled and before ``out_dir``
    is touched.
    """
    validate(cfg)
    check_writable_dir("--out", out_dir)
    cfg = resolve_defaults(cfg)
    previous = saved_config(out_dir)
    if cfg.compression.schedule_rounds is None:
        # The SVD energy schedule's horizon is fixed when a run starts, so
        # extending run.rounds later does not rewrite the schedule already used.
        horizon = previous.compression.schedule_rounds if previous is not None else None
        cfg = dataclasses.replace(cfg, compression=dataclasses.replace(
            cfg.compression, schedule_rounds=horizon or cfg.run.rounds))
    p = cfg.privacy
    if previous is not None:
        # the noise calibrated and the delta chosen when the run started stay the run's
        if p.target_epsilon is not None and p.noise_multiplier is None:
            p = dataclasses.replace(p, noise_multiplier=previous.privacy.noise_multiplier)
        if p.delta is None:
            p = dataclasses.replace(p, delta=previous.privacy.delta)
        cfg = dataclasses.replace(cfg, privacy=p)
    if previous is not None:
        check_compatible(previous, cfg, out_dir)
    elif any(os.path.exists(os.path.join(out_dir, f)) for f in ("metrics.jsonl", "checkpoints")):
        raise ConfigError("--out", f"{out_dir!r} holds a run's files but no config.json, so it cannot be resumed; "
                                   "choose another --out so its files are kept")
    r = cfg.run
    data = build_data(cfg)
    cfg, accountant = _privacy(cfg, data.num_clients)
    model = build_model(cfg, data)
    algorithm = build_algorithm(cfg, model, data)
    sim = build_simulator(cfg, data, algorithm, out_dir=out_dir)
    evaluate = _evaluator(sim, eval_clients(data.num_clients, r.eval_clients, r.seed))

    pool = sim.put_data()
    state = sim.put_state(sim.init(r.seed))
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=r.keep_checkpoints, store=sim.store)
    resumed_from = None
    restored = None
    if previous is not None:
        try:
            restored = ckpt.restore_latest(state)
        except IntegrityError as e:
            ckpt.close()
            raise CheckpointError("--out", str(e)) from None
        except Exception as e:  # noqa: BLE001 - e.g. a state structure that no longer matches the code
            ckpt.close()
            raise CheckpointError("--out", f"could not restore the checkpoints in {out_dir!r} "
                                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); nothing was changed") from None
    if restored is not None:
        state, resumed_from = restored
    else:
        ckpt.start_fresh()

    primary = distributed.is_primary()
    kept_rows = complete_rows(out_dir, resumed_from or 0)
    distributed.barrier("fedkd-read-run-dir")  # every process has read the run dir before process 0 writes
    if primary:
        os.makedirs(out_dir, exist_ok=True)
        for name, text in (("config.yaml", to_yaml(cfg)), ("config.json", json.dumps(to_dict(cfg), indent=2))):
            with open(os.path.join(out_dir, name + ".tmp"), "w") as f:
                f.write(text)
            os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    log = MetricsLog(out_dir, writable=primary)
    log.reset(kept_rows)
    done = resumed_from or 0
    last = log.rows[-1] if log.rows else {}
    cum_up, cum_down = int(last.get("cum_bytes_up", 0)), int(last.get("cum_bytes_down", 0))
    wall0 = float(last.get("wall_time", 0.0))
    last_eval = {k: v for k, v in last.items() if k.startswith(("test_", "client_acc", "teacher_acc"))}

    _, bytes_down = sim.round_bytes()
    show = r.progress if progress is None else progress
    bar = tqdm(total=r.rounds, initial=min(done, r.rounds), unit="round", disable=not (show and primary), dynamic_ncols=True,
               desc=f"{cfg.algorithm}/{cfg.data.dataset}")
    t_start = time.perf_counter()
    first_dispatch = None
    interrupted = False
    prefetch = Prefetcher(sim, key_bits(state.key))

    limit, budget_note = r.rounds, None
    if accountant is not None and cfg.privacy.target_epsilon is not None:
        within = accountant.rounds_within(cfg.privacy.target_epsilon, r.rounds)
        if within < r.rounds:
            limit = within
            budget_note = (f"privacy budget: stopped after round {within}, epsilon "
                           f"{accountant.epsilon_at(within):.3f} <= target {cfg.privacy.target_epsilon:g} at delta "
                           f"{accountant.delta:g} ({accountant.relation}); round {within + 1} would exceed it")

    def chunk(at: int) -> int:
        # Chunk boundaries are absolute multiples of every cadence, so a
        # resumed run dispatches exactly the chunks the original would.
        return min(_next_boundary(at, r.rounds_per_dispatch), _next_boundary(at, r.eval_every),
                   _next_boundary(at, r.checkpoint_every), limit) - at

    written = None  # the union whose states the previous dispatch wrote back
    try:
        with _StopFlag() as stop:
            while done < limit:
                n = chunk(done)
                t0 = time.perf_counter()
                plan, gathered = prefetch.take(done, n, written, state.key)
                if done + n < r.rounds:
                    prefetch.request(done + n, chunk(done + n))
                state, m = sim.execute(state, pool, plan, gathered)
                written = plan.union
                m = {k: fetch(v) for k, v in m.items()}
                dt = time.perf_counter() - t0
                first_dispatch = dt if first_dispatch is None else first_dispatch
                rows = []
                for i in range(n):
                    row = {"round": done + i + 1}
                    row.update({k: float(v[i]) for k, v in m.items() if k not in _NOT_LOGGED})
                    row["clients_contributing"] = int(m["clients_contributing"][i])
                    row["round_time"] = dt / n
                    row["bytes_up"] = int(np.asarray(m["bytes_up_clients"][i], np.int64).sum())
                    if "bytes_down_client" in m:  # downlink compression: the payload each cohort client receives
                        row["bytes_down"] = r.cohort_size * int(m["bytes_down_client"][i])
                    else:
                        row["bytes_down"] = bytes_down
                    cum_up += row["bytes_up"]
                    cum_down += row["bytes_down"]
                    row["cum_bytes_up"], row["cum_bytes_down"] = cum_up, cum_down
                    if accountant is not None:
                        row["epsilon"] = accountant.epsilon_at(row["round"])
                    rows.append(row)
                done += n
                if done % r.eval_every == 0 or done == limit:
                    last_eval = evaluate(state)
                    rows[-1].update(last_eval)
                wall = wall0 + time.perf_counter() - t_start
                for row in rows:
                    row["wall_time"] = wall
                log.write(rows)  # rows reach disk before the checkpoint that covers them
                stopping = distributed.agree(stop.signal is not None)
                if done % r.checkpoint_every == 0 or done == limit or stopping:
                    ckpt.save(done, state)
                bar.update(n)
                post = {"loss": f"{rows[-1].get('train_loss', float('nan')):.3f}"}
                if "test_accuracy" in last_eval:
                    post["acc"] = f"{last_eval['test_accuracy']:.3f}"
                if "teacher_acc_mean" in last_eval:
                    post["teacher"] = f"{last_eval['teacher_acc_mean']:.3f}"
                bar.set_postfix(post)
                if stopping:
                    interrupted = True
                    break
    finally:
        bar.close()
        prefetch.close()
        ckpt.close()
        if sim.store is not None:
            sim.store.close()
    if not interrupted and primary:
        plot_accuracy(log.rows, os.path.join(out_dir, "accuracy.png"), title=f"{cfg.algorithm} on {cfg.data.dataset}")
    final = dict(last_eval)
    if log.rows:
        final.update({k: log.rows[-1].get(k) for k in ("train_loss", "cum_bytes_up", "cum_bytes_down")})
    notes = list(ckpt.events) + ([budget_note] if budget_note and done >= limit else [])
    if accountant is not None:
        final["epsilon"] = accountant.epsilon_at(done)
        final["delta"] = accountant.delta
        final["epsilon_relation"] = accountant.relation
    return RunResult(out_dir, done, final, time.perf_counter() - t_start, first_dispatch or 0.0,
                     resumed_from=resumed_from, interrupted=interrupted, notes=notes)
