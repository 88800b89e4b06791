"""The sweep loop: every run of a grid, batched by static configuration.

``out/`` holds ``sweep.json`` (base config, grid, seeds), one ordinary run
directory per run under ``out/runs/<label>/`` (config, metrics, checkpoints:
each is also a valid ``fedkd resume`` target), and the sweep's outputs
(:mod:`fedkd_jax.sweeps.report`). Runs with the same static configuration
advance together, one dispatch for all of them; a group's runs checkpoint
at the same rounds, so an interrupted sweep (SIGTERM, or ``kill -9``)
resumes every run from the newest round all of them have a checkpoint for,
and ends with the same table as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import jax
from tqdm.auto import tqdm

from fedkd_jax import distributed
from fedkd_jax.builders import build_aggregator, build_algorithm, build_compressor, build_data, build_model
from fedkd_jax.config import Config, from_dict, group_size_value, load_config, to_dict, validate
from fedkd_jax.engine.pool import SWEEP_POOL
from fedkd_jax.errors import ConfigError
from fedkd_jax.paths import check_writable_dir
from fedkd_jax.plan import data_identity, privacy_setup
from fedkd_jax.runner.context import RunContext
from fedkd_jax.runner.loop import StopFlag, prepare
from fedkd_jax.runner.resume import RESUMABLE_KEYS, flatten
from fedkd_jax.settings import sampling_method
from fedkd_jax.sweeps.engine import BatchedRuns, auto_runs_per_device, device_memory_bytes, per_run_bytes, sweep_mesh
from fedkd_jax.sweeps.grid import RunSpec, expand, group, hparams, parse_grid, with_values
from fedkd_jax.sweeps.report import SweepResult, write_outputs


def as_config(config: Config | dict | str | None) -> Config:
    """A :class:`Config` from a Config, a dict of sections or a YAML path (validated)."""
    if config is None:
        return load_config(None, [])
    if isinstance(config, Config):
        validate(config)
        return config
    if isinstance(config, dict):
        cfg = from_dict(config)
        validate(cfg)
        return cfg
    if isinstance(config, (str, os.PathLike)):
        return load_config(os.fspath(config), [])
    raise ConfigError("config", f"expected a Config, a dict or a YAML path; got {type(config).__name__}")


def _check_same_sweep(out_dir: str, record: dict) -> None:
    path = os.path.join(out_dir, "sweep.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)

        def fixed(rec: dict) -> dict:  # settings that may change on resume (cadences, batching) do not count
            base = rec.get("base", {})
            try:  # read through the config types: older versions stored some defaults as null
                base = to_dict(from_dict(base))
            except ConfigError:
                pass
            base = {k: v for k, v in flatten(base).items() if k not in RESUMABLE_KEYS}
            return dict(rec, base=base)

        if fixed(saved) != fixed(record):
            diff = [k for k in record if fixed(saved).get(k) != fixed(record).get(k)]
            raise ConfigError("--out", f"{out_dir!r} holds another sweep (different {', '.join(diff)}); "
                                       "choose another --out so its files are kept")
    elif os.path.exists(os.path.join(out_dir, "runs")):
        raise ConfigError("--out", f"{out_dir!r} holds runs but no sweep.json; choose another --out")


def _auto_runs_per_device(gr, run_dir: str) -> int:
    """``run.runs_per_device=auto`` for a group: 1 on CPU; on GPU/TPU by memory,
    from a probe of the group's first run (host store, dropped after the estimate)."""
    from fedkd_jax.builders import build_simulator

    if jax.default_backend() == "cpu":
        return 1
    cfg = gr[0].config
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, client_store="host"))
    data = build_data(cfg)
    model = build_model(cfg, data)
    probe = build_simulator(cfg, data, build_algorithm(cfg, model, data), out_dir=run_dir)
    need = per_run_bytes(probe, probe.init(0))
    if probe.store is not None:
        probe.store.close()
    del probe
    return auto_runs_per_device(len(gr), jax.device_count(), need, device_memory_bytes())


def _builder(cfg: Config, model, data, capacity: int):
    """``hp -> (algorithm, chain, downlink, (straggler share, straggler count))`` from traced values."""
    def build(hp: dict[str, Any]):
        c = with_values(cfg, hp)
        stragglers = (hp.get("client.straggler_fraction", cfg.client.straggler_fraction),
                      hp["client.straggler_count"])  # the host's integer (sweeps.grid.hparams)
        return (build_algorithm(c, model, data), build_aggregator(c, data, capacity),
                build_compressor(c, downlink=True), stragglers)

    return build


def _by_data(built: list) -> list[list]:
    """``(spec, cfg, data, accountant)`` entries split by :func:`~fedkd_jax.plan.data_identity`."""
    out: dict[str, list] = {}
    for entry in built:
        out.setdefault(data_identity(entry[2], entry[1]), []).append(entry)
    return list(out.values())


def run_sweep(config: Config | dict | str | None, grid: Sequence[str] | dict[str, Sequence[Any]],
              seeds: Sequence[int] | int, out_dir: str, *, progress: bool = True) -> SweepResult:
    """Run (or resume) a sweep. ``seeds``: a list of seeds, or a count (0..n-1)."""
    from fedkd_jax.builders import build_simulator
    from fedkd_jax.engine.cohort import poisson_capacity

    base = as_config(config)  # each run's defaults are resolved on its own values (expand)
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    check_writable_dir("--out", out_dir)
    g = parse_grid(grid, base)
    runs: list[RunSpec] = expand(base, g, seeds)
    record = {"base": to_dict(base), "grid": {k: [str(v) for v in vs] for k, vs in g.items()}, "seeds": seeds}
    _check_same_sweep(out_dir, record)
    if base.data.pool in ("host", "disk"):  # before anything is read, written or built
        raise ConfigError("data.pool", SWEEP_POOL)
    for r in runs:
        if r.config.privacy.target_epsilon is not None:
            raise ConfigError("privacy.target_epsilon", "a sweep cannot stop runs at different rounds; "
                                                        "sweep privacy.noise_multiplier instead")
    prepared = []
    for r in runs:  # every run's config checked against its directory before anything is built
        run_dir = os.path.join(out_dir, "runs", r.dirname)
        cfg, previous = prepare(r.config, run_dir)
        prepared.append((r, run_dir, cfg, previous))
    if distributed.is_primary():
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "sweep.json"), "w") as f:
            json.dump(record, f, indent=2)

    groups = group([dataclasses.replace(r, config=cfg) for r, _, cfg, _ in prepared])
    by_index = {r.index: (run_dir, previous) for r, run_dir, _, previous in prepared}
    bar = tqdm(total=sum(gr[0].config.run.rounds for gr in groups), unit="round", disable=not (progress and distributed.is_primary()), dynamic_ncols=True,
               desc=f"sweep of {len(runs)} runs")
    results: list[Any] = [None] * len(runs)
    compiled = 0
    per_device, per_wave = [], []
    t_start = time.perf_counter()
    interrupted = False
    try:
        with StopFlag() as stop:
            for gr0 in groups:
                if interrupted:
                    break
                built_all = []
                for spec in gr0:
                    cfg = spec.config
                    data = build_data(cfg)
                    cfg, accountant = privacy_setup(cfg, data.num_clients)
                    built_all.append((spec, cfg, data, accountant))
                # runs share a program and its data pool only with the same data (a seed-dependent
                # dataset is not): each distinct data set is a group of its own
                subgroups = _by_data(built_all)
                if len(subgroups) > 1:
                    bar.total += (len(subgroups) - 1) * gr0[0].config.run.rounds
                    bar.refresh()
                for built in subgroups:
                    if interrupted:
                        break
                    gr = [spec for spec, _, _, _ in built]
                    rpd = group_size_value(gr[0].config.run.runs_per_device, "run.runs_per_device")
                    if rpd is None:
                        rpd = _auto_runs_per_device(gr, by_index[gr[0].index][0])
                        mesh = sweep_mesh(len(gr), runs_per_device=rpd)
                        # the runs axis is a divisor of the device count: spread the runs over its positions
                        rpd = min(rpd, -(-len(gr) // mesh.shape["runs"]))
                    else:
                        mesh = sweep_mesh(len(gr), runs_per_device=rpd)
                    width = max(d.max_examples for _, _, d, _ in built)
                    ctxs, sims = [], []
                    # one model and one (static) algorithm for the group: their jitted helpers
                    # (initialisers, evaluators) compile once; each run's values are traced
                    model = build_model(built[0][1], built[0][2])
                    shared = build_algorithm(built[0][1], model, built[0][2])
                    for spec, cfg, data, accountant in built:
                        alg = shared if not jax.tree.leaves(shared.server_data) else build_algorithm(cfg, model, data)
                        cap = (poisson_capacity(data.num_clients, cfg.run.cohort_size)
                               if sampling_method(cfg) == "poisson" else cfg.run.cohort_size)
                        run_dir, previous = by_index[spec.index]
                        sim = build_simulator(cfg, data, alg, out_dir=run_dir, mesh=mesh, max_examples=width,
                                              build=_builder(cfg, model, data, cap))
                        ctxs.append(RunContext(cfg, run_dir, sim, accountant, resuming=previous is not None))
                        sims.append(sim)
                    common = min(c.done for c in ctxs)
                    for c in ctxs:  # resume every run of the group at the same round
                        if c.done != common:
                            c.rewind(common, c.sim.put_state(c.sim.init(c.cfg.run.seed)))
                    waves_of = mesh.shape["runs"] * rpd
                    per_device.append(rpd)
                    per_wave.append(min(waves_of, len(ctxs)))
                    programs: dict = {}
                    waves = []
                    for w in range(0, len(ctxs), waves_of):
                        part = ctxs[w:w + waves_of]
                        batch = BatchedRuns([c.sim for c in part], [hparams(c.cfg) for c in part], mesh, programs=programs)
                        keys = [c.sim.put_state(c.sim.init(c.cfg.run.seed)).key for c in part]
                        waves.append((part, batch, batch.place_state([c.state for c in part]), keys))
                    limit = ctxs[0].limit
                    bar.update(common)
                    while ctxs[0].done < limit:
                        done, n = ctxs[0].done, ctxs[0].chunk(ctxs[0].done)
                        stopping = distributed.agree(stop.signal is not None)
                        for i, (part, batch, state, keys) in enumerate(waves):
                            t0 = time.perf_counter()
                            state, per_run = batch.dispatch(state, keys, done, n)
                            waves[i] = (part, batch, state, keys)
                            dt = time.perf_counter() - t0
                            for c, s, m in zip(part, batch.unstack(state), per_run):
                                c.record(s, m, n, dt, stopping=stopping)
                        bar.update(n)
                        accs = [c.last_eval.get("test_accuracy") for c in ctxs if c.last_eval.get("test_accuracy") is not None]
                        if accs:
                            bar.set_postfix({"best": f"{max(accs):.3f}", "worst": f"{min(accs):.3f}"})
                        if stopping:
                            interrupted = True
                            break
                    batch = waves[0][1]
                    compiled += batch.compiled_programs  # the waves share their programs
                    for spec, c in zip(gr, ctxs):
                        c.close()
                        results[spec.index] = c.finish(interrupted=interrupted)
    finally:
        bar.close()
    done_runs = [(r, res) for r, res in zip(runs, results) if res is not None]
    result = write_outputs(out_dir, list(g), done_runs, interrupted=interrupted,
                           write=distributed.is_primary() and not interrupted)
    result.compiled_programs = compiled
    result.groups = len(groups)
    result.runs_per_device, result.runs_per_wave = per_device, per_wave
    result.seconds = time.perf_counter() - t_start
    return result
