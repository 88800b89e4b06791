"""Evaluation of a heterogeneous population, per architecture group.

For each group ``g`` (named ``g0``, ``g1``, ... or by ``model.groups[g].name``):

* ``{g}_local_acc_mean`` / ``_p10`` / ``_p90``: each evaluated client's own
  model (FD and FedProto: the client's model; FedKD: its private teacher) on
  its local test split, over a fixed seeded sample of the group's clients
  (``run.eval_personal_clients`` over the whole population, split by group);
* ``{g}_test_accuracy``: the mean accuracy of those models on the global test
  set, over the first ``global_clients`` of that sample (each model sees every
  global test row);
* a model per group (FedDF across architectures; HeteroFL and FedRolex: the
  group's sub-model of the global model): ``{g}_test_accuracy`` and
  ``{g}_local_acc_*`` are the group model's, on the global test set and on
  its clients' local tests; ``test_accuracy`` weights the groups by their
  population shares;
* FedProto: ``{g}_proto_test_accuracy``, the same with nearest-prototype
  inference against the server's prototypes (the paper's accuracy).

Over all groups: ``group_acc_spread`` (best minus worst group's
``test_accuracy``), and, for methods without a global model, ``test_accuracy``
and ``client_acc_*`` pooled over every evaluated client (so the progress bar,
plots and summaries read the same columns as for any other algorithm). A
method with a global model (FedKD's student) keeps its usual global metrics,
and its personal models' pooled summary is ``teacher_acc_*``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedkd_jax.engine import eval_clients, fetch, make_evaluator, summarize_clients


def _global_accuracy(apply, proto: bool):
    """``(stacked params [E, ...], gx [G, D], gy [G], server) -> [E]`` accuracy of each model."""

    @jax.jit
    def run(stacked, gx, gy, server):
        def one(params):
            logits, feat = apply(params, gx)
            if proto:
                from fedkd_jax.hetero.fedproto import nearest_prototype

                pred = nearest_prototype(feat, server.protos, server.valid)
            else:
                pred = jnp.argmax(logits, -1)
            return jnp.mean((pred == gy).astype(jnp.float32))

        return jax.lax.map(one, stacked)

    return run


def make_group_evaluate(sim, ev_ids: np.ndarray, ev_data, *, personal_block: int = 1024, seed: int = 0,
                        personal_clients: int | None = None, names: list[str] | None = None, host_pool=None,
                        global_clients: int = 50, pool=None) -> Callable[[Any], dict[str, Any]]:
    """``(state) -> dict`` of the metrics in the module docstring."""
    from fedkd_jax.runner.evaluate import PersonalEvaluation

    alg = sim.algorithm
    groups = alg.groups
    names = list(names or []) or [f"g{i}" for i in range(len(groups))]
    member = sim.layout.membership if sim.layout is not None else np.zeros(sim.num_clients, np.int32)
    has_global = jax.eval_shape(alg.model_params, sim._abstract.server) is not None
    global_eval = make_evaluator(alg.model.apply, ignore=tuple(sim.data.accuracy_ignore)) if has_global else None
    sample = np.asarray(ev_ids)[eval_clients(len(ev_ids), personal_clients, seed)]
    gx, gy = ev_data.global_x, ev_data.global_y
    token = gy.ndim > 1
    proto = alg.name == "fedproto"
    per_group = []
    for g, view in enumerate(groups):
        if view.personal_model is None and jax.eval_shape(view.model_params, sim._abstract.server) is not None:
            # a model per group (FedDF across architectures): evaluated like a global model, on the
            # global test set and on the local tests of the group's clients
            ids = np.asarray(ev_ids)[member[np.asarray(ev_ids)] == g]
            evaluator = make_evaluator(view.model.apply, ignore=tuple(sim.data.accuracy_ignore))
            per_group.append((names[g], view, ("global", evaluator, sim.eval_data(ids, pool=host_pool or pool)),
                              ids, None, None))
            continue
        ids = sample[member[sample] == g]
        local = PersonalEvaluation(sim, ids, ev_data, block=personal_block, host_pool=host_pool, algorithm=view)
        local = local if len(local.ids) else None
        probe = ids[:global_clients]
        apply = view.personal_model.apply
        per_group.append((names[g], view, local, probe, None if token else _global_accuracy(apply, False),
                          _global_accuracy(apply, True) if proto and not token else None))

    def evaluate(state) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if has_global:
            ev = {k: fetch(v) for k, v in global_eval(alg.model_params(state.server), ev_data).items()}
            out.update({k: float(v) for k, v in ev.items() if np.ndim(v) == 0})
            out.update(summarize_clients(ev["client_accuracy"]))
        pooled_local, pooled_test, group_test = [], [], []
        weights = []
        for name, view, local, probe, test_fn, proto_fn in per_group:
            if isinstance(local, tuple):  # the group's own global model
                ev = {k: fetch(v) for k, v in local[1](view.model_params(state.server), local[2]).items()}
                out[f"{name}_test_accuracy"] = float(ev["test_accuracy"])
                out.update(summarize_clients(ev["client_accuracy"], prefix=f"{name}_local_acc"))
                group_test.append(float(ev["test_accuracy"]))
                weights.append(float(np.mean(member == len(weights))))
                pooled_local.append(np.asarray(ev["client_accuracy"]))
                continue
            if local is not None:
                acc = local(state)
                pooled_local.append(acc)
                out.update(summarize_clients(acc, prefix=f"{name}_local_acc"))
            if len(probe) and test_fn is not None:
                params = view.personal_params(sim.client_states(state.key, probe))
                acc = np.asarray(fetch(test_fn(params, gx, gy, state.server)))
                pooled_test.append(acc)
                group_test.append(float(acc.mean()))
                out[f"{name}_test_accuracy"] = group_test[-1]
                if proto_fn is not None:
                    out[f"{name}_proto_test_accuracy"] = float(fetch(proto_fn(params, gx, gy, state.server)).mean())
        if group_test:
            out["group_acc_spread"] = max(group_test) - min(group_test)
        local_all = np.concatenate(pooled_local) if pooled_local else np.zeros(0)
        if has_global:
            if any(v.personal_model is not None for v in groups):
                out.update(summarize_clients(local_all, prefix="teacher_acc"))
        else:
            if weights:  # a model per group: their accuracies weighted by the groups' population shares
                out["test_accuracy"] = float(np.dot(weights, group_test) / np.sum(weights))
            elif pooled_test:
                out["test_accuracy"] = float(np.concatenate(pooled_test).mean())
            out.update(summarize_clients(local_all))
        return out

    return evaluate
