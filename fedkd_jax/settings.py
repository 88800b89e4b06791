"""Settings derived from a configuration: ``auto`` words resolved, counts parsed.

Pure functions of a config object (any object with the sections of
:class:`fedkd_jax.config.Config`); this module imports no other part of the
package but the errors, so the schema (:mod:`fedkd_jax.config`), the checks
(:mod:`fedkd_jax.validation`) and the plan (:mod:`fedkd_jax.plan`) all read
one definition of each derived value.
"""

from __future__ import annotations

from typing import Any

from fedkd_jax.errors import ConfigError

Config = Any  # a fedkd_jax.config.Config (not imported: that module imports this one)


DEFAULT_NUM_CLIENTS = 50
CLIENT_FORMATS = ("leaf", "tff")  # files that always carry their clients
MAYBE_CLIENT_FORMATS = ("hf", "npz")  # files that carry them when they hold a client column / array


def partition_method(cfg: Config, has_clients: bool | None = None) -> str | None:
    """Resolve ``data.partition=auto``: ``natural`` for data that carries its clients
    (``leaf``, ``tff``; ``hf`` and ``npz`` when ``has_clients``), else ``dirichlet``
    (the bundled data and CIFAR). ``None`` while it depends on a file not yet read."""
    d = cfg.data
    if d.partition != "auto":
        return d.partition
    if d.dataset in CLIENT_FORMATS:
        return "natural"
    if d.dataset in MAYBE_CLIENT_FORMATS:
        return None if has_clients is None else ("natural" if has_clients else "dirichlet")
    return "dirichlet"


def num_clients_value(cfg: Config, partition: str | None) -> int | None:
    """``data.num_clients``; unset, ``None`` (every client) for a natural partition of
    a file and 50 otherwise (Synthetic generates that many)."""
    n = cfg.data.num_clients
    if n is not None:
        return n
    return None if partition == "natural" and cfg.data.dataset != "synthetic" else DEFAULT_NUM_CLIENTS


def compression_method(cfg: Config) -> str:
    """Resolve ``auto``: FedKD's SVD for fedkd, no compression otherwise."""
    m = cfg.compression.method
    return ("svd" if cfg.algorithm == "fedkd" else "none") if m == "auto" else m


def downlink_method(cfg: Config) -> str:
    """Resolve ``auto``: fedkd compresses the global update with its upload method
    (Wu et al. 2022 compress both directions); other algorithms send it dense."""
    m = cfg.compression.downlink
    return (compression_method(cfg) if cfg.algorithm == "fedkd" else "none") if m == "auto" else m


def count_value(value: str | int | None, field: str, *, word: str = "auto", least: int = 1) -> int | None:
    """A setting that is ``word`` (``auto``, ``all``) or an integer ``>= least``, as
    that integer, or ``None`` for ``word``. ``None`` (what older configs wrote for
    the default) also means ``word``.

    Raises:
      ConfigError: naming ``field`` and what it accepts.
    """
    if value is None:
        return None
    text = str(value).strip().lower()
    if text == word:
        return None
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(field, f"{_allowed(word, least)}; got {value!r}") from None
    if n < least:
        raise ConfigError(field, f"{_allowed(word, least)}; got {value!r}")
    return n


def _allowed(word: str, least: int) -> str:
    return f"must be '{word}' or " + ("a positive integer" if least == 1 else f"an integer >= {least}")


def group_size_value(value: str | int, field: str = "run.group_size") -> int | None:
    """``run.group_size`` (or another ``auto``-or-count setting named ``field``) as an
    integer, or ``None`` for ``auto``."""
    if value is None:
        raise ConfigError(field, f"must be 'auto' or a positive integer; got {value!r}")
    return count_value(value, field)


def devices_value(value: str | int | None) -> int | None:
    """``run.devices`` as a count, or ``None`` for ``all``."""
    return count_value(value, "run.devices", word="all")


def frac_bits_value(value: str | int | None) -> int | None:
    """``secagg.frac_bits`` as an integer, or ``None`` for ``auto`` (the finest scale
    that cannot overflow)."""
    return count_value(value, "secagg.frac_bits", least=0)



def sampling_method(cfg: Config) -> str:
    """Resolve ``privacy.sampling=auto``: Poisson cohorts with DP (add-or-remove-one
    accounting needs about half the noise of fixed-size cohorts for the same epsilon),
    fixed-size cohorts otherwise."""
    s = cfg.privacy.sampling
    return ("poisson" if dp_enabled(cfg) else "fixed") if s == "auto" else s



def count_noise(cfg: Config) -> float:
    """Adaptive clipping's noise on the unclipped count: ``privacy.count_stddev`` or cohort / 20."""
    p = cfg.privacy
    return p.count_stddev if p.count_stddev is not None else cfg.run.cohort_size / 20.0


def neighbors_value(value: str | int) -> str | int:
    """``secagg.neighbors`` checked: ``'full'``, ``'auto'`` or an even integer ``>= 2``."""
    text = str(value).strip().lower()
    if text in ("full", "auto"):
        return text
    try:
        k = int(text)
    except ValueError:
        k = -1
    if k < 2 or k % 2 or isinstance(value, bool):
        raise ConfigError("secagg.neighbors", f"must be 'full' (the complete graph, Bonawitz et al.), 'auto' (SecAgg+ "
                                              f"sized for the cohort) or an even integer >= 2 (H(k, n) is k-regular "
                                              f"for every n only for even k); got {value!r}")
    return k


def secagg_neighbors(cfg: Config) -> int | None:
    """The degree ``k`` of SecAgg+'s masking graph, or ``None`` for the complete graph:
    ``secagg.neighbors=full``, or ``auto`` where no sparse graph meets Bell et al.'s
    bounds for the cohort (:mod:`fedkd_jax.privacy.secagg_params`)."""
    v = neighbors_value(cfg.secagg.neighbors)
    if v == "full":
        return None
    if v == "auto":
        from fedkd_jax.privacy.secagg_params import auto_parameters

        p = auto_parameters(cfg.run.cohort_size, cfg.secagg.dropout_rate)
        return None if p is None else p.neighbors
    return int(v)


def secagg_threshold(cfg: Config) -> int:
    """Secure aggregation's threshold: ``secagg.threshold``, or by default, for the complete
    graph, survivors needed to unmask (a majority of the cohort); for SecAgg+, surviving
    neighbours needed to rebuild a key (``auto``: Bell et al.'s ``t``; an integer ``k``:
    a majority of the ``min(k, C - 1)`` neighbours)."""
    t = cfg.secagg.threshold
    if t is not None:
        return int(t)
    k = secagg_neighbors(cfg)
    c = cfg.run.cohort_size
    if k is None:
        return c // 2 + 1
    if neighbors_value(cfg.secagg.neighbors) == "auto":
        from fedkd_jax.privacy.secagg_params import auto_parameters

        return auto_parameters(c, cfg.secagg.dropout_rate).threshold
    return min(k, c - 1) // 2 + 1


def max_clip_norm(cfg: Config) -> float:
    """The adaptive clip norm's cap: ``privacy.max_clip_norm``; by default none, and with
    secure aggregation (whose ring must bound every upload) 100 x the initial norm."""
    p = cfg.privacy
    if p.max_clip_norm is not None:
        return float(p.max_clip_norm)
    if p.adaptive_quantile is not None and cfg.secagg.enabled and p.clip_norm is not None:
        return 100.0 * float(p.clip_norm)
    return float("inf")



def dp_enabled(cfg: Config) -> bool:
    """Whether client-level differential privacy is on (a noise multiplier or a target epsilon)."""
    return cfg.privacy.noise_multiplier is not None or cfg.privacy.target_epsilon is not None
