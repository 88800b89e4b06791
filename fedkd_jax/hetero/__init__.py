"""Heterogeneous clients: architecture groups and the methods built for them.

``model.groups`` splits the population into groups of one architecture each
(:mod:`~fedkd_jax.hetero.groups`); each group's sampled clients run as their
own batch inside the one compiled round (:class:`~fedkd_jax.engine.Simulator`
with ``groups=``). Methods: FD (:func:`fd`), FedProto (:func:`fedproto`), and
FedKD with a private teacher per group (:func:`grouped` over ``fedkd``).
"""

from fedkd_jax.hetero.fd import FDState, LocalModel, fd, per_label_sums
from fedkd_jax.hetero.fedproto import ProtoState, fedproto, nearest_prototype, with_projection
from fedkd_jax.hetero.grouped import grouped
from fedkd_jax.hetero.groups import GroupLayout, assign_groups, group_layout

__all__ = [
    "FDState",
    "GroupLayout",
    "LocalModel",
    "ProtoState",
    "assign_groups",
    "fd",
    "fedproto",
    "group_layout",
    "grouped",
    "nearest_prototype",
    "per_label_sums",
    "with_projection",
]
