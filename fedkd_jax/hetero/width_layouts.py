"""Which axes of each zoo model's parameters are hidden widths, and which widths are tied.

A *layout* maps every parameter leaf (its path in the ``nnx.to_pure_dict``
tree, e.g. ``("hidden", 0, "kernel")``) to one entry per array axis:
``None`` (the axis is never sliced: input features, classes, kernel
height/width, attention heads) or an :class:`Axis` naming a *width
dimension*. Every axis that names the same dimension gets the same index
set, which is how the tied dimensions stay consistent: a layer's output
channels and the next layer's input channels, a bias and GroupNorm scale
and their channel axis, a residual stream across blocks.

``Axis(dim, tiles)`` with ``tiles > 1`` is an axis made of ``tiles``
consecutive blocks of the dimension, each block sliced with the same
indices (global index ``t * n + i``, ``t < tiles``): the channel-last
flatten ``H' x W' x C -> H'W'C`` in front of a dense layer (``tiles =
H'W'``), and the four gate blocks ``i, f, g, o`` of a fused LSTM kernel
(``tiles = 4``, flax's ``OptimizedLSTMCell``).

Layouts read only the global tree's structure (how many layers, which
blocks project their shortcut); sizes and tile counts are checked against
both the global and the sub-model's shapes by :func:`fedkd_jax.hetero.slicing.width_spec`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

Path = tuple
Layout = dict  # Path -> tuple[Axis | None, ...]


class Axis(NamedTuple):
    """One array axis made of ``tiles`` consecutive blocks of width dimension ``dim``."""

    dim: str
    tiles: int = 1


def _dense(out: Layout, path: Path, din: Axis | None, dout: Axis | None, *, bias: bool = True) -> None:
    out[path + ("kernel",)] = (din, dout)
    if bias:
        out[path + ("bias",)] = (dout,)


def _conv(out: Layout, path: Path, din: Axis | None, dout: Axis | None, *, bias: bool = True) -> None:
    out[path + ("kernel",)] = (None, None, din, dout)
    if bias:
        out[path + ("bias",)] = (dout,)


def _norm(out: Layout, path: Path, d: Axis) -> None:
    out[path + ("scale",)] = (d,)
    out[path + ("bias",)] = (d,)


def _flatten(dense: Any, last: Axis | None, last_conv: Any) -> Axis | None:
    """The dense layer's input axis after a channel-last flatten of ``H' x W' x C``: ``H'W'`` tiles."""
    if last is None:
        return None
    return Axis(last.dim, int(dense["kernel"].shape[0]) // int(last_conv["kernel"].shape[-1]))


def mlp(shapes: Any) -> Layout:
    """``hidden[i]`` (``[in, out]`` kernels), then ``head``."""
    out: Layout = {}
    prev = None
    for i in range(len(shapes["hidden"])):
        d = Axis(f"hidden{i}")
        _dense(out, ("hidden", i), prev, d)
        prev = d
    _dense(out, ("head",), prev, None)
    return out


def cnn(shapes: Any) -> Layout:
    """``convs[i]`` (``[3, 3, in, out]``), channel-last flatten, ``dense``, ``head``."""
    out: Layout = {}
    prev = None
    for i in range(len(shapes["convs"])):
        d = Axis(f"conv{i}")
        _conv(out, ("convs", i), prev, d)
        prev = d
    dense = Axis("dense")
    last_conv = shapes["convs"][len(shapes["convs"]) - 1] if prev is not None else None
    _dense(out, ("dense",), _flatten(shapes["dense"], prev, last_conv), dense)
    _dense(out, ("head",), dense, None)
    return out


def femnist_cnn(shapes: Any) -> Layout:
    """``conv1``, ``conv2``, channel-last flatten, ``dense``, ``head`` (both FEMNIST CNNs)."""
    out: Layout = {}
    c1, c2, dense = Axis("conv1"), Axis("conv2"), Axis("dense")
    _conv(out, ("conv1",), None, c1)
    _conv(out, ("conv2",), c1, c2)
    _dense(out, ("dense",), _flatten(shapes["dense"], c2, shapes["conv2"]), dense)
    _dense(out, ("head",), dense, None)
    return out


def resnet18_gn(shapes: Any) -> Layout:
    """Stem, BasicBlocks, head. A block without a projection shortcut adds its input to its
    output, so both share one dimension; a projecting block starts a new one."""
    out: Layout = {}
    stage = 0
    d = Axis("stage0")
    _conv(out, ("stem",), None, d, bias=False)
    _norm(out, ("stem_gn",), d)
    for b in range(len(shapes["blocks"])):
        block, din = shapes["blocks"][b], d
        if "short" in block:
            stage += 1
            d = Axis(f"stage{stage}")
            _conv(out, ("blocks", b, "short"), din, d, bias=False)
            _norm(out, ("blocks", b, "short_gn"), d)
        mid = Axis(f"block{b}")  # conv1's output feeds only conv2: its own dimension
        _conv(out, ("blocks", b, "conv1"), din, mid, bias=False)
        _norm(out, ("blocks", b, "gn1"), mid)
        _conv(out, ("blocks", b, "conv2"), mid, d, bias=False)
        _norm(out, ("blocks", b, "gn2"), d)
    _dense(out, ("head",), d, None)
    return out


def _lstm(out: Layout, path: Path, din: Axis | None, hidden: str) -> Axis:
    """Fused kernels ``dense_i [in, 4H]`` and ``dense_h [H, 4H]`` (+ bias ``[4H]``), gates i, f, g, o."""
    h, gates = Axis(hidden), Axis(hidden, 4)
    _dense(out, path + ("cell", "dense_i"), din, gates, bias=False)
    _dense(out, path + ("cell", "dense_h"), h, gates)
    return h


def char_lstm(shapes: Any) -> Layout:
    """Embedding ``[V, E]``, LSTMs, head ``[H, V]``."""
    out: Layout = {}
    prev = Axis("embed")
    out[("embed", "embedding")] = (None, prev)
    for i in range(len(shapes["lstms"])):
        prev = _lstm(out, ("lstms", i), prev, f"lstm{i}")
    _dense(out, ("head",), prev, None)
    return out


def nwp_lstm(shapes: Any) -> Layout:
    """Embedding, then per layer an LSTM and a projection ``[H, E]``, head ``[E, V]``."""
    out: Layout = {}
    prev = Axis("embed")
    out[("embed", "embedding")] = (None, prev)
    for i in range(len(shapes["lstms"])):
        h = _lstm(out, ("lstms", i), prev, f"lstm{i}")
        prev = Axis(f"proj{i}")
        _dense(out, ("projs", i), h, prev)
    _dense(out, ("head",), prev, None)
    return out


def transformer(shapes: Any) -> Layout:
    """One residual-stream dimension ``model``; per block a per-head dimension (each head's
    features sliced with the same indices, as FedRolex's transformer code does) and an MLP one."""
    out: Layout = {}
    model = Axis("model")
    out[("embed", "embedding")] = (None, model)
    out[("pos",)] = (None, model)
    for b in range(len(shapes["blocks"])):
        p, head, hidden = ("blocks", b), Axis(f"head{b}"), Axis(f"mlp{b}")
        _norm(out, p + ("ln1",), model)
        _norm(out, p + ("ln2",), model)
        for name in ("query", "key", "value"):
            out[p + ("attn", name, "kernel")] = (model, None, head)
            out[p + ("attn", name, "bias")] = (None, head)
        out[p + ("attn", "out", "kernel")] = (None, head, model)
        out[p + ("attn", "out", "bias")] = (model,)
        _dense(out, p + ("fc1",), model, hidden)
        _dense(out, p + ("fc2",), hidden, model)
    _norm(out, ("ln",), model)
    _dense(out, ("head",), model, None)
    return out


LAYOUTS: dict[str, Callable[[Any], Layout]] = {
    "mlp": mlp,
    "cnn": cnn,
    "femnist_cnn": femnist_cnn,
    "femnist_cnn_dropout": femnist_cnn,
    "resnet18_gn": resnet18_gn,
    "char_lstm": char_lstm,
    "nwp_lstm": nwp_lstm,
    "transformer": transformer,
}
