"""One run's life around its dispatches: build, restore, log, evaluate, checkpoint, finish.

The run loop (:mod:`fedkd_jax.runner.loop`) and the batched sweep loop
(:mod:`fedkd_jax.sweeps.loop`) both drive :class:`RunContext` objects: after
each dispatch the loop hands the context the dispatch's metrics, and the
context's callbacks turn them into rows (``metrics.jsonl``/``.csv``,
TensorBoard), evaluations, checkpoints and progress. The loops themselves
only decide what to dispatch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from fedkd_jax import distributed
from fedkd_jax.config import Config, to_dict, to_yaml
from fedkd_jax.engine import Simulator, eval_clients
from fedkd_jax.errors import CheckpointError
from fedkd_jax.plan import privacy_setup  # noqa: F401 - re-exported (resolved in the plan)
from fedkd_jax.runner.checkpoint import Checkpointer
from fedkd_jax.runner.client_store import IntegrityError
from fedkd_jax.runner.downlink import RunDownlink
from fedkd_jax.runner.evaluate import make_evaluate  # noqa: F401 - re-exported
from fedkd_jax.runner.outputs import MetricsLog, plot_accuracy
from fedkd_jax.runner.resume import complete_rows

NOT_LOGGED = ("weight_sum", "bytes_up_clients", "bytes_down_client", "clients_contributing")


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
    state: Any = None  # the final simulation state (host arrays)
    rows: list[dict[str, Any]] = field(default_factory=list)
    # this process's wall time split: dispatches (rounds), evaluation, checkpoints (time the run
    # waited on saves, including the final wait for queued writes), total
    timing: dict[str, float] = field(default_factory=dict)


def next_boundary(r: int, every: int) -> int:
    return (r // every + 1) * every


class TensorBoardLog:
    """Per-round scalars to TensorBoard (``run.log_to=tensorboard``), via tensorboardX."""

    def __init__(self, run_dir: str):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            for k, v in row.items():
                if k != "round" and isinstance(v, (int, float)) and v is not None and np.isfinite(v):
                    self.writer.add_scalar(k, v, row["round"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RunContext:
    """Everything one run keeps between dispatches (see the module docstring)."""

    def __init__(self, cfg: Config, out_dir: str, sim: Simulator, accountant, *, resuming: bool,
                 progress_desc: str = ""):
        self.cfg, self.out_dir, self.sim, self.accountant = cfg, out_dir, sim, accountant
        r = cfg.run
        self.pool = sim.put_data()
        self.evaluate = make_evaluate(sim, eval_clients(sim.num_clients, r.eval_clients, r.seed), pool=self.pool,
                                      personal_clients=r.eval_personal_clients, seed=r.seed,
                                      group_names=[g.name or f"g{i}" for i, g in enumerate(cfg.model.groups)])
        state = sim.put_state(sim.init(r.seed))
        self.ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=r.keep_checkpoints, store=sim.store)
        self.resumed_from = None
        restored = None
        if resuming:
            try:
                restored = self.ckpt.restore_latest(state)
            except IntegrityError as e:
                self.ckpt.close()
                raise CheckpointError("--out", str(e)) from None
            except Exception as e:  # noqa: BLE001 - e.g. a state structure that no longer matches the code
                self.ckpt.close()
                raise CheckpointError("--out", f"could not restore the checkpoints in {out_dir!r} "
                                               f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                               "nothing was changed") from None
        if restored is not None:
            state, self.resumed_from = restored
        else:
            self.ckpt.start_fresh()
        self.state = state
        self.primary = distributed.is_primary()
        kept = complete_rows(out_dir, self.resumed_from or 0)
        distributed.barrier("fedkd-read-run-dir")  # every process has read the run dir before process 0 writes
        if self.primary:
            os.makedirs(out_dir, exist_ok=True)
            for name, text in (("config.yaml", to_yaml(cfg)), ("config.json", json.dumps(to_dict(cfg), indent=2))):
                with open(os.path.join(out_dir, name + ".tmp"), "w") as f:
                    f.write(text)
                os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
        self.log = MetricsLog(out_dir, writable=self.primary)
        self.log.reset(kept)
        self.callbacks = [self.log]
        if r.log_to == "tensorboard" and self.primary:
            self.tb = TensorBoardLog(out_dir)
            self.callbacks.append(self.tb)
        else:
            self.tb = None
        self.done = self.resumed_from or 0
        last = self.log.rows[-1] if self.log.rows else {}
        self.cum_up, self.cum_down = int(last.get("cum_bytes_up", 0)), int(last.get("cum_bytes_down", 0))
        self._restore_clocks(last)
        self.last_eval = {k: v for k, v in last.items() if k.startswith(("test_", "client_acc", "teacher_acc"))}
        self.bytes_down = sim.cohort_size * sim.bytes_down_per_client  # round_bytes()[1], without tracing the update
        self.groups = []  # architecture groups: (name, cohort positions, bytes down a round) for per-group bytes
        if sim.layout is not None:
            names = [g.name or f"g{i}" for i, g in enumerate(cfg.model.groups)] or ["g0"]
            down = [v.download_bytes if v.download_bytes is not None else sim.bytes_down_per_client
                    for v in sim.algorithm.groups] or [sim.bytes_down_per_client]
            self.groups = list(zip(names, sim.layout.positions(), [c * d for c, d in zip(sim.layout.cohort, down)]))
            self.bytes_down = sum(g[2] for g in self.groups)
        self._restore_group_bytes(last)
        self.dispatch_seconds = self.eval_time = self.close_seconds = 0.0
        self._start_downlink(self.log.rows)
        self.t_start = time.perf_counter()
        self.first_dispatch = None
        self.limit, self.budget_note = r.rounds, None
        self.noise_note = None
        if cfg.privacy.secure_noise and self.resumed_from:
            self.noise_note = (f"privacy.secure_noise: resumed at round {self.resumed_from} with fresh noise from the "
                               "operating system (rounds before and after are not reproducible)")
        if accountant is not None and cfg.privacy.target_epsilon is not None:
            within = accountant.rounds_within(cfg.privacy.target_epsilon, r.rounds)
            if within < r.rounds:
                self.limit = within
                self.budget_note = (
                    f"privacy budget: stopped after round {within}, epsilon {accountant.epsilon_at(within):.3f} "
                    f"<= target {cfg.privacy.target_epsilon:g} at delta {accountant.delta:g} "
                    f"({accountant.relation}); round {within + 1} would exceed it")

    def rewind(self, step: int, like: Any) -> None:
        """Go back to the checkpoint of ``step`` (a sweep resumes all its runs at a common round)."""
        self.state = self.ckpt.restore(step, like)
        self.resumed_from = self.done = step
        self.log.reset(complete_rows(self.out_dir, step))
        last = self.log.rows[-1] if self.log.rows else {}
        self.cum_up, self.cum_down = int(last.get("cum_bytes_up", 0)), int(last.get("cum_bytes_down", 0))
        self._restore_clocks(last)
        self._restore_group_bytes(last)
        self.last_eval = {k: v for k, v in last.items() if k.startswith(("test_", "client_acc", "teacher_acc"))}
        self._start_downlink(self.log.rows)

    def _restore_group_bytes(self, last: dict) -> None:
        self.group_cum = {name: [int(last.get(f"{name}_cum_bytes_up", 0)), int(last.get(f"{name}_cum_bytes_down", 0))]
                          for name, _, _ in self.groups}

    def _group_bytes(self, row: dict, up: np.ndarray) -> None:
        """Per architecture group: bytes up (its clients' exact uploads), and down (its
        sampled clients times the broadcast; not split by group under downlink compression)."""
        for name, mask, down in self.groups:
            cum = self.group_cum[name]
            row[f"{name}_bytes_up"] = int(up[mask].sum())
            cum[0] += row[f"{name}_bytes_up"]
            row[f"{name}_cum_bytes_up"] = cum[0]
            if self.downlink is None:
                row[f"{name}_bytes_down"] = down
                cum[1] += row[f"{name}_bytes_down"]
                row[f"{name}_cum_bytes_down"] = cum[1]

    def _restore_clocks(self, last: dict) -> None:
        """The cumulative clocks of the rows already logged (a resumed run continues them)."""
        self.wall0 = float(last.get("wall_time", 0.0))
        self.eval0 = float(last.get("eval_seconds") or 0.0)
        self.ckpt0 = float(last.get("checkpoint_seconds") or 0.0) - self.ckpt.blocking_seconds

    def _start_downlink(self, rows: list[dict]) -> None:
        """With downlink compression: the ledger of what each sampled client downloads
        (:mod:`fedkd_jax.runner.downlink`), replayed over the rows already logged."""
        from fedkd_jax.engine.cohort import key_bits

        self.downlink = None
        if self.sim.downlink is not None:
            self.downlink = RunDownlink(self.sim, key_bits(self.state.key))
            self.downlink.replay(rows)
        self.cum_down_per_round = int(rows[-1].get("cum_bytes_down_per_round", 0)) if rows else 0

    def chunk(self, at: int) -> int:
        """Rounds in the dispatch starting at ``at``: boundaries are absolute multiples of every
        cadence, so a resumed run dispatches exactly the chunks the original would."""
        r = self.cfg.run
        return min(next_boundary(at, r.rounds_per_dispatch), next_boundary(at, r.eval_every),
                   next_boundary(at, r.checkpoint_every), self.limit) - at

    def record(self, state: Any, m: dict[str, np.ndarray], n: int, seconds: float, *, stopping: bool = False) -> list[dict]:
        """After a dispatch of ``n`` rounds: rows, evaluation, logs, checkpoint. ``m``: host metrics ``[n, ...]``."""
        r = self.cfg.run
        self.state = state
        self.first_dispatch = seconds if self.first_dispatch is None else self.first_dispatch
        rows = []
        for i in range(n):
            row = {"round": self.done + i + 1}
            row.update({k: float(v[i]) for k, v in m.items() if k not in NOT_LOGGED})
            row["clients_contributing"] = int(m["clients_contributing"][i])
            row["round_time"] = seconds / n
            row["bytes_up"] = int(np.asarray(m["bytes_up_clients"][i], np.int64).sum())
            self._group_bytes(row, np.asarray(m["bytes_up_clients"][i], np.int64))
            if self.downlink is not None:  # compressed deltas: each sampled client's catch-up (runner.downlink)
                delta = int(m["bytes_down_client"][i])
                row["bytes_down"], per_round = self.downlink.charge(self.done + i, delta)
                self.cum_down_per_round += per_round
                row["bytes_down_delta"], row["bytes_down_per_round"] = delta, per_round
                row["cum_bytes_down_per_round"] = self.cum_down_per_round
            else:
                row["bytes_down"] = self.bytes_down
            self.cum_up += row["bytes_up"]
            self.cum_down += row["bytes_down"]
            row["cum_bytes_up"], row["cum_bytes_down"] = self.cum_up, self.cum_down
            if self.accountant is not None:
                row["epsilon"] = self.accountant.epsilon_at(row["round"])
            rows.append(row)
        self.done += n
        self.dispatch_seconds += seconds
        for row in rows:  # cumulative through each round (an evaluation ends the dispatch's last round)
            row["eval_seconds"] = self.eval0 + self.eval_time
        if self.done % r.eval_every == 0 or self.done == self.limit:
            t0 = time.perf_counter()
            self.last_eval = self.evaluate(state)
            rows[-1].update(self.last_eval)
            rows[-1]["eval_time"] = time.perf_counter() - t0
            self.eval_time += rows[-1]["eval_time"]
            rows[-1]["eval_seconds"] = self.eval0 + self.eval_time
        wall = self.wall0 + time.perf_counter() - self.t_start
        for row in rows:  # cumulative clocks: checkpoint_seconds counts the saves before this row was written
            row["wall_time"] = wall
            row["checkpoint_seconds"] = self.ckpt0 + self.ckpt.blocking_seconds
        for cb in self.callbacks:
            cb.write(rows)  # rows reach disk before the checkpoint that covers them
        if self.done % r.checkpoint_every == 0 or self.done == self.limit or stopping:
            self.ckpt.save(self.done, state)
        return rows

    def checkpoint_note(self) -> str:
        """Which checkpoint a run stopped now would resume from (reads the directory only)."""
        steps = self.ckpt.committed_steps()
        if not steps:
            return "no checkpoint was saved yet, so a rerun starts from round 0"
        return f"the last checkpoint (round {steps[-1]}) is intact; resume with: fedkd resume {self.out_dir}"

    def close(self) -> None:
        t0 = time.perf_counter()
        self.ckpt.close()  # waits for the queued saves
        self.close_seconds = time.perf_counter() - t0
        if self.sim.store is not None:
            self.sim.store.close()
        if self.tb is not None:
            self.tb.close()

    def finish(self, *, interrupted: bool) -> RunResult:
        import jax

        cfg = self.cfg
        if not interrupted and self.primary:
            plot_accuracy(self.log.rows, os.path.join(self.out_dir, "accuracy.png"),
                          title=f"{cfg.algorithm} on {cfg.data.dataset}")
        final = dict(self.last_eval)
        if self.log.rows:
            final.update({k: self.log.rows[-1].get(k) for k in ("train_loss", "cum_bytes_up", "cum_bytes_down")})
            if "cum_bytes_down_per_round" in self.log.rows[-1]:
                final["cum_bytes_down_per_round"] = self.log.rows[-1]["cum_bytes_down_per_round"]
        notes = list(self.ckpt.events) + ([self.budget_note] if self.budget_note and self.done >= self.limit else [])
        notes += [self.noise_note] if self.noise_note else []
        if self.accountant is not None:
            from fedkd_jax.privacy.coverage import split

            final["epsilon"] = self.accountant.epsilon_at(self.done)
            final["delta"] = self.accountant.delta
            final["epsilon_relation"] = self.accountant.relation
            from fedkd_jax.hetero.build import OWN_MODEL_ALGORITHMS

            columns = split((k for row in self.log.rows for k in row), own_models=cfg.algorithm in OWN_MODEL_ALGORITHMS)
            final["privacy_analyst_only"] = columns["analyst_only"]
            final["noise_from_seed"] = not cfg.privacy.secure_noise
            if self.primary:  # which logged columns epsilon covers, for whoever publishes them
                with open(os.path.join(self.out_dir, "privacy.json"), "w") as f:
                    json.dump({"epsilon": final["epsilon"], "delta": final["delta"],
                               "relation": final["epsilon_relation"], "secure_noise": cfg.privacy.secure_noise,
                               "noise_reproducible_from_seed": not cfg.privacy.secure_noise, **columns}, f, indent=2)
        state = None
        if jax.process_count() == 1:
            state = jax.device_get(self.state)
        total = time.perf_counter() - self.t_start
        timing = {"dispatch": self.dispatch_seconds, "evaluation": self.eval_time,
                  "checkpoints": self.ckpt.blocking_seconds + self.close_seconds, "total": total}
        return RunResult(self.out_dir, self.done, final, total, self.first_dispatch or 0.0,
                         resumed_from=self.resumed_from, interrupted=interrupted, notes=notes, state=state,
                         rows=list(self.log.rows), timing=timing)


def resolve_run(cfg: Config, previous: Config | None) -> Config:
    """Settings fixed when a run starts (the SVD horizon, calibrated noise, delta) stay the run's."""
    if cfg.compression.schedule_rounds is None:
        horizon = previous.compression.schedule_rounds if previous is not None else None
        cfg = dataclasses.replace(cfg, compression=dataclasses.replace(
            cfg.compression, schedule_rounds=horizon or cfg.run.rounds))
    p = cfg.privacy
    if previous is not None:
        if p.target_epsilon is not None and p.noise_multiplier is None:
            p = dataclasses.replace(p, noise_multiplier=previous.privacy.noise_multiplier)
        if p.delta is None:
            p = dataclasses.replace(p, delta=previous.privacy.delta)
        cfg = dataclasses.replace(cfg, privacy=p)
    return cfg
