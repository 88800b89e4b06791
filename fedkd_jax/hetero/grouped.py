"""One algorithm over architecture groups: the server is shared, each group has its clients' side.

Every client holds a slot per group in its persistent state (a tuple; the
client store keeps one template) and only its own group's slot is ever
trained: group ``g``'s client update reads and writes slot ``g``. The slots
of other groups stay at their seed-defined initial values. (The cost: the
store keeps ``G`` states per client. For the small per-client models of
heterogeneous methods that is cheap; per-group stores are a later step.)
"""

from __future__ import annotations

from typing import Sequence

import jax

from fedkd_jax.algorithms.base import ClientOutput, FederatedAlgorithm
from fedkd_jax.errors import ConfigError


def _slot_update(alg: FederatedAlgorithm, g: int, stateful: bool):
    def update(bcast, cstate, data, key) -> ClientOutput:
        own = cstate[g] if stateful else ()
        out = alg.client_update(bcast, own, data, key)
        if not stateful:
            return out
        new = tuple(out.state if i == g else s for i, s in enumerate(cstate))
        return out._replace(state=new)

    return update


def _slot_view(alg: FederatedAlgorithm, g: int, stateful: bool) -> FederatedAlgorithm:
    """The algorithm as group ``g``'s clients see it, over the tuple state."""
    personal = alg.personal_params
    if personal is not None and stateful:
        personal = lambda cs, p=personal: p(cs[g])  # noqa: E731
    return alg._replace(personal_params=personal)


def grouped(per_group: Sequence[FederatedAlgorithm], *, name: str | None = None) -> FederatedAlgorithm:
    """Combine per-group algorithms that share one server side into one algorithm.

    ``per_group[g]`` is the algorithm of group ``g``'s clients; the server side
    (``init``, ``broadcast``, ``server_update``, ``model``, ...) is group 0's,
    and every group's ``client_update`` must return the same upload structure.
    With one group the result trains exactly like ``per_group[0]``.
    """
    per_group = tuple(per_group)
    if not per_group:
        raise ConfigError("model.groups", "needs at least one group")
    base = per_group[0]
    shapes = [jax.tree.structure(jax.eval_shape(a.broadcast, jax.eval_shape(base.init, jax.random.key(0))))
              for a in per_group]
    if any(s != shapes[0] for s in shapes):
        raise ConfigError("model.groups", f"{base.name}: the groups' downloads differ in structure")
    stateful = any(a.init_client is not None for a in per_group)

    def init_client(key):
        # the same key for every slot: a client's own slot is initialised as its group's
        # algorithm would initialise it alone
        return tuple(a.init_client(key) if a.init_client is not None else () for a in per_group)

    return base._replace(
        name=name or base.name,
        init_client=init_client if stateful else None,
        client_update=_slot_update(base, 0, stateful),
        # the engine hands group g's clients slot g of their state and writes back only that slot
        group_updates=tuple((a.client_update if stateful else _slot_update(a, g, False))
                            for g, a in enumerate(per_group)),
        groups=tuple(_slot_view(a, g, stateful) for g, a in enumerate(per_group)),
        personal_params=_slot_view(base, 0, stateful).personal_params,
    )
