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


def secagg_threshold(cfg: Config) -> int:
    """Survivors secure aggregation needs to unmask: ``secagg.threshold`` or a majority of the cohort."""
    t = cfg.secagg.threshold
    return int(t) if t is not None else cfg.run.cohort_size // 2 + 1


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
