"""Which logged values the differential-privacy guarantee covers.

Epsilon bounds what can be learned about one client from the *released*
values: the noised aggregates (the global model and everything computed from
it and from public data, the adaptive clip norm, the noised count). A
simulator also logs values computed from un-noised client data, for the
analyst running the simulation; those are **not** covered, and a paper must
not publish them as private. Rules match metric names by prefix, first match
wins.
"""

from __future__ import annotations

from typing import Iterable

# (prefix, covered?, why)
RULES: tuple[tuple[str, bool, str], ...] = (
    ("round", True, "the round index"),
    ("epsilon", True, "the accountant's output"),
    ("test_", True, "the released global model on the held-out global test set"),
    ("server_", True, "server-side steps on the noised aggregate and public (proxy) data"),
    ("dp_clip_norm", True, "the adaptive clip norm follows the noised count"),
    ("dp_unclipped_fraction_noisy", True, "the noised count"),
    ("bytes_down", True, "the downlink payload of the released update"),
    ("cum_bytes_down", True, "the downlink payload of the released update"),
    ("round_time", True, "wall clock of the simulation"),
    ("wall_time", True, "wall clock of the simulation"),
    ("eval_time", True, "wall clock of the simulation"),
    ("eval_seconds", True, "wall clock of the simulation"),
    ("checkpoint_seconds", True, "wall clock of the simulation"),
    ("dp_mean_norm", False, "the mean un-noised update norm (privacy.log_raw_norm)"),
    ("train_loss", False, "the clients' training loss on their own data"),
    ("client_", False, "client-side metrics and per-client local test accuracy, from client data"),
    ("teacher_acc", False, "private teachers on their clients' local tests"),
    ("bytes_up", False, "upload sizes (FedKD's SVD rank depends on each client's update)"),
    ("cum_bytes_up", False, "upload sizes (FedKD's SVD rank depends on each client's update)"),
    ("clients_contributing", False, "the realised cohort size"),
    ("secagg_", False, "dropouts and aborts of the simulated protocol"),
)


# Methods whose evaluated models are the clients' own (FD, FedProto, FedMD): what the server
# releases is the noised per-class sums or logits, while test_* scores models each client trained
# on its raw data and never released.
OWN_MODELS = (("test_", False, "the clients' own models (trained on their raw data, never released)"),)


def covered(name: str, *, own_models: bool = False) -> bool:
    """Whether the DP guarantee covers the logged value ``name`` (unknown names: not covered).
    ``own_models``: the run evaluates the clients' own models, not a released global model."""
    for prefix, ok, _ in (OWN_MODELS if own_models else ()) + RULES:
        if name.startswith(prefix):
            return ok
    return False


def split(names: Iterable[str], *, own_models: bool = False) -> dict[str, list[str]]:
    """``{"covered": [...], "analyst_only": [...]}`` for the logged columns ``names``."""
    names = list(dict.fromkeys(names))
    ok = {n: covered(n, own_models=own_models) for n in names}
    return {"covered": [n for n in names if ok[n]], "analyst_only": [n for n in names if not ok[n]]}
