"""Architecture groups: which client trains which model, and each group's cohort slots.

Shape key: ``N`` population, ``G`` groups, ``C`` cohort, ``C_g`` group ``g``'s
share of the cohort, ``D`` devices, ``L_g`` group ``g``'s slots per device.

A client's group is a deterministic function of ``(seed, client id)`` and
never changes: the population is permuted with a generator seeded by the run
seed, and consecutive runs of the permutation go to the groups in order, with
group sizes ``n_g`` the largest-remainder rounding of ``share_g * N`` (exact
shares, not a per-client coin). Explicit ``clients`` lists override this.

Cohorts are *stratified*: group ``g`` gets ``C_g`` slots (largest-remainder
rounding of ``C * n_g / N``, at least one) and samples them uniformly without
replacement from its own members, so every client's inclusion probability
is ``C_g / n_g``, which is ``C / N`` up to rounding, and each group's batch
has a static shape. (Uniform sampling over the whole population would give
each group a random count and need every group padded to its worst case.)

Layout of the padded cohort (``Cp = D * sum_g L_g`` positions): device ``d``
holds ``sum_g L_g`` consecutive positions; inside them group ``g`` owns
``[off_g, off_g + L_g)`` with ``off_g = L_0 + ... + L_{g-1}``. Group ``g``'s
``k``-th sampled client sits on device ``k // L_g`` at slot ``k % L_g``. With
one group this is exactly the ungrouped engine's layout.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from fedkd_jax.errors import ConfigError

_GROUP_TAG = 0x6A0B


def largest_remainder(total: int, weights: Sequence[float]) -> np.ndarray:
    """Integers summing to ``total``, proportional to ``weights`` (Hamilton's method)."""
    w = np.asarray(weights, np.float64)
    exact = total * w / w.sum()
    base = np.floor(exact).astype(np.int64)
    short = int(total - base.sum())
    order = np.argsort(-(exact - base), kind="stable")
    base[order[:short]] += 1
    return base


def assign_groups(num_clients: int, shares: Sequence[float] | None = None, *, seed: int,
                  clients: Sequence[Sequence[int] | None] | None = None) -> np.ndarray:
    """``[N]`` int32 group of each client.

    Args:
      shares: each group's share of the population (summing to 1); groups with
        explicit ``clients`` take exactly those ids and the others share the rest.
      seed: the run seed (the assignment is a function of seed and client id).
      clients: per group, explicit client ids or ``None``.
    """
    g = len(shares) if shares is not None else len(clients)
    clients = list(clients) if clients is not None else [None] * g
    member = np.full(num_clients, -1, np.int32)
    for i, ids in enumerate(clients):
        if ids is None:
            continue
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= num_clients):
            raise ConfigError("model.groups", f"group {i}: client ids must be in [0, {num_clients}); "
                                              f"got {int(ids.min())}..{int(ids.max())}")
        if np.any(member[ids] >= 0) or len(np.unique(ids)) != len(ids):
            raise ConfigError("model.groups", f"group {i}: a client id is listed twice (or in two groups)")
        member[ids] = i
    free = [i for i in range(g) if clients[i] is None]
    rest = np.flatnonzero(member < 0)
    if free:
        weights = [float(shares[i]) for i in free]
        sizes = largest_remainder(len(rest), weights)
        perm = np.random.default_rng([int(seed), _GROUP_TAG]).permutation(rest)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        for j, i in enumerate(free):
            member[perm[bounds[j]:bounds[j + 1]]] = i
    elif len(rest):
        raise ConfigError("model.groups", f"{len(rest)} clients belong to no group: list them, or give a group "
                                          "a share instead of explicit clients")
    return member


class GroupLayout(NamedTuple):
    """Where each group's clients sit in the padded cohort (see the module docstring).

    Attributes:
      membership: ``[N]`` int32 group of each client.
      members: per group, its sorted client ids.
      cohort: ``(C_0, ..., C_{G-1})`` slots per round.
      slots: ``(L_0, ...)`` positions per device (multiples of the group size).
      num_devices: ``D``.
    """

    membership: np.ndarray
    members: tuple[np.ndarray, ...]
    cohort: tuple[int, ...]
    slots: tuple[int, ...]
    num_devices: int

    @property
    def num_groups(self) -> int:
        return len(self.cohort)

    @property
    def padded(self) -> int:
        return self.num_devices * sum(self.slots)

    def positions(self) -> list[np.ndarray]:
        """Per group, ``[Cp]`` bool: the cohort positions it owns (on every device)."""
        within = np.arange(self.padded) % sum(self.slots)
        return [(within >= lo) & (within < hi) for lo, hi in self.segments()]

    def segments(self) -> list[tuple[int, int]]:
        """Per group, its ``[lo, hi)`` positions within one device's block."""
        off = np.concatenate([[0], np.cumsum(self.slots)]).astype(int)
        return [(int(off[g]), int(off[g + 1])) for g in range(self.num_groups)]


def group_layout(membership: np.ndarray, cohort_size: int, num_devices: int, group_size: int) -> GroupLayout:
    """Stratified cohort slots for ``membership`` (see the module docstring)."""
    membership = np.asarray(membership, np.int32)
    g = int(membership.max()) + 1
    members = tuple(np.flatnonzero(membership == i) for i in range(g))
    sizes = np.array([len(m) for m in members])
    if np.any(sizes == 0):
        raise ConfigError("model.groups", f"group {int(np.argmin(sizes))} has no clients "
                                          f"(population {len(membership)}, sizes {sizes.tolist()})")
    if cohort_size < g:
        raise ConfigError("run.cohort_size", f"must be at least the number of groups ({g}): every group "
                                             f"samples at least one client a round; got {cohort_size}")
    cohort = largest_remainder(cohort_size - g, sizes) + 1  # at least one slot each
    cohort = np.minimum(cohort, sizes)
    slots = tuple(int(math.ceil(c / (num_devices * group_size)) * group_size) for c in cohort)
    return GroupLayout(membership, members, tuple(int(c) for c in cohort), slots, int(num_devices))


def group_cohort(bits: tuple[int, ...], round_index: int, layout: GroupLayout, tag: int) -> list[np.ndarray]:
    """Per group, the client ids sampled in round ``round_index`` (``C_g`` of its members,
    uniformly without replacement). Group 0 uses the ungrouped sampler's stream, so one
    group samples exactly the ungrouped cohort."""
    out = []
    for g, (members, c) in enumerate(zip(layout.members, layout.cohort)):
        extra = [] if g == 0 else [g]
        rng = np.random.default_rng([*bits, int(round_index), tag, *extra])
        n = len(members)
        pick = rng.permutation(n) if c == n else rng.choice(n, c, replace=False)
        out.append(members[pick])
    return out


def place_cohort(ids_per_group: list[np.ndarray], layout: GroupLayout, pad_id: int) -> np.ndarray:
    """``[Cp]`` positions of a round's cohort (``pad_id`` where empty)."""
    per_device = sum(layout.slots)
    out = np.full(layout.padded, pad_id, np.int64)
    for (lo, _), ids, slots in zip(layout.segments(), ids_per_group, layout.slots):
        k = np.arange(len(ids))
        out[(k // slots) * per_device + lo + k % slots] = ids
    return out
