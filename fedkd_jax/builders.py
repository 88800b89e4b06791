"""Config -> data, model, algorithm. The only place that maps names to parts."""

from __future__ import annotations

from fedkd_jax import algorithms as alg_lib
from fedkd_jax.config import Config
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
        min_examples=d.min_examples,
    )


def build_model(cfg: Config, data: FederatedData) -> Model:
    m = cfg.model
    return make_model(
        m.kind,
        num_features=data.num_features,
        num_classes=data.num_classes,
        hidden=m.hidden,
        channels=m.channels,
        image_shape=data.image_shape,
    )


def build_algorithm(cfg: Config, model: Model) -> alg_lib.FederatedAlgorithm:
    c, s = cfg.client, cfg.server
    client_opt = alg_lib.client_optimizer(c.optimizer, lr=c.lr, momentum=c.momentum)
    server_opt = alg_lib.server_optimizer(s.optimizer, lr=s.lr, momentum=s.momentum, b1=s.b1, b2=s.b2, tau=s.tau)
    if cfg.algorithm == "fedavg":
        return alg_lib.fedavg(
            model, client_opt, server_opt,
            batch_size=c.batch_size, local_epochs=c.local_epochs, local_steps=c.local_steps,
        )
    raise ConfigError("algorithm", f"unknown algorithm {cfg.algorithm!r}; allowed: {', '.join(alg_lib.ALGORITHMS)}")
