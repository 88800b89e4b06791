"""Secure aggregation, simulated faithfully (Bonawitz et al. 2017, CCS).

Inside the compiled round, as the last client-side step of the chain:

1. **Fixed point.** The (clipped, weighted) payload is flattened and encoded
   in the ring Z_(2^bits): ``q = floor(v * 2^f + u)`` with ``u ~ U[0, 1)``
   (unbiased stochastic rounding), stored as two's complement.
2. **Masks.** Every pair of cohort clients ``i < j`` shares a seed ``s_ij``
   (a key agreement, simulated by a key derived from the run's seed, the
   round and the pair); client ``i`` adds ``PRG(s_ij)`` for each ``j > i``
   and subtracts it for each ``j < i``, plus a self mask ``PRG(b_i)``. One
   masked upload is uniformly distributed on the ring (a test checks it).
3. **Sum.** The server adds the masked vectors modulo 2^bits (the round's
   integer all-reduce wraps).
4. **Recovery.** Clients that drop after masking (``dropout_rate``, and
   FedAvg's dropped stragglers) never deliver. The server reconstructs what
   their absence leaves behind: the self masks of the survivors and the
   pairwise masks between survivors and dropped clients (in the protocol,
   from secret shares the survivors hold), and subtracts them. The result is
   exactly the sum of the survivors' fixed-point vectors, which is decoded.
   As in the protocol, the server unmasks only when at least ``threshold``
   clients survive (default: a majority of the cohort); below it the round
   is aborted and counts as an empty round (no server update).

Threat model of this *simulation*: every mask key derives from the round's
key, which the simulated server's code holds, so this code can unmask any
single client; it protects nothing against whoever runs it. What it shows
faithfully is the protocol's arithmetic and cost: the sum a real server
would obtain (exact, with dropouts), the ring's overflow bounds, the
threshold, and the bytes each client sends. A masked upload taken alone is
uniform on the ring (a test checks it), as it would be for a server that
does not hold the keys.

Overflow: each upload is bounded (clip norm ``S``, weight at most ``w``), so
the decoded sum needs ``|sum| <= C * (w * S * 2^f + 1) < 2^(bits-1)``;
:func:`choose_fraction_bits` picks the finest scale that guarantees it and
refuses a ring too small for the cohort. With DP, the noise is added by the
server to the decoded sum (central DP on top of secure aggregation).

Bytes: a client uploads its masked vector (``d * bits / 8``) plus the
protocol's key material: two public keys (64 bytes) and, for each other
cohort member, encrypted shares of its pairwise seed and self-mask key
(80 bytes each), as in the paper's four-round protocol.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedkd_jax.aggregation.base import ClientIn, ClientOut, ServerIn, Transform, no_state
from fedkd_jax.errors import ConfigError

_PAIR, _SELF, _DROP, _ROUND_OFF = 0x5A1, 0x5E1F, 0xD80F, 0x80
KEY_BYTES, SHARE_BYTES = 64, 80


def choose_fraction_bits(bits: int, *, clip_norm: float, max_weight: float, max_clients: int,
                         frac_bits: int | None = None, min_frac_bits: int = 8) -> int:
    """The fixed-point scale ``2^f``: the largest ``f`` (or the given one) for which the
    sum of ``max_clients`` uploads of norm at most ``clip_norm`` cannot overflow."""
    if not 8 <= bits <= 32:
        raise ConfigError("secagg.bits", f"must be in [8, 32]; got {bits}")
    if not math.isfinite(clip_norm):
        raise ConfigError("secagg.enabled", "secure aggregation needs a bound on every upload: set a finite "
                                            "privacy.clip_norm so the sum cannot overflow the ring")
    limit = 2 ** (bits - 1) - 1

    def fits(f: int) -> bool:
        return max_clients * (max_weight * clip_norm * 2.0 ** f + 1) <= limit

    if frac_bits is not None:
        if not 0 <= frac_bits < bits:
            raise ConfigError("secagg.frac_bits", f"must be in [0, secagg.bits = {bits}) (fractional bits of the "
                                                  f"fixed point), or unset to choose the finest safe one; got {frac_bits}")
        if not fits(frac_bits):
            raise ConfigError("secagg.bits", f"a ring of 2^{bits} overflows: {max_clients} clients x weight "
                                             f"{max_weight:g} x clip norm {clip_norm:g} x 2^{frac_bits} exceeds 2^{bits - 1}")
        return frac_bits
    f = max((f for f in range(0, bits) if fits(f)), default=-1)
    if f < min_frac_bits:
        raise ConfigError("secagg.bits", f"a ring of 2^{bits} is too small for {max_clients} clients with clip norm "
                                         f"{clip_norm:g} and weight {max_weight:g}: it leaves {max(f, 0)} fractional "
                                         f"bits (at least {min_frac_bits} needed); use more secagg.bits, a smaller "
                                         "cohort or clip norm")
    return f


def upload_bytes(num_values: int, bits: int, cohort: int) -> int:
    """Bytes one client sends: the masked vector and its key material."""
    return math.ceil(num_values * bits / 8) + KEY_BYTES + SHARE_BYTES * (cohort - 1)


def secure_aggregation(*, bits: int, frac_bits: int, num_clients: int, dropout_rate: float = 0.0,
                       threshold: int = 2) -> Transform:
    """The secure-aggregation transform (see the module docstring).

    ``threshold``: survivors needed to unmask; a round with fewer is aborted
    (the ``aborted`` metric is 1 and the engine treats the round as empty)."""
    if not 0 <= dropout_rate < 1:
        raise ConfigError("secagg.dropout_rate", f"must be in [0, 1); got {dropout_rate}")
    if threshold < 2:
        raise ConfigError("secagg.threshold", f"must be at least 2 (one survivor's sum is its update); got {threshold}")
    mod_mask = jnp.uint32(2**bits - 1) if bits < 32 else None
    scale = float(2 ** frac_bits)
    layout: dict = {}  # the payload's structure, recorded when encode is traced

    def ring(x):
        return x if mod_mask is None else x & mod_mask

    def prg(key, d):
        return ring(jax.random.bits(key, (d,), jnp.uint32))

    def pair_key(rkey, a, b):
        lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rkey, _PAIR), lo), hi)

    def self_key(rkey, i):
        return jax.random.fold_in(jax.random.fold_in(rkey, _SELF), i)

    def encode(payload, cin: ClientIn):
        leaves, treedef = jax.tree.flatten(payload)
        layout["treedef"] = treedef
        layout["shapes"] = [(x.shape, x.dtype) for x in leaves]
        v = jnp.concatenate([x.reshape(-1).astype(jnp.float32) for x in leaves])
        d = v.shape[0]
        u = jax.random.uniform(cin.key, (d,))
        q = jnp.floor(v * scale + u).astype(jnp.int32)
        y = ring(jax.lax.bitcast_convert_type(q, jnp.uint32))
        me = cin.position
        real = cin.ids < num_clients

        def add_pair(j, acc):
            m = prg(pair_key(cin.round_key, me, j), d)
            signed = jnp.where(me < j, m, ring(jnp.uint32(0) - m))
            use = real[j] & (j != me)
            return ring(acc + jnp.where(use, signed, jnp.uint32(0)))

        y = jax.lax.fori_loop(0, cin.ids.shape[0], add_pair, y)
        y = ring(y + prg(self_key(cin.round_key, me), d))
        drop = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(cin.round_key, _DROP), me)) < dropout_rate
        w = jnp.where(drop, 0.0, cin.weight)
        nbytes = math.ceil(d * bits / 8) + KEY_BYTES + SHARE_BYTES * (jnp.sum(real) - 1)
        return {"secagg": y}, ClientOut(w, jnp.where(drop, 0.0, cin.aux_weight), nbytes.astype(jnp.float32))

    encode.needs_cohort = True  # the engine hands each client the whole cohort's ids

    def finalize(total, sin: ServerIn):
        s = total["secagg"]
        d = s.shape[0]
        real = sin.ids < num_clients
        sent = sin.contributes & real
        dropped = real & ~sent
        n = sin.ids.shape[0]

        def recover(i, acc):  # what survivor i's masks leave in the sum
            acc = ring(acc + jnp.where(sent[i], prg(self_key(sin.round_key, i), d), jnp.uint32(0)))

            def pair(j, a):
                m = prg(pair_key(sin.round_key, i, j), d)
                signed = jnp.where(i < j, m, ring(jnp.uint32(0) - m))
                return ring(a + jnp.where(sent[i] & dropped[j], signed, jnp.uint32(0)))

            return jax.lax.fori_loop(0, n, pair, acc)

        masks = jax.lax.fori_loop(0, n, recover, jnp.zeros((d,), jnp.uint32))
        q = ring(s - masks)
        if mod_mask is not None:  # sign-extend from `bits` to 32
            q = jnp.where(q >= 2 ** (bits - 1), q | ~mod_mask, q)
        v = jax.lax.bitcast_convert_type(q, jnp.int32).astype(jnp.float32) / scale
        out, off = [], 0
        for shape, dtype in layout["shapes"]:
            size = math.prod(shape)
            out.append(v[off:off + size].reshape(shape).astype(dtype))
            off += size
        aborted = jnp.sum(sent) < threshold  # the protocol refuses to unmask too few survivors
        out = [jnp.where(aborted, jnp.zeros_like(x), x) for x in out]
        metrics = {"dropped": jnp.sum(dropped).astype(jnp.float32), "aborted": aborted.astype(jnp.float32)}
        return jax.tree.unflatten(layout["treedef"], out), sin.state, metrics

    return Transform("secagg", no_state, encode, finalize, integer_payload=True)
