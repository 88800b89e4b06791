"""Heterogeneous clients: architecture groups and the methods built for them.

``model.groups`` splits the population into groups of one architecture each
(:mod:`~fedkd_jax.hetero.groups`); each group's sampled clients run as their
own batch inside the one compiled round (:class:`~fedkd_jax.engine.Simulator`
with ``groups=``). Methods: FD (:func:`fd`), FedProto (:func:`fedproto`),
FedMD (:mod:`~fedkd_jax.hetero.fedmd`), FedDF across architectures
(:mod:`~fedkd_jax.hetero.feddf`), FedKD with a private teacher per group
(:func:`grouped` over ``fedkd``), and the width-sliced sub-models of HeteroFL
and FedRolex (:mod:`~fedkd_jax.hetero.slicing`) with their masked aggregation.
"""

from fedkd_jax.hetero.fd import FDState, LocalModel, fd, per_label_sums
from fedkd_jax.hetero.fedproto import ProtoState, fedproto, nearest_prototype, with_projection
from fedkd_jax.hetero.grouped import grouped
from fedkd_jax.hetero.groups import GroupLayout, assign_groups, group_layout
from fedkd_jax.hetero.slicing import (
    RULES,
    SLICEABLE,
    WidthSlice,
    WidthSpec,
    check_width,
    coverage,
    dim_indices,
    index_arrays,
    masked_average,
    scatter,
    scatter_sum,
    slice_params,
    submodel_kwargs,
    width_slice,
    width_spec,
)
from fedkd_jax.hetero.width_layouts import LAYOUTS, Axis

__all__ = [
    "Axis",
    "FDState",
    "GroupLayout",
    "LAYOUTS",
    "LocalModel",
    "ProtoState",
    "RULES",
    "SLICEABLE",
    "WidthSlice",
    "WidthSpec",
    "assign_groups",
    "check_width",
    "coverage",
    "dim_indices",
    "fd",
    "fedproto",
    "group_layout",
    "grouped",
    "index_arrays",
    "masked_average",
    "nearest_prototype",
    "per_label_sums",
    "scatter",
    "scatter_sum",
    "slice_params",
    "submodel_kwargs",
    "width_slice",
    "width_spec",
    "with_projection",
]
