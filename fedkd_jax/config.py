"""Typed experiment configuration: dataclasses, YAML files and dotted overrides.

OmegaConf (a maintained library) does the parsing, merging and type checks:
``OmegaConf.structured`` rejects unknown keys and mistyped values;
:func:`validate` then checks ranges and choices. Every error is a
:class:`~fedkd_jax.errors.ConfigError` naming ``section.key`` and what is
allowed, raised before any data is loaded or anything compiled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fedkd_jax.algorithms import server_settings
from fedkd_jax.errors import ConfigError
from fedkd_jax.paths import check_input_file
from fedkd_jax.settings import (  # noqa: F401 - re-exported: derived settings live in fedkd_jax.settings
    _allowed,
    compression_method,
    count_noise,
    count_value,
    devices_value,
    downlink_method,
    dp_enabled,
    frac_bits_value,
    group_size_value,
    max_clip_norm,
    neighbors_value,
    num_clients_value,
    partition_method,
    sampling_method,
    secagg_neighbors,
    secagg_threshold,
)


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits | mnist5k | synthetic | npz | leaf | tff | hf | cifar10 | cifar100
    path: Optional[str] = None  # the file or directory read by npz, leaf, tff, hf (cifar10/100: where the batches are)
    task: str = "classification"  # classification | next_token (token sequences: Shakespeare, Stack Overflow)
    # auto: natural where the data carries its clients (leaf, tff; hf and npz with client ids), else dirichlet
    partition: str = "auto"  # iid | dirichlet (per class) | dirichlet_client (Hsu) | shards | quantity | natural | auto
    num_clients: Optional[int] = None  # N (unset: every client of a natural partition, else 50)
    alpha: float = 0.5  # Dirichlet concentration (dirichlet label skew, quantity skew)
    shards_per_client: int = 2  # shards partition: classes-ish per client
    examples_per_client: Optional[int] = None  # iid: fixed size, resampled if N*size > pool; dirichlet_client: size
    # dirichlet/dirichlet_balanced/quantity: redraw until every client has this many
    # (unset: 10 for dirichlet_balanced, NIID-Bench's min_require_size; 2 otherwise)
    min_examples: Optional[int] = None
    max_examples_per_client: Optional[int] = None  # keep at most this many training rows per client (seeded choice)
    test_fraction: float = 0.2  # each client's local test split (not used where the file has its own test split)
    global_test_fraction: float = 0.2  # held out before partitioning (not for natural)
    proxy_fraction: float = 0.0  # unlabeled proxy rows held out for feddf / server_teacher_kd
    proxy: str = "holdout"  # holdout (proxy_fraction of the pool) | digits | mnist5k | noise | npz (out-of-domain)
    proxy_path: Optional[str] = None  # proxy=npz: a .npz with array x (labels ignored)
    proxy_size: int = 1000  # rows of an out-of-domain proxy (digits, mnist5k, noise)
    synthetic_alpha: float = 1.0  # FedProx Synthetic(alpha, beta)
    synthetic_beta: float = 1.0
    max_examples: Optional[int] = None  # synthetic: cap on a client's size
    vocab_size: Optional[int] = None  # word vocabulary of Stack Overflow / Sent140 (unset: 10,000)
    seq_len: Optional[int] = None  # tokens per sequence (unset: 80 Shakespeare, 20 Stack Overflow)
    client_column: Optional[str] = None  # hf: the client column (unset: client_id, user_id, ... whichever exists)
    # pooled examples: device (replicated) | host (each dispatch's rows placed) | disk (memory-mapped pool file,
    # token ids in a narrow integer type) | auto (device, else host, else disk, by run.memory_budget_gb)
    pool: str = "auto"
    # disk pool: where the pool files live (unset: $FEDKD_POOL_DIR, else ~/.cache/fedkd_jax/pools, shared by runs).
    # A file-read dataset's pool file is keyed by the source files' paths, sizes and times and the read options,
    # and later runs reuse it: the files are decoded once
    pool_dir: Optional[str] = None


@dataclass
class GroupConfig:
    """One architecture group of a heterogeneous population (``model.groups``)."""

    kind: Optional[str] = None  # any model.kind (unset: model.kind; heterofl/fedrolex: must be model.kind)
    hidden: Optional[List[int]] = None  # mlp widths / cnn dense width (unset: model.hidden)
    channels: Optional[List[int]] = None  # cnn conv channels (unset: model.channels)
    width: float = 1.0  # multiplier of every hidden width (heterofl/fedrolex: the sub-model's ratio, in (0, 1])
    share: Optional[float] = None  # share of the population (groups with shares sum to 1)
    clients: Optional[List[int]] = None  # or explicit client ids
    name: Optional[str] = None  # label in metrics and plots (default g0, g1, ...)


@dataclass
class ModelConfig:
    # mlp | cnn | femnist_cnn | femnist_cnn_dropout | resnet18_gn | char_lstm | nwp_lstm | transformer
    kind: str = "mlp"
    hidden: List[int] = field(default_factory=lambda: [64])  # MLP widths; CNN dense width
    channels: List[int] = field(default_factory=lambda: [16, 32])  # CNN conv channels
    width: float = 1.0  # reference models: multiplier of every hidden width (1 = the papers' sizes)
    # heterogeneous clients: architecture groups (fd, fedproto; fedkd: each group's private teacher)
    groups: List[GroupConfig] = field(default_factory=list)
    proto_dim: Optional[int] = None  # fedproto: shared prototype width (unset: the models' common feature width)


@dataclass
class ClientConfig:
    optimizer: str = "sgd"  # sgd | momentum | adam
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 10
    local_epochs: int = 1
    local_steps: Optional[int] = None  # fixed steps per round instead of epochs
    straggler_fraction: float = 0.0  # cohort share stopping early (fedavg drops, fedprox keeps)
    straggler_mode: str = "fixed"  # fixed: exactly C - round(C*(1-f)) stragglers, work < full (FedProx) | bernoulli: old draw
    weighting: str = "auto"  # aggregation weights: auto (uniform for fedkd, else examples) | examples | uniform


@dataclass
class ServerConfig:
    optimizer: str = "fedavg"  # fedavg | fedavgm | fedadam | fedyogi
    # unset: the optimizer's defaults (Reddi et al. 2021; see README and algorithms.SERVER_DEFAULTS)
    lr: Optional[float] = None
    momentum: Optional[float] = None
    b1: Optional[float] = None
    b2: Optional[float] = None
    tau: Optional[float] = None
    # fedadam/fedyogi: reddi (Algorithm 2: no bias correction, m0 = 0, v0 = tau^2) | optax (optax.adam/yogi)
    adaptive_form: str = "reddi"


@dataclass
class DistillConfig:
    temperature: float = 1.0  # softmax temperature of every KD term
    alpha: float = 0.5  # server_teacher_kd: alpha * CE + (1 - alpha) * T^2 * KL
    teacher_kind: str = "mlp"  # fedkd private teachers / server teacher
    teacher_hidden: List[int] = field(default_factory=lambda: [128, 128])
    teacher_width: float = 1.0  # reference-model teachers: width multiplier
    teacher_optimizer: str = "sgd"  # fedkd private teachers (state persists per client)
    teacher_lr: float = 0.05
    server_steps: int = 50  # feddf / server_teacher_kd: distillation steps per round (feddf: the most)
    server_lr: float = 1e-3  # their Adam learning rate
    server_batch_size: int = 64
    server_schedule: str = "cosine"  # feddf: cosine-annealed (Lin et al. 2020) | constant
    val_fraction: float = 0.1  # feddf: proxy share held out to early-stop distillation (0: fixed budget)
    patience: int = 2  # feddf: validation checks without improvement before stopping
    val_every: int = 10  # feddf: distillation steps between validation checks
    teacher_warmup: str = "rounds"  # server_teacher_kd: rounds (clients use CE only meanwhile) | labeled
    warmup_rounds: int = 10  # server_teacher_kd: teacher updates before clients distil from it
    warmup_steps: int = 200  # server_teacher_kd, labeled: Adam steps on the labeled proxy before round 0
    fd_beta: float = 1.0  # fd: weight of the distillation term towards the global per-label logits
    proto_lambda: float = 1.0  # fedproto: weight of the distance to the global class prototype
    public_subset: int = 5000  # fedmd: public rows each round's consensus covers (at most the proxy set)
    public_epochs: int = 1  # fedmd: transfer-learning epochs on the labeled public set before any round
    digest_epochs: int = 1  # fedmd: epochs towards the consensus per round (batch distill.server_batch_size)


@dataclass
class FedProxConfig:
    mu: float = 0.01  # proximal weight


@dataclass
class CompressionConfig:
    method: str = "auto"  # auto (svd for fedkd, else none) | none | svd | topk | quant8
    downlink: str = "auto"  # server->client update: auto (svd for fedkd, else none) | none | svd | topk | quant8
    energy_start: float = 0.95  # svd: energy kept at round 0 ...
    energy_end: float = 0.98  # ... rising linearly to this at the last round
    topk_fraction: float = 0.1  # topk: share of entries kept per tensor
    schedule_rounds: Optional[int] = None  # svd schedule horizon (default: run.rounds when the run starts)


@dataclass
class PrivacyConfig:
    noise_multiplier: Optional[float] = None  # z; set it (or target_epsilon) to turn on client-level DP
    clip_norm: Optional[float] = None  # S (the initial norm with adaptive clipping); needed with DP
    delta: Optional[float] = None  # default min(1e-5, 1/N)
    sampling: str = "auto"  # auto (poisson with DP, else fixed) | fixed (C of N, replace-one) | poisson (add-or-remove-one)
    target_epsilon: Optional[float] = None  # stop at the last round within budget (calibrates z if unset)
    adaptive_quantile: Optional[float] = None  # unset: fixed clipping; e.g. 0.5 (Andrew et al. 2021)
    adaptive_lr: float = 0.2
    count_stddev: Optional[float] = None  # noise on the unclipped count (default cohort / 20)
    max_clip_norm: Optional[float] = None  # cap on the adaptive clip norm (default: none; with secagg 100 x clip_norm)
    accountant: str = "rdp"  # rdp | pld (pld needs poisson sampling)
    secure_noise: bool = False  # draw DP noise from OS entropy (not reproducible; resume continues with fresh noise)
    log_raw_norm: bool = False  # also log the mean un-noised update norm (analyst-only, not covered by epsilon)
    logit_weight: float = 1.0  # feddf / server_teacher_kd: weight of the uploaded logit differences in DP's joint clip


@dataclass
class SecAggConfig:
    enabled: bool = False
    dropout_rate: float = 0.0  # share of the cohort dropping after masking
    threshold: Optional[int] = None  # full: survivors needed to unmask (default a majority); SecAgg+: surviving neighbours per key
    bits: int = 32  # the ring Z_(2^bits)
    frac_bits: Optional[Union[int, str]] = "auto"  # fixed-point scale 2^frac_bits: auto (the finest that cannot overflow) or an integer >= 0
    neighbors: Union[int, str] = "auto"  # masking graph: full (Bonawitz et al.) | auto (SecAgg+, k from the cohort) | even k >= 2


@dataclass
class RunConfig:
    rounds: int = 500
    cohort_size: int = 10
    seed: int = 0
    eval_every: int = 10
    rounds_per_dispatch: int = 10  # rounds compiled into one lax.scan dispatch
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    devices: Optional[Union[int, str]] = "all"  # devices on the clients mesh: all (CPU: one per core) or an integer
    group_size: str = "auto"  # clients vmapped together per device: auto (1 on CPU, wider on GPU/TPU) or an integer
    runs_per_device: str = "auto"  # sweeps: runs vmapped together per device: auto (1 on CPU, by memory on GPU/TPU) or an integer
    progress: bool = True
    client_store: str = "auto"  # per-client state: auto | device | host | disk
    memory_budget_gb: Optional[float] = None  # for client_store=auto (default: half the machine's memory)
    store_dir: Optional[str] = None  # disk store directory (default: <run dir>/client-store)
    eval_clients: Optional[int] = 10000  # per-client accuracy on at most this many clients (a fixed sample)
    eval_personal_clients: Optional[int] = 1000  # personal models (FedKD teachers): a fixed sub-sample of those
    log_to: str = "files"  # files (metrics.jsonl/.csv, plot) | tensorboard (also TensorBoard event files)


@dataclass
class Config:
    algorithm: str = "fedkd"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    fedprox: FedProxConfig = field(default_factory=FedProxConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    run: RunConfig = field(default_factory=RunConfig)


# Word-or-integer settings: (section, key, word, least integer). Older configs
# (and saved runs) wrote null for their default; it loads as the word.
_WORD_OR_COUNT = (("run", "devices", "all", 1), ("secagg", "frac_bits", "auto", 0))


def _null_as_word(cfg: Config) -> Config:
    for section, key, word, _ in _WORD_OR_COUNT:
        sub = getattr(cfg, section)
        if getattr(sub, key) is None:
            setattr(sub, key, word)
    return cfg


def resolve_defaults(cfg: Config) -> Config:
    """Fill settings whose default depends on other settings (the server
    optimizer's ``lr``, ``momentum``, ``b1``, ``b2``, ``tau``; the cohort
    sampling), so the saved config records the values a run used."""
    s = cfg.server
    h = server_settings(s.optimizer, lr=s.lr, momentum=s.momentum, b1=s.b1, b2=s.b2, tau=s.tau)
    privacy = dataclasses.replace(cfg.privacy, sampling=sampling_method(cfg))
    # data.partition=auto stays auto only where it depends on the file (hf, npz)
    data = dataclasses.replace(cfg.data, partition=partition_method(cfg) or cfg.data.partition)
    return dataclasses.replace(cfg, server=dataclasses.replace(s, **h), privacy=privacy, data=data)


def _sections() -> dict[str, list[str]]:
    return {f.name: [g.name for g in dataclasses.fields(f.default_factory())] for f in dataclasses.fields(Config) if f.name != "algorithm"}


def _key_error(e: OmegaConfBaseException) -> ConfigError:
    key = str(getattr(e, "full_key", "") or getattr(e, "key", "") or "config")
    section = key.split(".")[0]
    sections = _sections()
    if isinstance(e, ConfigKeyError) or "not in" in str(e):
        if section in sections and "." in key:
            return ConfigError(key, f"unknown key; allowed keys in '{section}': {', '.join(sections[section])}")
        return ConfigError(key, f"unknown key; allowed top-level keys: algorithm, {', '.join(sections)}")
    msg = str(e).splitlines()[0]
    for section, name, word, least in _WORD_OR_COUNT:  # a float or bool: say what the key takes
        if key == f"{section}.{name}":
            return ConfigError(key, f"{_allowed(word, least)}; {msg}")
    if key == "secagg.neighbors":
        return ConfigError(key, f"must be 'full', 'auto' or an even integer >= 2; {msg}")
    return ConfigError(key, msg)


def load_config(path: str | None = None, overrides: Sequence[str] = (), *, base: str | None = None) -> Config:
    """Defaults (or a saved run's ``config.json`` as ``base``), then a YAML file, then
    ``section.key=value`` overrides; validated.

    Raises:
      ConfigError: unknown key, wrong type or value out of range.
    """
    try:
        cfg = OmegaConf.structured(Config)
        for field_name, file in (("run_dir", base), ("--config", path)):
            if not file:
                continue
            check_input_file(field_name, file, what="YAML/JSON config file")
            try:
                loaded = OmegaConf.load(file)
            except FileNotFoundError:
                raise ConfigError(field_name, f"no such file: {file!r}") from None
            except Exception as e:  # YAML/JSON syntax errors
                raise ConfigError(field_name, f"{file!r} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
            if not isinstance(loaded, DictConfig):
                raise ConfigError(field_name, f"{file!r} must hold a mapping of sections (data:, model:, ...)")
            if field_name == "run_dir":
                loaded = upgrade_saved(loaded)
            cfg = OmegaConf.merge(cfg, loaded)
        for item in overrides:
            if "=" not in item:
                raise ConfigError("--set", f"expected section.key=value; got {item!r}")
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        obj = _null_as_word(OmegaConf.to_object(cfg))
    except OmegaConfBaseException as e:
        raise _key_error(e) from None
    validate(obj)
    return obj


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"run": {"rounds": 5}}`` -> ``{"run.rounds": 5}``."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def upgrade_saved(d: Any) -> Any:
    """A run's saved ``config.json`` (a dict or DictConfig) read with today's keys.

    Runs saved before ``server.adaptive_form`` existed used optax's FedAdam /
    FedYogi, so they resume with ``optax`` rather than the new default; their
    ``data.min_examples: 2`` is today's unset value for their partition. Runs
    saved before ``secagg.neighbors`` existed masked over the complete graph:
    they resume with ``full``.
    """
    secagg = d.get("secagg") if hasattr(d, "get") else None
    if secagg is not None and "neighbors" not in secagg:  # saved before SecAgg+: the complete graph
        secagg["neighbors"] = "full"
    server = d.get("server") if hasattr(d, "get") else None
    if server is not None and "adaptive_form" not in server:  # saved before these keys changed
        server["adaptive_form"] = "optax"
        data = d.get("data")
        # data.min_examples was 2 for every partition then; unset means the same for all of them
        if data is not None and data.get("min_examples") == 2:
            data["min_examples"] = None
    return d


def from_dict(d: dict[str, Any]) -> Config:
    try:
        return _null_as_word(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(d))))
    except OmegaConfBaseException as e:
        raise _key_error(e) from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))



def validate(cfg: Config) -> None:
    """Range, choice and cross-field checks (see :mod:`fedkd_jax.validation`)."""
    from fedkd_jax.validation import validate as check

    check(cfg)
