"""Width slicing for HeteroFL and FedRolex: sub-model extraction and masked aggregation.

* HeteroFL (Diao, Ding & Tarokh 2021, "HeteroFL: Computation and
  Communication Efficient Federated Learning for Heterogeneous Clients",
  ICLR): a client of width ratio ``r`` trains the same architecture with
  every hidden width scaled by ``r``, made of the *leading* ``k = r * n``
  channels of each hidden dimension of the global model (rule ``heterofl``:
  indices ``0 .. k-1``, whatever the round).
* FedRolex (Alam, Liu, Yan & Zhang 2022, "FedRolex: Model-Heterogeneous
  Federated Learning with Rolling Sub-Model Extraction", NeurIPS): the same,
  but the window rolls by one index per round (rule ``fedrolex``): indices
  ``(start + j) mod n`` for ``j < k``, ``start = direction * round mod n``,
  per width dimension of size ``n``. The paper describes a window that
  advances each round; ``direction=+1`` (the default) is that. Its reference
  code (github.com/AIoT-MLSys-Lab/FedRolex, ``resnet_server.py``,
  ``ResnetServer.split_model``, commit 3f1485e) computes ``roll = rounds %
  output_size`` and keeps ``torch.roll(arange(n), roll)[:k]``, i.e. indices
  ``(j - round) mod n``: the same windows visited in the opposite order;
  ``direction=-1`` reproduces it exactly. (Its ``transformer_server.py``
  at that commit has the roll commented out, i.e. static.) Both codes
  size a sub-model with ``ceil(r * n)``; here a sub-model is whatever
  :func:`fedkd_jax.models.make_model` builds at the scaled widths
  (:func:`fedkd_jax.models.vision.scaled`: ``round(r * n)``, at least 1),
  the same for the usual ratios (1, 1/2, 1/4, ...) of even widths.
* Aggregation, both papers: each global coordinate is averaged over the
  clients whose sub-model contains it (coverage-count weighting); a
  coordinate nobody trained keeps its value. Here the average is weighted
  by the clients' aggregation weights (their example counts, or 1 each as in
  both reference codes): ``new = sum_c w_c m_c theta_c / sum_c w_c m_c``
  where ``m_c`` is client ``c``'s coverage mask, and the old value where
  ``sum_c w_c m_c = 0``. For a fixed-shape payload, each client uploads
  :func:`scatter_sum`'s pair (its weighted values and its weight, both
  scattered into the global shape), the cohort sums them (one all-reduce),
  and the server calls :func:`masked_average`.

Normalisation: the zoo's ResNet uses GroupNorm (2 groups), sliced like any
channel-wise parameter; a sub-model normalises over its own channels.
HeteroFL's static batch norm is not needed because no zoo model keeps
running statistics. The reference codes' label-split masking of the output
layer (non-IID label splits) is not part of this module.

Every function is pure and jit-able with ``round`` traced: index sets have
static sizes ``k`` and a traced start, so a round compiles once.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedkd_jax.errors import ConfigError
from fedkd_jax.hetero.width_layouts import LAYOUTS, Axis
from fedkd_jax.models.functional import MODELS, Model, Params, make_model
from fedkd_jax.models.vision import scaled

RULES = ("heterofl", "fedrolex")
SLICEABLE = tuple(LAYOUTS)
FIELD = "model.groups"


class WidthSpec(NamedTuple):
    """How a sub-model sits inside the global model (static, hashable).

    Attributes:
      kind: the model kind.
      rule: ``heterofl`` (leading indices) or ``fedrolex`` (rolling window).
      direction: FedRolex's roll direction (+1 the paper's, -1 its code's).
      dims: ``(name, n, k)`` per width dimension: global and sub-model size.
      treedef: the params' tree structure (global and sub-model alike).
      axes: per leaf (``jax.tree.leaves`` order), per array axis, an
        :class:`Axis` or ``None`` (not sliced).
      global_shapes, sub_shapes: per leaf, the global and sub-model shapes.
    """

    kind: str
    rule: str
    direction: int
    dims: tuple[tuple[str, int, int], ...]
    treedef: Any
    axes: tuple[tuple[Axis | None, ...], ...]
    global_shapes: tuple[tuple[int, ...], ...]
    sub_shapes: tuple[tuple[int, ...], ...]


class WidthSlice(NamedTuple):
    """A sub-model (``make_model`` at the scaled widths) and its :class:`WidthSpec`."""

    model: Model
    spec: WidthSpec


def check_width(ratio: Any, *, field: str = FIELD) -> float:
    """A width ratio as a float in ``(0, 1]``, else a :class:`ConfigError`."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)):
        raise ConfigError(field, f"width must be a number in (0, 1]; got {ratio!r}")
    w = float(ratio)
    if not (math.isfinite(w) and 0.0 < w <= 1.0):
        raise ConfigError(field, f"width must be in (0, 1] (a fraction of the global model's widths); got {ratio!r}")
    return w


def _check_kind(kind: str) -> None:
    if kind not in LAYOUTS:
        what = "unknown model" if kind not in MODELS else "no width slicing for model"
        raise ConfigError(FIELD, f"{what} {kind!r}; width slicing (heterofl, fedrolex) supports "
                                 f"{', '.join(SLICEABLE)}")


def _check_rule(rule: str, direction: int) -> None:
    if rule not in RULES:
        raise ConfigError("algorithm", f"unknown width-slicing rule {rule!r}; allowed: {', '.join(RULES)}")
    if direction not in (1, -1):
        raise ConfigError("algorithm", f"FedRolex roll direction must be +1 or -1; got {direction!r}")


def submodel_kwargs(kind: str, ratio: float, **model_kwargs: Any) -> dict[str, Any]:
    """``make_model`` keyword arguments of the sub-model of width ratio ``ratio`` (``0 < ratio <= 1``).

    ``mlp`` scales ``hidden``; ``cnn`` scales ``channels`` and its dense width
    ``hidden[0]``; the reference models multiply ``width``. Input features and
    classes are never scaled.
    """
    _check_kind(kind)
    r = check_width(ratio)
    kw = dict(model_kwargs)
    if kind == "mlp":
        kw["hidden"] = tuple(scaled(int(h), r) for h in kw.get("hidden", (200, 200)))
    elif kind == "cnn":
        kw["channels"] = tuple(scaled(int(c), r) for c in kw.get("channels", (16, 32)))
        hidden = tuple(kw.get("hidden", (200, 200)))
        kw["hidden"] = (scaled(int(hidden[0]) if hidden else 64, r),)
    else:
        kw["width"] = float(kw.get("width", 1.0)) * r
    return kw


def _paths(tree: Any) -> tuple[list[tuple], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in p) for p, _ in flat]
    return paths, [leaf for _, leaf in flat], treedef


def width_spec(kind: str, global_shapes: Params, sub_shapes: Params, *, rule: str = "heterofl",
               direction: int = 1) -> WidthSpec:
    """The slicing spec of a sub-model inside the global model.

    Args:
      kind: a model of :data:`SLICEABLE`.
      global_shapes, sub_shapes: the two models' params (arrays or
        ``jax.ShapeDtypeStruct``, e.g. ``jax.eval_shape(model.init, key)``).
      rule: ``heterofl`` or ``fedrolex``.
      direction: FedRolex's roll direction (see the module docstring).

    Raises:
      ConfigError: unsupported kind or rule, or the two trees do not fit
        (different structure, a sub-model wider than the global model, tied
        axes of different sizes).
    """
    _check_kind(kind)
    _check_rule(rule, direction)
    layout = LAYOUTS[kind](global_shapes)
    paths, gleaves, treedef = _paths(global_shapes)
    spaths, sleaves, streedef = _paths(sub_shapes)
    if streedef != treedef:
        raise ConfigError(FIELD, f"the sub-model's parameters do not have the {kind} global model's structure")
    if set(paths) != set(layout):
        raise ConfigError(FIELD, f"{kind}: the width layout is out of date with the model's parameters "
                                 f"(unmatched: {sorted(map(str, set(paths) ^ set(layout)))})")
    sizes: dict[str, tuple[int, int]] = {}
    axes = []
    for path, g, s in zip(paths, gleaves, sleaves):
        gshape, sshape, ax = tuple(map(int, g.shape)), tuple(map(int, s.shape)), layout[path]
        if not (len(gshape) == len(sshape) == len(ax)):
            raise ConfigError(FIELD, f"{kind} {path}: ranks differ (global {gshape}, sub-model {sshape})")
        for a, gn, sn in zip(ax, gshape, sshape):
            if a is None:
                if gn != sn:
                    raise ConfigError(FIELD, f"{kind} {path}: an unsliced axis differs ({gshape} vs {sshape})")
                continue
            if gn % a.tiles or sn % a.tiles:
                raise ConfigError(FIELD, f"{kind} {path}: axis sizes {gn}, {sn} are not {a.tiles} blocks")
            nk = (gn // a.tiles, sn // a.tiles)
            if sizes.setdefault(a.dim, nk) != nk:
                raise ConfigError(FIELD, f"{kind} {path}: width {a.dim!r} is {nk} here but {sizes[a.dim]} elsewhere")
            if not 0 < nk[1] <= nk[0]:
                raise ConfigError(FIELD, f"{kind} {path}: sub-model width {nk[1]} of {a.dim!r} not in [1, {nk[0]}]")
        axes.append(tuple(ax))
    dims = tuple((d, n, k) for d, (n, k) in sorted(sizes.items()))
    return WidthSpec(kind, rule, int(direction), dims, treedef, tuple(axes),
                     tuple(tuple(map(int, g.shape)) for g in gleaves),
                     tuple(tuple(map(int, s.shape)) for s in sleaves))


def width_slice(kind: str, ratio: float, *, rule: str = "heterofl", direction: int = 1,
                **model_kwargs: Any) -> WidthSlice:
    """The sub-model of width ratio ``ratio`` of the global ``make_model(kind, **model_kwargs)``, and its spec.

    ``model_kwargs`` describe the global model (a reference model's own
    ``width`` included: the sub-model gets ``width * ratio``).
    """
    _check_kind(kind)
    _check_rule(rule, direction)
    sub = make_model(kind, **submodel_kwargs(kind, ratio, **model_kwargs))
    glob = make_model(kind, **model_kwargs)
    key = jax.random.key(0)
    spec = width_spec(kind, jax.eval_shape(glob.init, key), jax.eval_shape(sub.init, key), rule=rule,
                      direction=direction)
    return WidthSlice(sub, spec)


def dim_indices(spec: WidthSpec, round: jax.typing.ArrayLike) -> dict[str, jax.Array]:
    """Per width dimension, the global indices ``[k]`` int32 the sub-model keeps this round.

    HeteroFL: ``0 .. k-1``. FedRolex: ``(start + j) mod n``, ``start = direction * round mod n``.
    A window over the whole dimension (``k = n``) is ``0 .. n-1`` under both
    rules: FedRolex's reference code would permute it (the same set; only
    the order differs, which would reshuffle GroupNorm's groups), so a
    full-width client trains exactly the global model, as under FedAvg.
    """
    out = {}
    for name, n, k in spec.dims:
        j = jnp.arange(k, dtype=jnp.int32)
        if spec.rule == "heterofl" or k == n:
            out[name] = j
        else:
            start = jnp.mod(spec.direction * jnp.asarray(round, jnp.int32), n)
            out[name] = jnp.mod(start + j, n)
    return out


def _axis_index(axis: Axis, idx: jax.Array, n: int) -> jax.Array:
    """``[tiles * k]``: block ``t`` of the axis keeps ``t * n + idx``."""
    return (jnp.arange(axis.tiles, dtype=jnp.int32)[:, None] * n + idx[None, :]).reshape(-1)


def _leaf_indices(spec: WidthSpec, round: jax.typing.ArrayLike) -> list[tuple[jax.Array | None, ...]]:
    """Per leaf, per axis: the global indices, or ``None`` where the axis is kept whole
    (never sliced, or a full-width dimension: no gather or scatter at all)."""
    dims = dim_indices(spec, round)
    nk = {name: (n, k) for name, n, k in spec.dims}
    return [tuple(None if a is None or nk[a.dim][0] == nk[a.dim][1] else _axis_index(a, dims[a.dim], nk[a.dim][0])
                  for a in ax) for ax in spec.axes]


def index_arrays(spec: WidthSpec, round: jax.typing.ArrayLike) -> Params:
    """Per leaf (the params' structure), a tuple with one index array per axis.

    Axis ``a`` of the sub-model's leaf is ``global_leaf[..., idx[a], ...]``;
    an axis kept whole (never sliced, or a full-width dimension) gets
    ``arange(size)``. Together: ``sub = global[np.ix_(*idx)]``.
    """
    leaves = [tuple(jnp.arange(size, dtype=jnp.int32) if i is None else i for i, size in zip(idx, shape))
              for idx, shape in zip(_leaf_indices(spec, round), spec.global_shapes)]
    return jax.tree.unflatten(spec.treedef, leaves)


def _leaves(tree: Params, spec: WidthSpec, shapes: Sequence[tuple[int, ...]], what: str) -> list[jax.Array]:
    leaves, treedef = jax.tree.flatten(tree)
    if treedef != spec.treedef:
        raise ValueError(f"{what} do not have the structure of the {spec.kind} spec")
    for leaf, shape in zip(leaves, shapes):
        if tuple(jnp.shape(leaf)) != shape:
            raise ValueError(f"{what}: a leaf of shape {tuple(jnp.shape(leaf))}, expected {shape}")
    return leaves


def slice_params(global_params: Params, spec: WidthSpec, round: jax.typing.ArrayLike) -> Params:
    """The sub-model's params, gathered from the global params (global shapes -> sub shapes)."""
    out = []
    for leaf, idx in zip(_leaves(global_params, spec, spec.global_shapes, "global params"),
                         _leaf_indices(spec, round)):
        for a, i in enumerate(idx):
            if i is not None:
                leaf = jnp.take(leaf, i, axis=a, unique_indices=True, indices_are_sorted=False)
        out.append(leaf)
    return jax.tree.unflatten(spec.treedef, out)


def _positions(idx: jax.Array, size: int) -> jax.Array:
    """``[size]`` int32: where each global index sits along the sub-model's axis; ``len(idx)``
    (out of range) where the sub-model does not hold it."""
    k = idx.shape[0]
    return jnp.full((size,), k, jnp.int32).at[idx].set(jnp.arange(k, dtype=jnp.int32), unique_indices=True)


def scatter(sub_tree: Params, spec: WidthSpec, round: jax.typing.ArrayLike) -> Params:
    """The adjoint of :func:`slice_params`: each sub-model leaf placed at its indices in a
    zero array of the global shape (sub shapes -> global shapes).

    Computed as a gather through the inverse index map (zero-filled where the
    sub-model has no entry): only a ``[n]`` vector is scattered per axis, which
    compiles faster than a scatter of the leaf and needs no atomics on a GPU.
    """
    out = []
    for leaf, idx, shape in zip(_leaves(sub_tree, spec, spec.sub_shapes, "sub-model params"),
                                _leaf_indices(spec, round), spec.global_shapes):
        for a, i in enumerate(idx):
            if i is not None:
                leaf = jnp.take(leaf, _positions(i, shape[a]), axis=a, mode="fill", fill_value=0)
        out.append(leaf)
    return jax.tree.unflatten(spec.treedef, out)


def coverage(spec: WidthSpec, round: jax.typing.ArrayLike) -> Params:
    """float32 global-shape mask: 1 where the sub-model holds the coordinate this round
    (the outer product of one indicator per sliced axis)."""
    out = []
    for idx, shape in zip(_leaf_indices(spec, round), spec.global_shapes):
        mask = jnp.ones((), jnp.float32)
        for a, i in enumerate(idx):
            if i is not None:
                held = (_positions(i, shape[a]) < i.shape[0]).astype(jnp.float32)
                mask = mask * held.reshape((-1,) + (1,) * (len(shape) - a - 1))
        out.append(jnp.broadcast_to(mask, shape))
    return jax.tree.unflatten(spec.treedef, out)


def scatter_sum(sub_params: Params, spec: WidthSpec, round: jax.typing.ArrayLike, *,
                weight: jax.typing.ArrayLike = 1.0) -> tuple[Params, Params]:
    """One client's fixed-shape upload: ``(scatter(weight * sub), weight * coverage)``, global shapes.

    Summing these over a cohort (one all-reduce, any mix of widths and rules)
    gives :func:`masked_average`'s ``sums`` and ``counts``. Both parts are
    linear in the client, so clients sharing a spec and round may be summed in
    the sub-model's shape first and scattered once.
    """
    w = jnp.asarray(weight, jnp.float32)
    sums = scatter(jax.tree.map(lambda x: w.astype(x.dtype) * x, sub_params), spec, round)
    counts = jax.tree.map(lambda c: w * c, coverage(spec, round))
    return sums, counts


def masked_average(sums: Params, counts: Params, fallback: Params) -> Params:
    """``sums / counts`` where ``counts > 0``, else ``fallback`` (all global shapes).

    With params as values and the old global model as ``fallback`` this is the
    new global model; with updates (``theta_c - global``) and zeros as
    ``fallback`` it is the update to add to it (the same model, up to rounding).
    """
    def one(s, c, f):
        covered = c > 0
        return jnp.where(covered, s / jnp.where(covered, c, 1).astype(s.dtype), f)

    return jax.tree.map(one, sums, counts, fallback)
