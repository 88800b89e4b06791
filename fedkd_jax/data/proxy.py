"""Unlabeled proxy sets for server-side distillation (FedDF, server-teacher KD).

``holdout`` rows come from the task's own pool (``data.proxy_fraction``, see
:func:`fedkd_jax.data.federate`). The other sources are *out-of-domain*, as
FedDF distils with (Lin et al. 2020 use CIFAR-100 or STL-10 for CIFAR-10):
another bundled dataset resized to the task's image shape, uniform noise, or
a user's ``.npz``. Labels are never read.
"""

from __future__ import annotations

import numpy as np

from fedkd_jax.data import datasets as ds_lib
from fedkd_jax.errors import DataError
from fedkd_jax.paths import check_npz

PROXY_SOURCES = ("holdout", "digits", "mnist5k", "noise", "npz")


def resize_images(x: np.ndarray, src: tuple[int, ...], dst: tuple[int, ...]) -> np.ndarray:
    """Bilinear resize of flat images ``[n, H*W*C]`` from ``src`` to ``dst`` (H, W, C) shapes."""
    if tuple(src) == tuple(dst):
        return x
    if src[2:] != dst[2:]:
        raise DataError("data.proxy", f"cannot map images of shape {src} onto {dst} (channels differ)")
    import jax
    import jax.numpy as jnp

    imgs = jnp.asarray(x.reshape((-1,) + tuple(src)))
    out = jax.image.resize(imgs, (imgs.shape[0],) + tuple(dst), method="bilinear", antialias=True)
    return np.asarray(out, np.float32).reshape(len(x), -1)


def load_proxy(source: str, *, num_features: int, image_shape: tuple[int, ...] | None, size: int, seed: int,
               path: str | None = None) -> np.ndarray:
    """``[P, D]`` float32 out-of-domain proxy rows for a task with ``num_features`` (and ``image_shape``)."""
    rng = np.random.default_rng([seed, 0x9B0C])
    if source == "noise":
        return rng.uniform(0.0, 1.0, (size, num_features)).astype(np.float32)
    if source in ("digits", "mnist5k"):
        ds = ds_lib.load_digits() if source == "digits" else ds_lib.load_mnist5k()
        x = ds.x
        if x.shape[1] != num_features:
            if image_shape is None or ds.image_shape is None:
                raise DataError("data.proxy", f"{source} rows have {x.shape[1]} features but the task has {num_features} "
                                              "and no image shape to resize to")
            x = resize_images(x, ds.image_shape, image_shape)
        idx = rng.permutation(len(x))[: min(size, len(x))]
        return x[np.sort(idx)].astype(np.float32)
    if source == "npz":
        check_npz("data.proxy_path", path or "")
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files:
                raise DataError("data.proxy_path", f"{path!r} lacks array x; it has {sorted(f.files)}")
            x = np.asarray(f["x"], np.float32)
        x = x.reshape(len(x), -1)
        if x.shape[1] != num_features:
            raise DataError("data.proxy_path", f"proxy rows have {x.shape[1]} features; the task has {num_features}")
        if not np.all(np.isfinite(x)):
            raise DataError("data.proxy_path", "proxy features must be finite")
        return x
    raise DataError("data.proxy", f"unknown proxy source {source!r}; allowed: {', '.join(PROXY_SOURCES)}")
