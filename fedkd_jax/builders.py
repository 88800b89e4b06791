"""Config -> data, model, algorithm. The only place that maps names to parts."""

from __future__ import annotations

from fedkd_jax import algorithms as alg_lib
from fedkd_jax.compression import Compressor, make_compressor
from fedkd_jax.config import Config, compression_method
from fedkd_jax.data import FederatedData, federate, load_dataset
from fedkd_jax.errors import ConfigError
from fedkd_jax.models import Model, make_model


def build_data(cfg: Config) -> FederatedData:
    """Load and federate the configured dataset (deterministic from ``run.seed``)."""
    d = cfg.data
    ds = load_dataset(
        d.dataset,
        path=d.path,
        num_clients=d.num_clients,
        seed=cfg.run.seed,
        synthetic_alpha=d.synthetic_alpha,
        synthetic_beta=d.synthetic_beta,
        max_examples=d.max_examples,
    )
    partition = d.partition
    return federate(
        ds,
        partition=partition,
        num_clients=d.num_clients,
        seed=cfg.run.seed,
        alpha=d.alpha,
        shards_per_client=d.shards_per_client,
        examples_per_client=d.examples_per_client,
        test_fraction=d.test_fraction,
        global_test_fraction=d.global_test_fraction,
        proxy_fraction=d.proxy_fraction,
        min_examples=d.min_examples,
    )


def build_model(cfg: Config, data: FederatedData, *, teacher: bool = False) -> Model:
    """The shared model, or (``teacher=True``) the teacher of fedkd / server_teacher_kd."""
    m = cfg.model
    kind, hidden = (cfg.distill.teacher_kind, cfg.distill.teacher_hidden) if teacher else (m.kind, m.hidden)
    return make_model(
        kind,
        num_features=data.num_features,
        num_classes=data.num_classes,
        hidden=hidden,
        channels=m.channels,
        image_shape=data.image_shape,
    )


def build_algorithm(cfg: Config, model: Model, data: FederatedData) -> alg_lib.FederatedAlgorithm:
    c, s, k = cfg.client, cfg.server, cfg.distill
    client_opt = alg_lib.client_optimizer(c.optimizer, lr=c.lr, momentum=c.momentum)
    server_opt = alg_lib.server_optimizer(s.optimizer, lr=s.lr, momentum=s.momentum, b1=s.b1, b2=s.b2, tau=s.tau)
    local = dict(batch_size=c.batch_size, local_epochs=c.local_epochs, local_steps=c.local_steps)
    distill = dict(distill_steps=k.server_steps, distill_lr=k.server_lr, distill_batch_size=k.server_batch_size)
    name = cfg.algorithm
    if name == "fedavg":
        return alg_lib.fedavg(model, client_opt, server_opt, straggler_fraction=c.straggler_fraction, **local)
    if name == "fedprox":
        return alg_lib.fedprox(model, client_opt, server_opt, mu=cfg.fedprox.mu,
                               straggler_fraction=c.straggler_fraction, **local)
    if name == "fedkd":
        teacher = build_model(cfg, data, teacher=True)
        teacher_opt = alg_lib.client_optimizer(k.teacher_optimizer, lr=k.teacher_lr, momentum=c.momentum)
        return alg_lib.fedkd(model, teacher, client_opt, teacher_opt, server_opt, temperature=k.temperature, **local)
    if name == "server_teacher_kd":
        teacher = build_model(cfg, data, teacher=True)
        return alg_lib.server_teacher_kd(model, teacher, client_opt, server_opt, data.proxy_x,
                                         alpha=k.alpha, temperature=k.temperature, **local, **distill)
    if name == "feddf":
        return alg_lib.feddf(model, client_opt, server_opt, data.proxy_x, temperature=k.temperature, **local, **distill)
    raise ConfigError("algorithm", f"unknown algorithm {name!r}; allowed: {', '.join(alg_lib.ALGORITHMS)}")


def build_compressor(cfg: Config) -> Compressor | None:
    z = cfg.compression
    return make_compressor(compression_method(cfg), rounds=z.schedule_rounds or cfg.run.rounds, energy_start=z.energy_start,
                           energy_end=z.energy_end, topk_fraction=z.topk_fraction)
