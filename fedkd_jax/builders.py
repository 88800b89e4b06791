"""Config -> data, model, algorithm. The only place that maps names to parts."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from fedkd_jax import algorithms as alg_lib
from fedkd_jax.compression import Compressor, make_compressor
from fedkd_jax.config import Config, compression_method, downlink_method
from fedkd_jax.data import FederatedData, federate, load_dataset, load_proxy
from fedkd_jax.errors import ConfigError
from fedkd_jax.models import Model, make_model
from fedkd_jax.plan import privacy_delta, privacy_setup  # noqa: F401 - privacy_delta re-exported
from fedkd_jax.settings import DEFAULT_NUM_CLIENTS, num_clients_value, partition_method


def pool_directory(cfg: Config) -> str:
    """Where ``data.pool=disk`` keeps its pool files: ``data.pool_dir``, or the user's cache
    (:func:`fedkd_jax.store.pool_file.default_dir`)."""
    import os

    from fedkd_jax.store.pool_file import default_dir

    return os.path.expanduser(cfg.data.pool_dir) if cfg.data.pool_dir else default_dir()


def _read_dataset(cfg: Config, known: str | None, pool_dir: str | None):
    """The configured dataset; with ``pool_dir`` and a pool that goes (or may go) to disk, its rows
    memory-mapped from a pool file: the one an earlier run wrote for the same source files and
    read options (their decoding skipped), or a new one."""
    from fedkd_jax.engine.pool import host_fits
    from fedkd_jax.store import pool_file

    d = cfg.data
    options = dict(name=d.dataset, path=d.path, num_clients=num_clients_value(cfg, known) or DEFAULT_NUM_CLIENTS,
                   seed=cfg.run.seed, synthetic_alpha=d.synthetic_alpha, synthetic_beta=d.synthetic_beta,
                   max_examples=d.max_examples, task=d.task, seq_len=d.seq_len, vocab_size=d.vocab_size,
                   client_column=d.client_column)
    disk = pool_dir is not None and d.pool in ("disk", "auto")
    key = None
    if disk:
        # what the rows depend on: only a generated dataset's depend on the seed and population size
        ident = {k: v for k, v in options.items() if d.dataset == "synthetic"
                 or k not in ("num_clients", "seed", "synthetic_alpha", "synthetic_beta", "max_examples")}
        key = pool_file.source_key(ident, d.path)
        cached = pool_file.dataset_bytes(pool_dir, key)
        if cached is not None and (d.pool == "disk" or not host_fits(cached, cfg.run.memory_budget_gb)):
            return pool_file.open_dataset(pool_dir, key)
    name = options.pop("name")
    ds = load_dataset(name, **options)
    if disk:
        host = int(ds.x.size) * 4 + int(ds.y.size) * 4
        if d.pool == "disk" or not host_fits(host, cfg.run.memory_budget_gb):
            ds = pool_file.save_dataset(pool_dir, key, ds)  # the in-memory rows are dropped here
    return ds


def build_data(cfg: Config, *, pool_dir: str | None = None) -> FederatedData:
    """Load and federate the configured dataset (deterministic from ``run.seed``).

    ``pool_dir``: where ``data.pool=disk`` (or ``auto``, for a pool too large for the host)
    keeps the pooled rows in a pool file (:mod:`fedkd_jax.store.pool_file`); without it the
    rows stay in memory (the simulator writes a temporary pool file if it needs one)."""
    d = cfg.data
    known = partition_method(cfg)
    ds = _read_dataset(cfg, known, pool_dir)
    partition = known or partition_method(cfg, has_clients=ds.client_ids is not None)
    fd = federate(
        ds,
        partition=partition,
        num_clients=num_clients_value(cfg, partition),
        seed=cfg.run.seed,
        alpha=d.alpha,
        shards_per_client=d.shards_per_client,
        examples_per_client=d.examples_per_client,
        test_fraction=d.test_fraction,
        global_test_fraction=d.global_test_fraction,
        proxy_fraction=d.proxy_fraction if d.proxy == "holdout" else 0.0,
        min_examples=d.min_examples,
        max_examples_per_client=d.max_examples_per_client,
    )
    if d.proxy != "holdout":
        px = load_proxy(d.proxy, num_features=fd.num_features, image_shape=fd.image_shape, size=d.proxy_size,
                        seed=cfg.run.seed, path=d.proxy_path)
        fd = fd.replace(proxy_x=px, proxy_y=None)
    return fd


def build_model(cfg: Config, data: FederatedData, *, teacher: bool = False) -> Model:
    """The shared model, or (``teacher=True``) the teacher of fedkd / server_teacher_kd."""
    m = cfg.model
    k = cfg.distill
    kind, hidden, width = ((k.teacher_kind, k.teacher_hidden, k.teacher_width) if teacher
                           else (m.kind, m.hidden, m.width))
    # Next-token models read the sequence length L = data.num_features and the vocabulary size
    # (special tokens included) = data.num_classes from the data, as classifiers read D and K.
    return make_model(
        kind,
        num_features=data.num_features,
        num_classes=data.num_classes,
        hidden=hidden,
        channels=m.channels,
        image_shape=data.image_shape,
        width=width,
    )


def _common(cfg: Config):
    c, s, k = cfg.client, cfg.server, cfg.distill
    client_opt = alg_lib.client_optimizer(c.optimizer, lr=c.lr, momentum=c.momentum)
    server_opt = alg_lib.server_optimizer(s.optimizer, lr=s.lr, momentum=s.momentum, b1=s.b1, b2=s.b2, tau=s.tau,
                                          form=s.adaptive_form)
    local = dict(batch_size=c.batch_size, local_epochs=c.local_epochs, local_steps=c.local_steps)
    distill = dict(distill_steps=k.server_steps, distill_lr=k.server_lr, distill_batch_size=k.server_batch_size)
    return client_opt, server_opt, local, distill


def _fedavg(cfg, model, data):
    client_opt, server_opt, local, _ = _common(cfg)
    return alg_lib.fedavg(model, client_opt, server_opt, **local)


def _fedprox(cfg, model, data):
    client_opt, server_opt, local, _ = _common(cfg)
    return alg_lib.fedprox(model, client_opt, server_opt, mu=cfg.fedprox.mu, **local)


def _fedkd(cfg, model, data):
    client_opt, server_opt, local, _ = _common(cfg)
    k = cfg.distill
    teacher = build_model(cfg, data, teacher=True)
    teacher_opt = alg_lib.client_optimizer(k.teacher_optimizer, lr=k.teacher_lr, momentum=cfg.client.momentum)
    return alg_lib.fedkd(model, teacher, client_opt, teacher_opt, server_opt, temperature=k.temperature, **local)


def _server_teacher_kd(cfg, model, data):
    client_opt, server_opt, local, distill = _common(cfg)
    k = cfg.distill
    teacher = build_model(cfg, data, teacher=True)
    return alg_lib.server_teacher_kd(model, teacher, client_opt, server_opt, data.proxy_x,
                                     alpha=k.alpha, temperature=k.temperature, warmup=k.teacher_warmup,
                                     warmup_rounds=k.warmup_rounds, warmup_steps=k.warmup_steps,
                                     proxy_y=data.proxy_y, logit_weight=cfg.privacy.logit_weight, **local, **distill)


def _feddf(cfg, model, data):
    client_opt, server_opt, local, distill = _common(cfg)
    k = cfg.distill
    return alg_lib.feddf(model, client_opt, server_opt, data.proxy_x, proxy_y=data.proxy_y,
                         temperature=k.temperature, schedule=k.server_schedule, val_fraction=k.val_fraction,
                         val_every=k.val_every, patience=k.patience, logit_weight=cfg.privacy.logit_weight,
                         **local, **distill)


def _hetero(cfg, model, data):
    from fedkd_jax.hetero.build import build_hetero

    return build_hetero(cfg, model, data)


# The algorithm registry: a new algorithm is its own module plus one line here.
ALGORITHM_BUILDERS: dict[str, Callable[[Config, Model, FederatedData], alg_lib.FederatedAlgorithm]] = {
    "fedavg": _fedavg,
    "fedprox": _fedprox,
    "fedkd": _fedkd,
    "server_teacher_kd": _server_teacher_kd,
    "feddf": _feddf,
    "fd": _hetero,  # heterogeneous clients: fedkd_jax.hetero
    "fedproto": _hetero,
    "fedmd": _hetero,
    "heterofl": _hetero,
    "fedrolex": _hetero,
}


def build_algorithm(cfg: Config, model: Model, data: FederatedData) -> alg_lib.FederatedAlgorithm:
    """The configured algorithm, from :data:`ALGORITHM_BUILDERS`."""
    if cfg.algorithm not in ALGORITHM_BUILDERS:  # pragma: no cover - validation refuses it first
        raise ConfigError("algorithm", f"unknown algorithm {cfg.algorithm!r}; allowed: {', '.join(ALGORITHM_BUILDERS)}")
    if cfg.model.groups:  # heterogeneous clients (fedkd_jax.hetero)
        return _hetero(cfg, model, data)
    if data.y.ndim > 1 and cfg.algorithm in ("feddf", "server_teacher_kd"):
        raise ConfigError("algorithm", f"{cfg.algorithm} distils on a proxy set of single labels; next-token data "
                                       "(a label per token) runs with fedavg (any server optimizer), fedprox or fedkd")
    return ALGORITHM_BUILDERS[cfg.algorithm](cfg, model, data)


def build_compressor(cfg: Config, *, downlink: bool = False) -> Compressor | None:
    """The upload compressor, or (``downlink=True``) the server-to-client one."""
    z = cfg.compression
    method = downlink_method(cfg) if downlink else compression_method(cfg)
    return make_compressor(method, rounds=z.schedule_rounds or cfg.run.rounds, energy_start=z.energy_start,
                           energy_end=z.energy_end, topk_fraction=z.topk_fraction)


def client_weighting(cfg: Config) -> str:
    """Resolve ``client.weighting=auto``: uniform for fedkd (its reference code), examples otherwise."""
    w = cfg.client.weighting
    return ("uniform" if cfg.algorithm == "fedkd" else "examples") if w == "auto" else w


def auto_group_size(cohort_per_device: int) -> int:
    """``run.group_size=auto``: 1 on CPU (a client's weights stay in cache, and
    XLA:CPU runs batched tiny dots slower than plain ones); on GPU/TPU the whole
    per-device cohort slice, up to 64 clients, as one vmapped group, so the
    accelerator sees wide batched matmuls."""
    import jax

    if jax.default_backend() == "cpu":
        return 1
    g = min(64, max(1, cohort_per_device))
    while cohort_per_device % g:  # a divisor keeps the padding minimal
        g -= 1
    return g


def build_simulator(cfg: Config, data: FederatedData, algorithm: alg_lib.FederatedAlgorithm, *, out_dir: str,
                    mesh=None, max_examples: int | None = None, build=None):
    """The :class:`~fedkd_jax.engine.Simulator` of ``cfg``: mesh, group size, compression,
    stragglers and the client store (``auto`` resolved against the memory budget)."""
    import math
    import os

    import jax

    from fedkd_jax.config import devices_value, group_size_value
    from fedkd_jax.engine import Simulator, client_mesh
    from fedkd_jax.engine.cohort import poisson_capacity
    from fedkd_jax.engine.pool import choose_pool
    from fedkd_jax.store import choose_store, state_bytes

    r = cfg.run
    mesh = client_mesh(devices_value(r.devices)) if mesh is None else mesh
    devices = int(mesh.shape["clients"])
    group = group_size_value(r.group_size) or auto_group_size(math.ceil(r.cohort_size / devices))
    store = "device"
    if algorithm.init_client is not None:
        per_client = state_bytes(jax.eval_shape(algorithm.init_client, jax.random.key(0)))
        union = min(r.rounds_per_dispatch * r.cohort_size, data.num_clients)
        store = choose_store(r.client_store, num_clients=data.num_clients, per_client_bytes=per_client,
                             num_devices=devices, budget_gb=r.memory_budget_gb, union_size=2 * union)
    store_dir = r.store_dir or os.path.join(out_dir, "client-store")
    if jax.process_count() > 1:  # every process keeps its own copy of the store
        store_dir = os.path.join(store_dir, f"process-{jax.process_index()}")
    capacity = poisson_capacity(data.num_clients, r.cohort_size) if cfg.privacy.sampling == "poisson" else r.cohort_size
    from fedkd_jax.engine.pool import SWEEP_POOL
    from fedkd_jax.hetero.build import membership
    from fedkd_jax.store.pool_file import is_mapped

    pool = choose_pool(cfg.data.pool, pool_bytes=int(data.x.size + data.y.size) * 4, num_devices=devices,
                       budget_gb=r.memory_budget_gb, on_disk=is_mapped(data.x))
    if build is not None and pool != "device":  # a sweep: refused before any pool file is written
        raise ConfigError("data.pool", SWEEP_POOL)
    return Simulator(algorithm, data, cohort_size=r.cohort_size, mesh=mesh, group_size=group,
                     groups=membership(cfg, data),
                     aggregator=build_aggregator(cfg, data, capacity), downlink=build_compressor(cfg, downlink=True),
                     straggler_fraction=cfg.client.straggler_fraction, straggler_mode=cfg.client.straggler_mode,
                     sampling=cfg.privacy.sampling, store=store, store_dir=store_dir, max_examples=max_examples,
                     build=build, pool=pool, pool_dir=pool_directory(cfg))


def build_aggregator(cfg: Config, data: FederatedData, capacity: int):
    """The aggregation chain of ``cfg``: [compress] -> mean -> [DP clip + noise] -> [secure aggregation]."""
    import math

    from fedkd_jax.aggregation import chain, compress, mean
    from fedkd_jax.config import (count_noise, dp_enabled, frac_bits_value, max_clip_norm, secagg_neighbors,
                                  secagg_threshold)
    from fedkd_jax.privacy import choose_fraction_bits, gaussian, secure_aggregation

    p, a = cfg.privacy, cfg.secagg
    steps = []
    comp = build_compressor(cfg)
    if comp is not None:
        steps.append(compress(comp))
    expected = float(cfg.run.cohort_size)
    cap = max_clip_norm(cfg)
    if dp_enabled(cfg):
        steps.append(mean("uniform", denominator="expected", expected=expected))
        adaptive = p.adaptive_quantile is not None
        steps.append(gaussian(p.noise_multiplier, p.clip_norm, expected_clients=expected,
                              quantile=p.adaptive_quantile, learning_rate=p.adaptive_lr,
                              count_stddev=count_noise(cfg) if adaptive else None, max_clip_norm=cap,
                              secure_noise=p.secure_noise, log_raw_norm=p.log_raw_norm))
    elif p.clip_norm is not None:  # clipping alone (e.g. to bound uploads for secure aggregation)
        steps.append(gaussian(0.0, p.clip_norm, expected_clients=expected, log_raw_norm=p.log_raw_norm))
        steps.append(mean(client_weighting(cfg)))
    else:
        steps.append(mean(client_weighting(cfg)))
    if a.enabled:
        weighting = "uniform" if dp_enabled(cfg) else client_weighting(cfg)
        max_w = 1.0 if weighting == "uniform" else float(data.counts.max())
        # the ring must hold the largest norm the run can reach: the adaptive norm's cap
        bound = cap if (p.adaptive_quantile is not None and math.isfinite(cap)) else p.clip_norm
        frac = choose_fraction_bits(a.bits, clip_norm=bound, max_weight=max_w, max_clients=capacity,
                                    frac_bits=frac_bits_value(a.frac_bits))
        k = secagg_neighbors(cfg)
        # the complete graph keeps its threefry masks (uploads as before, bit for bit); SecAgg+
        # expands its masks with the counter-mode hash, ~13x cheaper (the decoded sum is the same)
        steps.append(secure_aggregation(bits=a.bits, frac_bits=frac, num_clients=data.num_clients,
                                        dropout_rate=a.dropout_rate, threshold=secagg_threshold(cfg),
                                        neighbors=k, prg="threefry" if k is None else "hash"))
    return chain(*steps)


class Resolved(NamedTuple):
    """Everything a run needs, from one configuration (see :func:`resolve`)."""

    config: Config  # with the values resolved against the data (delta, calibrated noise)
    data: FederatedData
    model: Model
    algorithm: alg_lib.FederatedAlgorithm
    simulator: Any
    accountant: Any  # a privacy accountant, or None without DP


def resolve(cfg: Config, *, out_dir: str) -> Resolved:
    """Config -> data, model, algorithm (with its hyperparameters), mesh and simulator, accountant.

    The one place that maps names to parts (through the registries above).
    """
    data = build_data(cfg, pool_dir=pool_directory(cfg))
    cfg, accountant = privacy_setup(cfg, data.num_clients)
    model = build_model(cfg, data)
    algorithm = build_algorithm(cfg, model, data)
    sim = build_simulator(cfg, data, algorithm, out_dir=out_dir)
    return Resolved(cfg, sim.data, model, algorithm, sim, accountant)
