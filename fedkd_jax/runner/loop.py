"""The run loop: rounds in compiled chunks, with a prefetching host side.

A run directory holds ``config.json`` (the resolved config), the logs and
``checkpoints/``. Running into a directory that already holds a run resumes
it from its newest verified checkpoint, provided the settings that change
results are the same (see :mod:`fedkd_jax.runner.resume`). Every random choice
derives from (seed, round, client) and the chunk boundaries are fixed multiples
of the cadences, so a resumed run reproduces the uninterrupted one bit for bit
on the same machine and device count.

The loop only dispatches; logging, evaluation, checkpoints and TensorBoard
are :class:`~fedkd_jax.runner.context.RunContext`'s callbacks on each dispatch.
SIGTERM or SIGINT stops the run after the current chunk of rounds; the
loop then writes a checkpoint, waits for it and returns ``interrupted=True``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from tqdm.auto import tqdm

from fedkd_jax import distributed
from fedkd_jax.builders import resolve
from fedkd_jax.config import Config
from fedkd_jax.plan import resolve_config
from fedkd_jax.engine import fetch
from fedkd_jax.engine.cohort import key_bits
from fedkd_jax.errors import ConfigError
from fedkd_jax.paths import check_writable_dir
from fedkd_jax.runner.context import RunContext, RunResult, resolve_run
from fedkd_jax.runner.prefetch import Prefetcher
from fedkd_jax.runner.resume import check_compatible, saved_config

__all__ = ["RunResult", "prepare", "run_experiment"]


class StopFlag:
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


def prepare(cfg: Config, out_dir: str) -> tuple[Config, Config | None]:
    """Validate ``cfg`` against ``out_dir`` (a new run, or the same run to resume).

    Raises before anything is built, compiled or written.
    """
    cfg = resolve_config(cfg)  # one resolution per run: validated, every dependent default filled
    check_writable_dir("--out", out_dir)
    previous = saved_config(out_dir)
    cfg = resolve_run(cfg, previous)
    if previous is not None:
        check_compatible(previous, cfg, out_dir)
    elif any(os.path.exists(os.path.join(out_dir, f)) for f in ("metrics.jsonl", "checkpoints")):
        raise ConfigError("--out", f"{out_dir!r} holds a run's files but no config.json, so it cannot be resumed; "
                                   "choose another --out so its files are kept")
    return cfg, previous


def run_experiment(cfg: Config, out_dir: str, *, progress: bool | None = None) -> RunResult:
    """Run ``cfg`` into ``out_dir``, or resume the run already there.

    Everything that can be wrong with the input (config, data, an incompatible
    existing run) raises before anything is compiled and before ``out_dir``
    is touched.
    """
    cfg, previous = prepare(cfg, out_dir)
    parts = resolve(cfg, out_dir=out_dir)
    cfg, sim = parts.config, parts.simulator
    ctx = RunContext(cfg, out_dir, sim, parts.accountant, resuming=previous is not None)
    r = cfg.run
    show = r.progress if progress is None else progress
    bar = tqdm(total=ctx.limit, initial=min(ctx.done, ctx.limit), unit="round", disable=not (show and ctx.primary),
               dynamic_ncols=True, desc=f"{cfg.algorithm}/{cfg.data.dataset}")
    prefetch = Prefetcher(sim, key_bits(ctx.state.key))
    interrupted = False
    written = None  # the union whose states the previous dispatch wrote back
    try:
        with StopFlag() as stop:
            while ctx.done < ctx.limit:
                done, n = ctx.done, ctx.chunk(ctx.done)
                t0 = time.perf_counter()
                plan, gathered = prefetch.take(done, n, written, ctx.state.key)
                if done + n < ctx.limit:
                    prefetch.request(done + n, ctx.chunk(done + n))
                state, m = sim.execute(ctx.state, ctx.pool, plan, gathered)
                written = plan.union
                m = {k: fetch(v) for k, v in m.items()}
                stopping = distributed.agree(stop.signal is not None)
                rows = ctx.record(state, m, n, time.perf_counter() - t0, stopping=stopping)
                bar.update(n)
                post = {"loss": f"{rows[-1].get('train_loss', float('nan')):.3f}"}
                if "test_accuracy" in ctx.last_eval:
                    post["acc"] = f"{ctx.last_eval['test_accuracy']:.3f}"
                if "teacher_acc_mean" in ctx.last_eval:
                    post["teacher"] = f"{ctx.last_eval['teacher_acc_mean']:.3f}"
                bar.set_postfix(post)
                if stopping:
                    interrupted = True
                    break
    finally:
        bar.close()
        prefetch.close()
        ctx.close()
    return ctx.finish(interrupted=interrupted)
