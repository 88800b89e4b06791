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
A second one ends the process at once (exit status 128 + signal), even when
the running dispatch never returns; the checkpoints already saved stay intact.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable

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
from fedkd_jax.runner.outputs import preload_plotting
from fedkd_jax.runner.prefetch import Prefetcher
from fedkd_jax.runner.resume import check_compatible, saved_config

__all__ = ["RunResult", "prepare", "run_experiment"]


class StopFlag:
    """Turns SIGTERM / SIGINT into a flag checked between chunks (main thread only).

    The first signal asks for a graceful stop: the running dispatch finishes,
    a checkpoint is written and the loop returns. A second signal ends the
    process at once with one line on stderr and exit status ``128 + signal``,
    without waiting for the running dispatch (which may never return, e.g. a
    deadlocked device program) or anything else. Saved checkpoints stay
    intact: orbax commits a step atomically, and the client store's files are
    pruned only after a newer step is committed (the same guarantee as
    ``kill -9``).

    The interpreter runs Python signal handlers only when the main thread is
    back in Python code, which a dispatch blocked inside XLA may never be. So
    the signals are also counted by a watcher thread, woken through
    :func:`signal.set_wakeup_fd` (written by the C-level handler the moment a
    signal arrives); whichever sees the second signal first ends the process.

    Args:
      checkpoint_note: ``() -> str`` naming the newest intact checkpoint, for
        the message (called from the watcher thread: it must not touch devices).
    """

    def __init__(self, checkpoint_note: Callable[[], str] | None = None):
        self.signal: int | None = None
        self._note = checkpoint_note
        self._old: dict[int, Any] = {}
        self._count = 0
        self._lock = threading.Lock()
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:  # e.g. Windows wants a socket: rely on the handlers
            old = None
        if old != -1:  # unsupported, or someone else's wakeup fd (an event loop): keep it
            if old is not None:
                signal.set_wakeup_fd(old)
            os.close(r)
            os.close(w)
            return self
        self._pipe = (r, w)
        self._watcher = threading.Thread(target=self._watch, args=(r,), name="fedkd-stop-signals", daemon=True)
        self._watcher.start()
        return self

    def _watch(self, fd: int) -> None:
        watched = {int(signal.SIGTERM), int(signal.SIGINT)}
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:  # closed by __exit__
                return
            for signum in data:
                if signum in watched:
                    self._seen(signum)

    def _handle(self, signum, frame):
        if self._watcher is None:  # no watcher: the handler counts
            self._seen(signum)
        elif self.signal is None:
            self.signal = signum

    def _seen(self, signum: int) -> None:
        with self._lock:
            self._count += 1
            first = self._count == 1
            if first:
                self.signal = signum
        name = signal.Signals(signum).name
        if first:
            _say(f"fedkd: {name} received: stopping after the running dispatch and saving a checkpoint; "
                 f"send it again to stop at once without waiting")
            return
        note = "the checkpoints already saved are intact"
        if self._note is not None:
            try:
                note = self._note()
            except Exception:  # noqa: BLE001 - the message must not stop the exit
                pass
        _say(f"fedkd: second signal ({name}): stopping without waiting for the running dispatch; {note}")
        os._exit(128 + int(signum))

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self._pipe is not None:
            signal.set_wakeup_fd(-1)  # was -1 on entry (else there is no pipe)
            r, w = self._pipe
            os.close(w)  # the watcher reads EOF and returns
            self._watcher.join(timeout=5)
            os.close(r)
            self._pipe = None
        return False


def _say(line: str) -> None:
    """One line to stderr, straight to the file descriptor (safe from any thread, at any moment)."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


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
    prefetch = Prefetcher(sim, key_bits(ctx.state.key), ctx.pool)
    if ctx.primary and ctx.done < ctx.limit:
        preload_plotting()
    interrupted = False
    written = None  # the union whose states the previous dispatch wrote back
    try:
        with StopFlag(ctx.checkpoint_note) as stop:
            while ctx.done < ctx.limit:
                done, n = ctx.done, ctx.chunk(ctx.done)
                t0 = time.perf_counter()
                plan, gathered, pool = prefetch.take(done, n, written, ctx.state.key)
                if done + n < ctx.limit:
                    prefetch.request(done + n, ctx.chunk(done + n))
                state, m = sim.execute(ctx.state, pool, plan, gathered)
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
