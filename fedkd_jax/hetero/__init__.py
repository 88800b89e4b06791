"""Heterogeneous clients: width-sliced sub-models (HeteroFL, FedRolex) and their masked aggregation."""

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
    "LAYOUTS",
    "RULES",
    "SLICEABLE",
    "WidthSlice",
    "WidthSpec",
    "check_width",
    "coverage",
    "dim_indices",
    "index_arrays",
    "masked_average",
    "scatter",
    "scatter_sum",
    "slice_params",
    "submodel_kwargs",
    "width_slice",
    "width_spec",
]
