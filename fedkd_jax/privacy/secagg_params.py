"""SecAgg+ parameters: the degree ``k`` of the masking graph and the threshold ``t``.

Bell et al. 2020 ("Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS) replace Bonawitz et al.'s complete graph by a random
``k``-regular graph: the Harary graph H(k, n) (each of the ``n`` clients,
placed on a ring in a random order, is joined to the ``k / 2`` nearest on
each side), and every client secret-shares its keys among its ``k``
neighbours with threshold ``t``. Against a semi-honest server colluding with
at most ``gamma * n`` clients, with at most ``delta * n`` dropouts, ``k`` and
``t`` must make three bad events unlikely (a union bound over the clients):

1. **Security, the graph.** Once the corrupt and dropped clients are
   removed, the honest survivors must stay connected (else the server learns
   the sum of a part). Cutting H(k, n) needs two separate runs of ``k / 2``
   consecutive removed clients on the ring; with ``B`` removed clients of
   ``n``, a union bound over the ``n (n - k - 1) / 2`` pairs of places gives
   ``P <= n (n - k - 1) / 2 * B! (n - k)! / ((B - k)! n!)``; it must stay below
   ``2^-(sigma + 1)``.
2. **Security, the shares.** No client may have ``t`` or more corrupt
   neighbours (they could rebuild its keys): the number of corrupt
   neighbours is hypergeometric (``k`` draws from ``n`` with ``gamma n``
   corrupt), and ``P[X >= t] <= 2^-(sigma + 1) / n``.
3. **Correctness.** Every client needs ``t`` surviving neighbours to have
   its keys rebuilt: with ``S`` surviving neighbours, hypergeometric with
   ``(1 - delta) n`` survivors, ``P[S < t] <= 2^-eta / n``.

(1) and (2) split the security parameter ``sigma`` between them. The search
takes the smallest even ``k`` (H(k, n) is ``k``-regular for every ``n`` only
when ``k`` is even) for which some ``t`` meets (2) and (3), and the smallest
such ``t`` (``>= 2``): it tolerates the most dropouts.

``secagg.neighbors=auto`` uses ``sigma = 40`` and ``eta = 30`` (the paper's
statistical security and correctness), ``gamma = 0.05`` and ``delta`` = the
larger of ``secagg.dropout_rate`` and 1/3: dropouts are rarely known in
advance, and 1/3 keeps auto's rounds about as robust to dropped stragglers
as the complete graph's majority threshold. For another threat model, call
:func:`secagg_parameters` and set ``secagg.neighbors`` and
``secagg.threshold`` to what it returns.

Pure Python (no JAX): configuration checks import it.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

SECURITY_BITS = 40  # sigma
CORRECTNESS_BITS = 30  # eta
CORRUPT_FRACTION = 0.05  # gamma of secagg.neighbors=auto
DESIGN_DROPOUT = 1 / 3  # the least delta secagg.neighbors=auto is sized for
_EPS = 1e-12  # keeps floor(0.05 * 100) at 5 despite binary rounding


class GraphParameters(NamedTuple):
    """SecAgg+'s masking graph: ``neighbors`` (the degree ``k``) and ``threshold`` (``t`` of ``k``)."""

    neighbors: int
    threshold: int


def _log_choose(a: int, b: int) -> float:
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)


def _hypergeometric(n: int, marked: int, draws: int) -> list[float]:
    """``P[X = x]`` for ``x = 0 .. draws``: marked items among ``draws`` of ``n`` without replacement."""
    lo, hi = max(0, draws - (n - marked)), min(draws, marked)
    total = _log_choose(n, draws)
    return [math.exp(_log_choose(marked, x) + _log_choose(n - marked, draws - x) - total) if lo <= x <= hi else 0.0
            for x in range(draws + 1)]


def _log_disconnect(n: int, k: int, removed: int) -> float:
    """Log of the union bound (1) on H(k, n) losing connectivity with ``removed`` clients gone."""
    if k > removed:
        return -math.inf
    return (math.log(n) + math.log(n - k - 1) - math.log(2) + math.lgamma(removed + 1) + math.lgamma(n - k + 1)
            - math.lgamma(n + 1) - math.lgamma(removed - k + 1))


def _thresholds(n: int, k: int, corrupt: int, survivors: int, sigma: float, eta: float) -> tuple[int, int]:
    """The least ``t`` secure under (2) and the largest ``t`` correct under (3) for degree ``k``."""
    bad = _hypergeometric(n, corrupt, k)
    security = 2.0 ** -(sigma + 1) / n
    tail, t_min = 0.0, k + 1  # P[X >= t], from the top down
    for t in range(k, -1, -1):
        tail += bad[t]
        if tail > security:
            break
        t_min = t
    good = _hypergeometric(n, survivors, k)
    correct = 2.0 ** -eta / n
    below, t_max = 0.0, -1  # P[S < t], from the bottom up
    for t in range(0, k + 1):
        if below > correct:
            break
        t_max = t
        below += good[t]
    return max(t_min, 2), t_max


@functools.lru_cache(maxsize=256)
def secagg_parameters(n: int, *, corrupt: float = CORRUPT_FRACTION, dropout: float = DESIGN_DROPOUT,
                      security_bits: float = SECURITY_BITS,
                      correctness_bits: float = CORRECTNESS_BITS) -> GraphParameters | None:
    """The smallest even degree ``k < n - 1`` (and its smallest threshold) meeting the
    three bounds of the module docstring for ``n`` clients, a fraction ``corrupt``
    (gamma) of them corrupt and ``dropout`` (delta) dropping; ``None`` when none does
    (then only the complete graph is left)."""
    if not (0 <= corrupt < 1 and 0 <= dropout < 1):
        raise ValueError(f"corrupt and dropout fractions must be in [0, 1); got {corrupt}, {dropout}")
    bad = math.floor((corrupt + _EPS) * n)
    dropped = math.floor((dropout + _EPS) * n)
    survivors = math.ceil((1 - dropout - _EPS) * n)
    limit = -(security_bits + 1) * math.log(2)
    for k in range(2, n - 1, 2):
        if _log_disconnect(n, k, bad + dropped) >= limit:
            continue
        t_min, t_max = _thresholds(n, k, bad, survivors, security_bits, correctness_bits)
        if t_min <= t_max:
            return GraphParameters(k, t_min)
    return None


def auto_parameters(cohort: int, dropout_rate: float) -> GraphParameters | None:
    """``secagg.neighbors=auto``: :func:`secagg_parameters` for the cohort with gamma = 0.05
    and delta = max(dropout_rate, 1/3); ``None``: the complete graph."""
    return secagg_parameters(cohort, corrupt=CORRUPT_FRACTION, dropout=max(float(dropout_rate), DESIGN_DROPOUT))
