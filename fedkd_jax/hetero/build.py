"""``model.groups`` -> the groups' models, each client's group, and the heterogeneous algorithm.

Validation (:func:`check_groups`) runs with the rest of the config's, before
any data is loaded or anything compiled.
"""

from __future__ import annotations

import math

import numpy as np

from fedkd_jax.errors import ConfigError

# algorithms whose clients may differ in architecture, and what each group entry describes
HETERO_ALGORITHMS = {"fd": "the client's model", "fedproto": "the client's model", "fedmd": "the client's model",
                     "fedkd": "the client's private teacher (model.kind is the shared student)",
                     "feddf": "the group's prototype model (one per group, fused by ensemble distillation)",
                     "heterofl": "a width ratio of the global model.kind (leading channels)",
                     "fedrolex": "a width ratio of the global model.kind (a rolling window of channels)"}
WIDTH_ALGORITHMS = ("heterofl", "fedrolex")
# clients keep their own models and upload per-class sums or logits: DP, secure aggregation and
# compression apply to those uploads
OWN_MODEL_ALGORITHMS = ("fd", "fedproto", "fedmd")
# algorithms that only run with groups (no shared model to fall back on)
GROUPS_ONLY = ("fd", "fedproto", "fedmd", "heterofl", "fedrolex")


def check_groups(cfg) -> None:
    """Clear errors for a bad ``model.groups`` (and the combinations it does not support)."""
    from fedkd_jax.models import MODELS

    groups = cfg.model.groups
    alg = cfg.algorithm
    if alg == "fedmd" and cfg.data.proxy == "holdout" and cfg.data.proxy_fraction <= 0:
        raise ConfigError("data.proxy_fraction", "fedmd trains on a public set: set data.proxy_fraction in (0, 1) "
                                                 "(labeled held-out rows), or name an out-of-domain data.proxy with "
                                                 "distill.public_epochs=0")
    if not groups:  # fd / fedproto / fedmd / heterofl / fedrolex without groups: one group of model.kind
        if alg in GROUPS_ONLY:
            _check_mechanisms(cfg, alg)
        return
    if alg not in HETERO_ALGORITHMS:
        raise ConfigError("model.groups", f"{alg} trains one shared architecture; heterogeneous groups run with "
                                          f"{', '.join(HETERO_ALGORITHMS)}")
    shares = [g.share for g in groups]
    for i, g in enumerate(groups):
        where = f"model.groups[{i}]"
        if g.kind is not None and g.kind not in MODELS:
            raise ConfigError(f"{where}.kind", f"unknown model {g.kind!r}; allowed: {', '.join(MODELS)}")
        if not (math.isfinite(g.width) and g.width > 0):
            raise ConfigError(f"{where}.width", f"must be > 0; got {g.width}")
        if alg in WIDTH_ALGORITHMS:
            if g.kind not in (None, cfg.model.kind) or g.hidden is not None or g.channels is not None:
                raise ConfigError(f"{where}", f"{alg} slices one global model (model.kind={cfg.model.kind}); a "
                                              "group gives only its width ratio (and share or clients)")
            if g.width > 1:
                raise ConfigError(f"{where}.width", f"{alg}: a sub-model's width ratio is in (0, 1]; got {g.width}")
            from fedkd_jax.hetero.slicing import SLICEABLE

            if cfg.model.kind not in SLICEABLE:
                raise ConfigError("model.kind", f"{alg} cannot slice {cfg.model.kind}; allowed: "
                                                f"{', '.join(SLICEABLE)}")
        for j, h in enumerate(g.hidden or []):
            if not (isinstance(h, int) and h > 0):
                raise ConfigError(f"{where}.hidden[{j}]", f"must be a positive integer; got {h!r}")
        for j, c in enumerate(g.channels or []):
            if not (isinstance(c, int) and c > 0):
                raise ConfigError(f"{where}.channels[{j}]", f"must be a positive integer; got {c!r}")
        if (g.share is None) == (g.clients is None):
            raise ConfigError(f"{where}", "give exactly one of share (a fraction of the population) or clients "
                                          "(explicit client ids)")
        if g.share is not None and not (0 < g.share <= 1):
            raise ConfigError(f"{where}.share", f"must be in (0, 1]; got {g.share}")
    given = [s for s in shares if s is not None]
    if given and not math.isclose(sum(given), 1.0, abs_tol=1e-6):
        raise ConfigError("model.groups", f"the shares must sum to 1; they sum to {sum(given):g} "
                                          f"({', '.join(f'{s:g}' for s in given)})")
    if cfg.client.straggler_fraction > 0:
        raise ConfigError("client.straggler_fraction", "stragglers are not simulated with model.groups; use 0")
    _check_mechanisms(cfg, alg)


def _check_mechanisms(cfg, alg: str) -> None:
    """What DP, secure aggregation and compression apply to, per method (see the README)."""
    from fedkd_jax.settings import compression_method, downlink_method, dp_enabled

    if alg in OWN_MODEL_ALGORITHMS:  # the upload is per-class sums (or logits): clip, noise, mask, compress it
        if downlink_method(cfg) != "none":
            raise ConfigError("compression.downlink", f"{alg} has no global model to compress on its way down; "
                                                      "use none")
        return
    if alg in WIDTH_ALGORITHMS or (alg == "feddf" and cfg.model.groups):
        if dp_enabled(cfg) or cfg.secagg.enabled or cfg.privacy.clip_norm is not None:
            raise ConfigError("secagg.enabled" if cfg.secagg.enabled else "privacy",
                              f"{alg} over groups uploads a sub-model scattered into the global shape with its "
                              "coverage mask (or a group's slot of every group's model): clipping and noising "
                              "that payload is not the papers' mechanism and is not supported")
        if compression_method(cfg) != "none" or downlink_method(cfg) != "none":
            raise ConfigError("compression.method", f"{alg} over groups: compressing a scattered sub-model and its "
                                                    "coverage mask is not supported; use none")


def group_names(cfg) -> list[str]:
    return [g.name or f"g{i}" for i, g in enumerate(cfg.model.groups)] or ["g0"]


def group_models(cfg, data, *, teacher: bool = False) -> list:
    """The models of the groups (``teacher``: fedkd's group entries are the teachers)."""
    from fedkd_jax.models import make_model

    m = cfg.model
    if not m.groups:
        return []
    from fedkd_jax.models.vision import scaled

    out = []
    for g in m.groups:
        kind = g.kind or m.kind
        hidden = list(g.hidden if g.hidden is not None else m.hidden)
        channels = list(g.channels if g.channels is not None else m.channels)
        width = g.width
        if kind in ("mlp", "cnn") and width != 1.0:  # their widths are listed: scale them
            hidden, channels, width = [scaled(h, width) for h in hidden], [scaled(c, width) for c in channels], 1.0
        out.append(make_model(kind, num_features=data.num_features, num_classes=data.num_classes, hidden=hidden,
                              channels=channels, image_shape=data.image_shape, width=width))
    return out


def membership(cfg, data) -> np.ndarray | None:
    """``[N]`` group of each client (a function of the run seed and the client id), or None."""
    from fedkd_jax.hetero.groups import assign_groups

    groups = cfg.model.groups
    if not groups:
        return None
    return assign_groups(data.num_clients, [g.share or 0.0 for g in groups], seed=cfg.run.seed,
                         clients=[g.clients for g in groups])


def build_hetero(cfg, model, data):
    """fd / fedproto over the groups' models (one group of ``model`` without ``model.groups``),
    or fedkd with a private teacher per group."""
    from fedkd_jax import algorithms as alg_lib
    from fedkd_jax.hetero.fd import fd
    from fedkd_jax.hetero.fedproto import fedproto
    from fedkd_jax.hetero.grouped import grouped

    if data.y.ndim > 1 and cfg.algorithm in GROUPS_ONLY:
        raise ConfigError("algorithm", f"{cfg.algorithm} exchanges per-class values; next-token data (a label per "
                                       "token) runs with fedavg, fedprox or fedkd")
    c, k = cfg.client, cfg.distill
    opt = alg_lib.client_optimizer(c.optimizer, lr=c.lr, momentum=c.momentum)
    local = dict(batch_size=c.batch_size, local_epochs=c.local_epochs, local_steps=c.local_steps)
    models = group_models(cfg, data) or [model]
    if cfg.algorithm == "fd":
        return fd(models, opt, num_classes=data.num_classes, temperature=k.temperature, beta=k.fd_beta, **local)
    if cfg.algorithm == "fedmd":
        from fedkd_jax.hetero.fedmd import fedmd

        return fedmd(models, opt, data.proxy_x, data.proxy_y, num_classes=data.num_classes,
                     public_subset=k.public_subset, public_epochs=k.public_epochs, digest_epochs=k.digest_epochs,
                     digest_batch_size=k.server_batch_size, **local)
    if cfg.algorithm == "fedproto":
        return fedproto(models, opt, num_classes=data.num_classes, proto_lambda=k.proto_lambda,
                        proto_dim=cfg.model.proto_dim, **local)
    if cfg.algorithm == "fedkd":
        from fedkd_jax.builders import _common

        client_opt, server_opt, local, _ = _common(cfg)
        teacher_opt = alg_lib.client_optimizer(k.teacher_optimizer, lr=k.teacher_lr, momentum=c.momentum)
        return grouped([alg_lib.fedkd(model, t, client_opt, teacher_opt, server_opt, temperature=k.temperature,
                                      **local) for t in group_models(cfg, data, teacher=True)], name="fedkd")
    if cfg.algorithm in WIDTH_ALGORITHMS:
        from fedkd_jax.builders import _common
        from fedkd_jax.hetero.heterofl import width_sliced

        client_opt, server_opt, local, _ = _common(cfg)
        m = cfg.model
        ratios = [g.width for g in m.groups] or [1.0]
        return width_sliced(m.kind, ratios, client_opt, server_opt, rule=cfg.algorithm,
                            num_features=data.num_features,
                            num_classes=data.num_classes, hidden=m.hidden, channels=m.channels,
                            image_shape=data.image_shape, width=m.width, **local)
    if cfg.algorithm == "feddf":
        from fedkd_jax.builders import _common
        from fedkd_jax.hetero.feddf import feddf_hetero

        client_opt, server_opt, local, distill = _common(cfg)
        return feddf_hetero(models, client_opt, server_opt, data.proxy_x, proxy_y=data.proxy_y,
                            temperature=k.temperature, schedule=k.server_schedule, val_fraction=k.val_fraction,
                            val_every=k.val_every, patience=k.patience, **local, **distill)
    raise ConfigError("algorithm", f"{cfg.algorithm} has no heterogeneous form")
