"""Heterogeneous clients: architecture groups and the methods built for them."""

from fedkd_jax.hetero.groups import GroupLayout, assign_groups, group_layout

__all__ = ["GroupLayout", "assign_groups", "group_layout"]
