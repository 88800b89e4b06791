"""Privacy accounting with Google's ``dp-accounting``: the events the engine runs.

Each round is one sampled Gaussian mechanism on the clients' clipped
payloads (the adaptive clip's noisy count is folded into the same noise
multiplier ``z``, see :mod:`fedkd_jax.privacy.dp`):

* ``sampling="poisson"`` (each client independently with ``q = C / N``, the
  default with DP): ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under
  *add-or-remove-one*, with RDP or PLD. Adding or removing one client moves
  the clipped sum by at most ``S``; the noise std is ``z * S``, so the
  Gaussian's multiplier (noise std over L2 sensitivity) is ``z``.
* ``sampling="fixed"`` (a cohort of ``C`` of ``N`` without replacement):
  ``SampledWithoutReplacementDpEvent(N, C, GaussianDpEvent(z / 2))``.
  ``dp-accounting`` accounts it only under the *replace-one* relation, with
  the RDP accountant. Replacing one client's clipped update ``v`` by ``-v``
  moves the sum by up to ``2 S`` while the noise std stays ``z * S``, so the
  multiplier ``dp-accounting`` must be given is ``z / 2``
  (google/differential-privacy issue 378). For the same ``z`` the
  replace-one epsilon is therefore several times the add-or-remove-one one,
  and the same epsilon needs about twice the noise with fixed-size cohorts.

``R`` rounds are ``SelfComposedDpEvent(round_event, R)``. Every epsilon is
reported with its relation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

from fedkd_jax.errors import ConfigError

if TYPE_CHECKING:
    import dp_accounting as dpa


def _quiet_orders(record) -> bool:
    # dp-accounting logs, for each small RDP order whose series does not converge, that the
    # order is left out: the epsilon stays a valid upper bound over the remaining orders
    return "failed to converge" not in record.getMessage()


def _dpa():
    """``dp-accounting`` (through scipy, ~0.7 s to import), loaded by the first run that
    accounts: runs without DP never pay for it."""
    import logging

    import dp_accounting

    absl = logging.getLogger("absl")
    if _quiet_orders not in absl.filters:
        absl.addFilter(_quiet_orders)
    return dp_accounting

SAMPLINGS = ("fixed", "poisson")
ACCOUNTANTS = ("rdp", "pld")
RELATION = {"fixed": "replace-one", "poisson": "add-or-remove-one"}


class Mechanism(NamedTuple):
    """What one round releases, as the accountant sees it."""

    noise_multiplier: float
    num_clients: int
    cohort_size: int
    sampling: str = "fixed"


def sensitivity_factor(sampling: str) -> float:
    """The clipped sum's L2 sensitivity in units of ``S`` under the sampling's relation."""
    return 2.0 if sampling == "fixed" else 1.0


def round_event(m: Mechanism) -> dpa.DpEvent:
    """One round as a ``dp-accounting`` event (see the module docstring)."""
    dpa = _dpa()
    gauss = dpa.GaussianDpEvent(m.noise_multiplier / sensitivity_factor(m.sampling))
    if m.sampling == "poisson":
        return dpa.PoissonSampledDpEvent(m.cohort_size / m.num_clients, gauss)
    return dpa.SampledWithoutReplacementDpEvent(m.num_clients, m.cohort_size, gauss)


def _accountant(sampling: str, kind: str):
    dpa = _dpa()
    if kind == "pld":
        if sampling != "poisson":
            raise ConfigError("privacy.accountant", "dp-accounting's PLD accountant does not support sampling "
                                                    "without replacement; use rdp or privacy.sampling=poisson")
        from dp_accounting import pld

        return pld.PLDAccountant(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    relation = (dpa.NeighboringRelation.REPLACE_ONE if sampling == "fixed"
                else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    from dp_accounting import rdp

    return rdp.RdpAccountant(neighboring_relation=relation)


def epsilon(m: Mechanism, rounds: int, delta: float, *, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds (``inf`` without noise, 0 for 0 rounds)."""
    if rounds <= 0:
        return 0.0
    if m.noise_multiplier == 0:
        return math.inf
    acct = _accountant(m.sampling, accountant)
    return float(acct.compose(_dpa().SelfComposedDpEvent(round_event(m), int(rounds))).get_epsilon(delta))


class Accountant:
    """The running epsilon of a run, round by round.

    Its whole state is the number of rounds composed, so resuming a run
    restores it exactly from the checkpoint's round. With RDP, orders add up
    over rounds: one round's RDP curve is computed once and ``r`` rounds are
    ``r`` times it (what ``SelfComposedDpEvent(round, r)`` composes to), so
    each round's epsilon costs a conversion, not a new composition.
    """

    def __init__(self, m: Mechanism, delta: float, *, kind: str = "rdp"):
        self.m, self.delta, self.kind = m, delta, kind
        self.rounds = 0
        self._one = None
        if m.noise_multiplier > 0 and kind == "rdp":
            acct = _accountant(m.sampling, kind).compose(round_event(m))
            self._one = (getattr(acct, "_orders", None), getattr(acct, "_rdp", None))

    def restore(self, rounds: int) -> None:
        self.rounds = int(rounds)

    def advance(self, rounds: int = 1) -> float:
        self.rounds += int(rounds)
        return self.epsilon

    def epsilon_at(self, rounds: int) -> float:
        if rounds <= 0:
            return 0.0
        if self.m.noise_multiplier == 0:
            return math.inf
        orders, one = self._one if self._one is not None else (None, None)
        if orders is not None and one is not None:
            from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

            return float(compute_epsilon(orders, rounds * one, self.delta)[0])
        return epsilon(self.m, rounds, self.delta, accountant=self.kind)

    @property
    def epsilon(self) -> float:
        return self.epsilon_at(self.rounds)

    def rounds_within(self, target: float, horizon: int) -> int:
        """The most rounds (up to ``horizon``) whose epsilon stays at most ``target``."""
        lo, hi = 0, int(horizon)
        while lo < hi:  # epsilon grows with rounds
            mid = (lo + hi + 1) // 2
            if self.epsilon_at(mid) <= target:
                lo = mid
            else:
                hi = mid - 1
        return lo

    @property
    def relation(self) -> str:
        return RELATION[self.m.sampling]


def calibrate(target_epsilon: float, delta: float, *, rounds: int, cohort_size: int, num_clients: int,
              sampling: str = "poisson", accountant: str = "rdp", max_noise: float = 1e3) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds cost at most ``target_epsilon`` at ``delta``.

    Raises:
      ConfigError: no multiplier up to ``max_noise`` reaches the target.
    """
    check(delta=delta, target_epsilon=target_epsilon, cohort_size=cohort_size, num_clients=num_clients,
          sampling=sampling, accountant=accountant)

    dpa = _dpa()

    def event(z: float) -> dpa.DpEvent:
        return dpa.SelfComposedDpEvent(round_event(Mechanism(z, num_clients, cohort_size, sampling)), int(rounds))

    if epsilon(Mechanism(max_noise, num_clients, cohort_size, sampling), rounds, delta, accountant=accountant) > target_epsilon:
        raise ConfigError("privacy.target_epsilon", f"no noise multiplier up to {max_noise:g} reaches epsilon "
                                                    f"{target_epsilon:g} at delta {delta:g} over {rounds} rounds")
    z = dpa.calibrate_dp_mechanism(lambda: _accountant(sampling, accountant), event, target_epsilon, delta,
                                   bracket_interval=dpa.ExplicitBracketInterval(1e-3, max_noise), tol=1e-4)
    return float(z)


def check(*, delta: float | None = None, target_epsilon: float | None = None, noise_multiplier: float | None = None,
          clip_norm: float | None = None, cohort_size: int | None = None, num_clients: int | None = None,
          sampling: str = "fixed", accountant: str = "rdp") -> None:
    """Range checks with clear errors (used by the config and the CLI)."""
    if sampling not in SAMPLINGS:
        raise ConfigError("privacy.sampling", f"unknown value {sampling!r}; allowed: {', '.join(SAMPLINGS)}")
    if accountant not in ACCOUNTANTS:
        raise ConfigError("privacy.accountant", f"unknown value {accountant!r}; allowed: {', '.join(ACCOUNTANTS)}")
    if accountant == "pld" and sampling != "poisson":
        raise ConfigError("privacy.accountant", "dp-accounting's PLD accountant does not support sampling without "
                                                "replacement; use rdp or privacy.sampling=poisson")
    if delta is not None and not 0 < delta < 1:
        raise ConfigError("privacy.delta", f"must be in (0, 1); got {delta}")
    if target_epsilon is not None and not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError("privacy.target_epsilon", f"must be a positive number; got {target_epsilon}")
    if noise_multiplier is not None and not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ConfigError("privacy.noise_multiplier", f"must be a finite number >= 0; got {noise_multiplier}")
    if clip_norm is not None and not clip_norm > 0:
        raise ConfigError("privacy.clip_norm", f"must be > 0; got {clip_norm}")
    if cohort_size is not None and num_clients is not None and not 1 <= cohort_size <= num_clients:
        raise ConfigError("run.cohort_size", f"must be in [1, {num_clients}]; got {cohort_size}")
