"""Range and choice checks of a :class:`~fedkd_jax.config.Config`.

:func:`validate` runs after OmegaConf's type checks, before any data is
loaded or anything compiled; each error is a
:class:`~fedkd_jax.errors.ConfigError` naming ``section.key`` and what is
allowed. Cross-field rules (privacy with secure aggregation, proxies with
the algorithms that use them, ...) live here too.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Sequence

from fedkd_jax.algorithms import ADAPTIVE_FORMS, ALGORITHMS, CLIENT_OPTIMIZERS, SERVER_OPTIMIZERS
from fedkd_jax.aggregation import WEIGHTINGS
from fedkd_jax.compression import COMPRESSIONS
from fedkd_jax.settings import (
    count_noise,
    devices_value,
    dp_enabled,
    frac_bits_value,
    group_size_value,
    neighbors_value,
    num_clients_value,
    partition_method,
    sampling_method,
    secagg_neighbors,
    secagg_threshold,
)
from fedkd_jax.data import DATASETS, PARTITIONS, PROXY_SOURCES, TASKS
from fedkd_jax.engine.pool import POOLS
from fedkd_jax.engine.simulator import STRAGGLER_MODES
from fedkd_jax.errors import ConfigError
from fedkd_jax.models import MODELS
from fedkd_jax.paths import check_npz, check_writable_dir
from fedkd_jax.store import STORES

if TYPE_CHECKING:  # the schema imports this module (config.validate); this one needs only its type
    from fedkd_jax.config import Config


MAX_DELTA = 0.1  # a larger delta is no privacy guarantee at all


def _choice(field_name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(field_name, f"unknown value {value!r}; allowed: {', '.join(allowed)}")


def _positive(field_name: str, value: float | int | None, *, integer: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(field_name, f"must be {kind}; got {value}")


def _fraction(field_name: str, value: float, *, upper_open: bool = True) -> None:
    if not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        raise ConfigError(field_name, f"must be in [0, 1); got {value}")


def _validate_privacy(cfg: Config) -> None:
    from fedkd_jax.privacy.accounting import check
    from fedkd_jax.privacy.dp import check_count_budget

    p, a = cfg.privacy, cfg.secagg
    _choice("privacy.sampling", p.sampling, ("auto", "fixed", "poisson"))
    check(delta=p.delta, target_epsilon=p.target_epsilon, noise_multiplier=p.noise_multiplier,
          clip_norm=p.clip_norm, sampling=sampling_method(cfg), accountant=p.accountant)
    if p.delta is not None and p.delta >= MAX_DELTA:
        raise ConfigError("privacy.delta", f"{p.delta:g} lets the guarantee fail with probability {p.delta:g} (a "
                                           f"mechanism may then reveal a client entirely); it must be below "
                                           f"{MAX_DELTA:g}, and is usually at most 1/N: min(1e-5, 1/N), the default")
    if dp_enabled(cfg) and p.clip_norm is None:
        raise ConfigError("privacy.clip_norm", "differential privacy needs a clip norm S (the noise is z * S); "
                                               "e.g. privacy.clip_norm=1.0, or 0.1 with adaptive clipping")
    if dp_enabled(cfg) and not math.isfinite(p.clip_norm):
        raise ConfigError("privacy.clip_norm", f"differential privacy needs a finite clip norm (the noise is z * S, "
                                               f"infinite with S = {p.clip_norm}); e.g. privacy.clip_norm=1.0")
    if p.adaptive_quantile is not None and not 0 < p.adaptive_quantile < 1:
        raise ConfigError("privacy.adaptive_quantile", f"must be in (0, 1); got {p.adaptive_quantile}")
    if p.adaptive_quantile is not None and not dp_enabled(cfg):
        raise ConfigError("privacy.adaptive_quantile", "adaptive clipping is part of DP: set privacy.noise_multiplier")
    _positive("privacy.adaptive_lr", p.adaptive_lr)
    _positive("privacy.count_stddev", p.count_stddev, allow_none=True)
    _positive("privacy.max_clip_norm", p.max_clip_norm, allow_none=True)
    _positive("privacy.logit_weight", p.logit_weight)
    if p.max_clip_norm is not None and p.clip_norm is not None and p.max_clip_norm < p.clip_norm:
        raise ConfigError("privacy.max_clip_norm", f"must be at least privacy.clip_norm ({p.clip_norm:g}), the "
                                                   f"initial norm; got {p.max_clip_norm:g}")
    if p.adaptive_quantile is not None and p.noise_multiplier is not None:
        check_count_budget(p.noise_multiplier, count_noise(cfg))
    if dp_enabled(cfg) and cfg.client.weighting == "examples":
        raise ConfigError("client.weighting", "DP-FedAvg sums clipped updates with equal weight and divides by the "
                                              "expected cohort size; use auto or uniform with privacy")
    if not 0 <= a.dropout_rate < 1:
        raise ConfigError("secagg.dropout_rate", f"must be in [0, 1); got {a.dropout_rate}")
    if not 8 <= a.bits <= 32:
        raise ConfigError("secagg.bits", f"must be in [8, 32]; got {a.bits}")
    frac_bits_value(a.frac_bits)
    neighbors_value(a.neighbors)
    if a.enabled:
        if cfg.algorithm in ("feddf", "server_teacher_kd"):
            raise ConfigError("secagg.enabled", f"{cfg.algorithm} distils the ensemble of each client's model on the "
                                                "server, but secure aggregation reveals only the sum of the uploads; "
                                                "use fedavg, fedprox or fedkd")
        if p.clip_norm is None or not math.isfinite(p.clip_norm):
            raise ConfigError("secagg.enabled", "secure aggregation needs a bound on every upload so the sum cannot "
                                                "overflow the ring: set a finite privacy.clip_norm")
        c = cfg.run.cohort_size
        if c < 2:
            raise ConfigError("run.cohort_size", "secure aggregation needs at least 2 clients per round (one "
                                                 "client's masked sum is its update in the clear); got 1")
        k, t = secagg_neighbors(cfg), secagg_threshold(cfg)
        if k is None and not 2 <= t <= c:
            raise ConfigError("secagg.threshold", f"must be in [2, run.cohort_size = {c}] (survivors needed to "
                                                  f"unmask the sum); got {t}")
        if k is not None and not 2 <= t <= min(k, c - 1):
            raise ConfigError("secagg.threshold", f"must be in [2, {min(k, c - 1)}] with SecAgg+'s {k} neighbours "
                                                  f"per client (surviving neighbours needed to rebuild a key; "
                                                  f"secagg.neighbors=full for survivors of the whole cohort); got {t}")


# Where each dataset's files come from (data.path), for the error when it is missing.
_PATH_NEEDED = {
    "npz": "FILE.npz holding arrays x and y",
    "leaf": "a LEAF .json file, a directory of them, or a directory with train/ and test/",
    "tff": "a TFF .sqlite file, a *_train.h5 or FedJAX *_train.sqlite file, or a directory with one",
    "hf": "a datasets save_to_disk directory, a .parquet file or directory, or a directory of saved partitions",
}
TOKEN_DATASETS = ("leaf", "tff", "npz")  # the datasets that can hold next-token sequences
LABEL_PARTITIONS = ("dirichlet", "dirichlet_balanced", "dirichlet_client", "shards")


def _validate_data_source(cfg: Config) -> None:
    """The dataset, its path, its task and the partition it allows."""
    d = cfg.data
    _choice("data.dataset", d.dataset, DATASETS)
    _choice("data.task", d.task, TASKS)
    _choice("data.pool", d.pool, POOLS)
    if d.pool_dir is not None:
        if d.pool in ("device", "host"):
            raise ConfigError("data.pool_dir", f"is where data.pool=disk (or auto) keeps its pool files; data.pool="
                                               f"{d.pool} keeps none (leave it unset)")
        check_writable_dir("data.pool_dir", os.path.expanduser(d.pool_dir))
    _choice("data.partition", d.partition, PARTITIONS + ("auto",))
    if d.dataset in _PATH_NEEDED and not d.path:
        raise ConfigError("data.path", f"dataset {d.dataset!r} needs data.path={_PATH_NEEDED[d.dataset]}")
    if d.dataset == "npz":
        check_npz("data.path", d.path)
    elif d.path and d.dataset in ("leaf", "tff", "hf", "cifar10", "cifar100") and not os.path.exists(os.path.expanduser(d.path)):
        raise ConfigError("data.path", f"no such file or directory: {d.path!r}")
    if d.proxy == "npz" and d.proxy_path:
        check_npz("data.proxy_path", d.proxy_path)
    natural_ok = ("synthetic", "npz", "leaf", "tff", "hf")
    if d.partition == "natural" and d.dataset not in natural_ok:
        raise ConfigError("data.partition", f"'natural' needs a dataset with client ids ({', '.join(natural_ok)}); "
                                            f"{d.dataset!r} has none")
    if d.task == "next_token":
        if d.dataset not in TOKEN_DATASETS:
            raise ConfigError("data.task", f"next_token needs token sequences: leaf or tff (Shakespeare, Stack "
                                           f"Overflow) or npz with y [n, L]; {d.dataset!r} holds class labels")
        if d.partition in LABEL_PARTITIONS:
            raise ConfigError("data.partition", f"{d.partition!r} splits by class label, but next-token data has a "
                                                "label per token; use natural, iid or quantity")
        if d.proxy not in ("holdout", "npz"):
            raise ConfigError("data.proxy", f"{d.proxy!r} is image data; a next-token task distils on token "
                                            "sequences: use holdout (or npz with token ids x)")
    if (d.vocab_size is not None or d.seq_len is not None) and d.dataset not in ("leaf", "tff"):
        key = "data.vocab_size" if d.vocab_size is not None else "data.seq_len"
        raise ConfigError(key, f"applies to the text data of leaf and tff; {d.dataset!r} has none (leave it unset)")
    if d.client_column is not None and d.dataset != "hf":
        raise ConfigError("data.client_column", f"names the client column of dataset 'hf'; {d.dataset!r} has "
                                                "none (leave it unset)")
    _positive("data.vocab_size", d.vocab_size, integer=True, allow_none=True)
    _positive("data.seq_len", d.seq_len, integer=True, allow_none=True)


def validate(cfg: Config) -> None:
    """Check choices and ranges; raise :class:`ConfigError` naming the first bad field."""
    _choice("algorithm", cfg.algorithm, ALGORITHMS)
    d = cfg.data
    _validate_data_source(cfg)
    _positive("data.num_clients", d.num_clients, integer=True, allow_none=True)
    _positive("data.alpha", d.alpha)
    _positive("data.shards_per_client", d.shards_per_client, integer=True)
    _positive("data.examples_per_client", d.examples_per_client, integer=True, allow_none=True)
    _positive("data.min_examples", d.min_examples, integer=True, allow_none=True)
    _fraction("data.test_fraction", d.test_fraction)
    _fraction("data.global_test_fraction", d.global_test_fraction)
    _fraction("data.proxy_fraction", d.proxy_fraction)
    _choice("data.proxy", d.proxy, PROXY_SOURCES)
    _positive("data.proxy_size", d.proxy_size, integer=True)
    if d.proxy == "npz" and not d.proxy_path:
        raise ConfigError("data.proxy_path", "data.proxy=npz needs data.proxy_path=FILE.npz holding an array x")
    if cfg.algorithm in ("feddf", "server_teacher_kd") and d.proxy == "holdout" and d.proxy_fraction <= 0:
        raise ConfigError("data.proxy_fraction", f"{cfg.algorithm} distils on an unlabeled proxy set; set it in (0, 1), "
                                                 "e.g. 0.1, or use an out-of-domain data.proxy")
    if cfg.algorithm == "server_teacher_kd" and cfg.distill.teacher_warmup == "labeled" and d.proxy != "holdout":
        raise ConfigError("distill.teacher_warmup", "'labeled' trains the teacher on the labeled held-out proxy; "
                                                    "it needs data.proxy=holdout (or use 'rounds')")
    for name in ("synthetic_alpha", "synthetic_beta"):
        v = getattr(d, name)
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"data.{name}", f"must be a finite number >= 0; got {v}")
    _positive("data.max_examples", d.max_examples, integer=True, allow_none=True)
    _positive("data.max_examples_per_client", d.max_examples_per_client, integer=True, allow_none=True)

    m = cfg.model
    _choice("model.kind", m.kind, MODELS)
    for i, h in enumerate(m.hidden):
        _positive(f"model.hidden[{i}]", h, integer=True)
    for i, c in enumerate(m.channels):
        _positive(f"model.channels[{i}]", c, integer=True)
    _positive("model.width", m.width)

    from fedkd_jax.hetero.build import check_groups

    check_groups(cfg)

    c = cfg.client
    _choice("client.optimizer", c.optimizer, CLIENT_OPTIMIZERS)
    _positive("client.lr", c.lr)
    _positive("client.batch_size", c.batch_size, integer=True)
    _positive("client.local_epochs", c.local_epochs, integer=True)
    _positive("client.local_steps", c.local_steps, integer=True, allow_none=True)
    if not 0 <= c.momentum < 1:
        raise ConfigError("client.momentum", f"must be in [0, 1); got {c.momentum}")
    if not 0 <= c.straggler_fraction <= 1:
        raise ConfigError("client.straggler_fraction", f"must be in [0, 1]; got {c.straggler_fraction}")
    _choice("client.straggler_mode", c.straggler_mode, STRAGGLER_MODES)
    _choice("client.weighting", c.weighting, ("auto",) + WEIGHTINGS)
    if c.straggler_fraction > 0 and cfg.algorithm not in ("fedavg", "fedprox"):
        raise ConfigError("client.straggler_fraction",
                          f"stragglers are simulated for fedavg (dropped) and fedprox (kept); {cfg.algorithm} needs 0")

    k = cfg.distill
    _positive("distill.temperature", k.temperature)
    if not 0 <= k.alpha <= 1:
        raise ConfigError("distill.alpha", f"must be in [0, 1]; got {k.alpha}")
    _choice("distill.teacher_kind", k.teacher_kind, MODELS)
    for i, h in enumerate(k.teacher_hidden):
        _positive(f"distill.teacher_hidden[{i}]", h, integer=True)
    _positive("distill.teacher_width", k.teacher_width)
    _choice("distill.teacher_optimizer", k.teacher_optimizer, CLIENT_OPTIMIZERS)
    _positive("distill.teacher_lr", k.teacher_lr)
    _positive("distill.server_steps", k.server_steps, integer=True)
    _positive("distill.server_lr", k.server_lr)
    _positive("distill.server_batch_size", k.server_batch_size, integer=True)
    _choice("distill.server_schedule", k.server_schedule, ("cosine", "constant"))
    _fraction("distill.val_fraction", k.val_fraction)
    _positive("distill.patience", k.patience, integer=True)
    _positive("distill.val_every", k.val_every, integer=True)
    _choice("distill.teacher_warmup", k.teacher_warmup, ("rounds", "labeled"))
    if not (isinstance(k.warmup_rounds, int) and k.warmup_rounds >= 0):
        raise ConfigError("distill.warmup_rounds", f"must be an integer >= 0; got {k.warmup_rounds}")
    _positive("distill.warmup_steps", k.warmup_steps, integer=True)
    if not (math.isfinite(cfg.fedprox.mu) and cfg.fedprox.mu >= 0):
        raise ConfigError("fedprox.mu", f"must be a finite number >= 0; got {cfg.fedprox.mu}")

    z = cfg.compression
    _choice("compression.method", z.method, ("auto",) + COMPRESSIONS)
    _choice("compression.downlink", z.downlink, ("auto",) + COMPRESSIONS)
    _positive("compression.schedule_rounds", z.schedule_rounds, integer=True, allow_none=True)
    for name in ("energy_start", "energy_end", "topk_fraction"):
        v = getattr(z, name)
        if not 0 < v <= 1:
            raise ConfigError(f"compression.{name}", f"must be in (0, 1]; got {v}")

    s = cfg.server
    _choice("server.optimizer", s.optimizer, SERVER_OPTIMIZERS)
    _choice("server.adaptive_form", s.adaptive_form, ADAPTIVE_FORMS)
    _positive("server.lr", s.lr, allow_none=True)
    _positive("server.tau", s.tau, allow_none=True)
    for name in ("momentum", "b1", "b2"):
        v = getattr(s, name)
        if v is not None and not 0 <= v < 1:
            raise ConfigError(f"server.{name}", f"must be in [0, 1); got {v}")

    _validate_privacy(cfg)
    r = cfg.run
    _positive("run.rounds", r.rounds, integer=True)
    _positive("run.cohort_size", r.cohort_size, integer=True)
    partition = partition_method(cfg)
    n = num_clients_value(cfg, partition)
    if partition not in (None, "natural") and r.cohort_size > n:
        raise ConfigError("run.cohort_size", f"must be at most data.num_clients ({n}); got {r.cohort_size}")
    _positive("run.eval_every", r.eval_every, integer=True)
    _positive("run.rounds_per_dispatch", r.rounds_per_dispatch, integer=True)
    _positive("run.checkpoint_every", r.checkpoint_every, integer=True)
    _positive("run.keep_checkpoints", r.keep_checkpoints, integer=True)
    devices_value(r.devices)
    group_size_value(r.group_size)
    group_size_value(r.runs_per_device, "run.runs_per_device")
    _choice("run.client_store", r.client_store, STORES)
    _positive("run.memory_budget_gb", r.memory_budget_gb, allow_none=True)
    _positive("run.eval_clients", r.eval_clients, integer=True, allow_none=True)
    _positive("run.eval_personal_clients", r.eval_personal_clients, integer=True, allow_none=True)
    _choice("run.log_to", r.log_to, ("files", "tensorboard"))
    if not 0 <= r.seed < 2**31:
        raise ConfigError("run.seed", f"must be in [0, 2^31); got {r.seed}")
