"""Secure aggregation, simulated faithfully: Bonawitz et al. 2017 (CCS) and its
sparse-graph variant SecAgg+ (Bell et al. 2020, CCS).

Inside the compiled round, as the last client-side step of the chain:

1. **Fixed point.** The (clipped, weighted) payload is flattened and encoded
   in the ring Z_(2^bits): ``q = floor(v * 2^f + u)`` with ``u ~ U[0, 1)``
   (unbiased stochastic rounding), stored as two's complement.
2. **Masks.** Two clients joined in the round's *masking graph* share a seed
   ``s_ij`` (a key agreement, simulated by a key derived from the run's seed,
   the round and the pair); of each pair the client at the lower cohort
   position adds ``PRG(s_ij)``, the other subtracts it; every client also
   adds a self mask ``PRG(b_i)``. One masked upload is uniformly distributed
   on the ring (a test checks it). The PRG is ``jax.random.bits`` (threefry)
   or, ~13x cheaper on CPU, a keyed counter-mode hash (:func:`hash_prg`);
   the configuration uses threefry for the complete graph (its uploads as
   before) and the hash for SecAgg+.

   * ``neighbors=None`` (Bonawitz et al.): the complete graph, every pair of
     real cohort members: ``C - 1`` masks per client.
   * ``neighbors=k`` (SecAgg+): the Harary graph H(k, n) over the ``n`` real
     cohort members placed on a ring in a random order, fresh each round
     (the order derives from the round's key): each client is joined to the
     ``k / 2`` nearest on either side, ``k`` masks per client. A cohort of
     ``n <= k`` real clients (Poisson sampling can draw one) uses the
     complete graph on them. Padded cohort slots are never in the graph.
3. **Sum.** The server adds the masked vectors modulo 2^bits (the round's
   integer all-reduce wraps).
4. **Recovery.** Clients that drop after masking (``dropout_rate``, and
   FedAvg's dropped stragglers) never deliver. The server reconstructs what
   their absence leaves behind: the self masks of the survivors and the
   masks between survivors and their dropped neighbours (in the protocol,
   from secret shares of ``b_i`` and of the dropped client's key the
   neighbours hold), and subtracts them. The result is exactly the sum of
   the survivors' fixed-point vectors, which is decoded. The masks differ
   between graphs; the decoded sum does not.

**Threshold and aborts.** A key is rebuilt from ``threshold`` shares.
Complete graph: every cohort member holds a share of every key, so the
server unmasks only when at least ``threshold`` clients survive (default: a
majority of the cohort). SecAgg+: a client's keys are shared among its
``k`` neighbours only, so ``threshold`` is ``t`` of ``k``, per
neighbourhood, and the round aborts when any key the server needs cannot be
rebuilt: a survivor with fewer than ``t`` surviving neighbours (its self
mask), or a dropped client with at least one but fewer than ``t`` surviving
neighbours (the masks it left in a survivor's upload). A round with no
survivor aborts too. An aborted round counts as an empty round (no server
update). :mod:`fedkd_jax.privacy.secagg_params` chooses ``k`` and ``t``
(``secagg.neighbors=auto``) from Bell et al.'s bounds.

Threat model of this *simulation*: every mask key derives from the round's
key, which the simulated server's code holds, so this code can unmask any
single client; it protects nothing against whoever runs it. What it shows
faithfully is the protocol's arithmetic and cost: the sum a real server
would obtain (exact, with dropouts), the ring's overflow bounds, the
threshold, and the bytes each client sends. A masked upload taken alone is
uniform on the ring (a test checks it), as it would be for a server that
does not hold the keys.

Cost: a client expands one PRG per neighbour plus its self mask,
``(k + 1) * d`` words (``C * d`` for the complete graph); the server one per
survivor plus one per survivor-dropped edge. The masking graph is computed
once per round (:func:`masking_graph`, handed to the clients by the engine
through ``ClientIn.setup``), as the real server computes it once and sends
each client its neighbours.

Overflow: each upload is bounded (clip norm ``S``, weight at most ``w``), so
the decoded sum needs ``|sum| <= C * (w * S * 2^f + 1) < 2^(bits-1)``;
:func:`choose_fraction_bits` picks the finest scale that guarantees it and
refuses a ring too small for the cohort. With DP, the noise is added by the
server to the decoded sum (central DP on top of secure aggregation).

Bytes: a client uploads its masked vector (``d * bits / 8``) plus the
protocol's key material: two public keys (64 bytes) and, for each
neighbour (each other cohort member in the complete graph), encrypted
shares of its pairwise seed and self-mask key (80 bytes each), as in the
paper's four-round protocol.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedkd_jax.aggregation.base import ClientIn, ClientOut, ServerIn, Transform, no_state
from fedkd_jax.errors import ConfigError

_PAIR, _SELF, _DROP, _GRAPH, _ROUND_OFF = 0x5A1, 0x5E1F, 0xD80F, 0x6A4F, 0x80
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


def _mix(x: jax.Array) -> jax.Array:
    """A bijective 32-bit integer hash with low bias (xorshift-multiply, Wellons' constants)."""
    x = x ^ (x >> jnp.uint32(16))
    x = x * jnp.uint32(0x21F0AAAD)
    x = x ^ (x >> jnp.uint32(15))
    x = x * jnp.uint32(0x735A2D97)
    return x ^ (x >> jnp.uint32(15))


def hash_prg(key: jax.Array, d: int) -> jax.Array:
    """``d`` mask words in counter mode: word ``c`` is ``mix(mix(c * phi + k0) ^ k1)`` with
    ``(k0, k1)`` the key's words. A bijection of the counter for each key, so the words
    are uniform on Z_(2^32); keyed (different keys give unrelated streams); about 13x
    cheaper than threefry on CPU. Not cryptographic, nor is threefry as used here: the
    simulation's masks protect nothing anyway (see the threat model above)."""
    w = jax.random.key_data(key).reshape(-1)
    c = jnp.arange(d, dtype=jnp.uint32)
    return _mix(_mix(c * jnp.uint32(0x9E3779B9) + w[0]) ^ w[1])


def upload_bytes(num_values: int, bits: int, cohort: int, *, neighbors: int | None = None) -> int:
    """Bytes one client sends: the masked vector and its key material (shares for each of
    its ``min(neighbors, cohort - 1)`` neighbours; every other member without ``neighbors``)."""
    peers = cohort - 1 if neighbors is None else min(neighbors, cohort - 1)
    return math.ceil(num_values * bits / 8) + KEY_BYTES + SHARE_BYTES * peers


PRGS = {"threefry": lambda key, d: jax.random.bits(key, (d,), jnp.uint32), "hash": hash_prg}


def masking_graph(round_key: jax.Array, ids: jax.Array, *, num_clients: int,
                  neighbors: int) -> tuple[jax.Array, jax.Array]:
    """SecAgg+'s masking graph of a round: H(k, n) over the real cohort members in a random order.

    Args:
      round_key: the round's key (the graph is a function of it and of ``ids``).
      ids: ``[Cp]`` cohort ids; ids ``>= num_clients`` pad the cohort and are left out.
      neighbors: ``k``, even.

    Returns:
      ``nb [Cp, k]`` int32 cohort positions of each position's neighbours and
      ``valid [Cp, k]`` bool (false for padding rows, and for the slots a cohort of
      ``n <= k`` real clients leaves empty: it uses the complete graph on them).
    """
    k = neighbors
    cp = ids.shape[0]
    real = ids < num_clients
    n = jnp.sum(real.astype(jnp.int32))
    perm = jax.random.permutation(jax.random.fold_in(round_key, _GRAPH), cp)
    order = perm[jnp.argsort(~real[perm], stable=True)]  # real positions first, in a random order
    slot = jnp.zeros((cp,), jnp.int32).at[order].set(jnp.arange(cp, dtype=jnp.int32))
    j = jnp.arange(1, k + 1, dtype=jnp.int32)
    complete = n <= k
    half = k // 2
    offset = jnp.where(complete, j, jnp.where(j <= half, j, n - (j - half)))  # +1..+k/2 and -1..-k/2 on the ring
    nb = order[(slot[:, None] + offset[None, :]) % jnp.maximum(n, 1)].astype(jnp.int32)
    valid = real[:, None] & jnp.where(complete, j < n, True)[None, :]
    return nb, valid


def secure_aggregation(*, bits: int, frac_bits: int, num_clients: int, dropout_rate: float = 0.0,
                       threshold: int = 2, neighbors: int | None = None, prg: str = "threefry") -> Transform:
    """The secure-aggregation transform (see the module docstring).

    ``neighbors``: ``None`` for the complete graph (Bonawitz et al.), or an even
    ``k`` for SecAgg+'s Harary graph. ``threshold``: survivors needed to unmask
    (complete graph), or surviving neighbours needed to rebuild a key (SecAgg+);
    a round that falls short is aborted (the ``aborted`` metric is 1 and the
    engine treats the round as empty). ``prg``: the mask generator, ``threefry``
    (``jax.random.bits``) or ``hash`` (:func:`hash_prg`); the decoded sum is the
    same with either."""
    if prg not in PRGS:
        raise ValueError(f"prg must be one of {', '.join(PRGS)}; got {prg!r}")
    if not 0 <= dropout_rate < 1:
        raise ConfigError("secagg.dropout_rate", f"must be in [0, 1); got {dropout_rate}")
    if threshold < 2:
        raise ConfigError("secagg.threshold", f"must be at least 2 (one survivor's sum is its update); got {threshold}")
    if neighbors is not None and (neighbors < 2 or neighbors % 2):
        raise ConfigError("secagg.neighbors", f"must be an even integer >= 2 (H(k, n) is k-regular for every n only "
                                              f"for even k), 'auto' or 'full'; got {neighbors}")
    if neighbors is not None and threshold > neighbors:
        raise ConfigError("secagg.threshold", f"must be at most secagg.neighbors = {neighbors} (surviving "
                                              f"neighbours needed to rebuild a key); got {threshold}")
    mod_mask = jnp.uint32(2**bits - 1) if bits < 32 else None
    scale = float(2 ** frac_bits)
    layout: dict = {}  # the payload's structure, recorded when encode is traced

    def ring(x):
        return x if mod_mask is None else x & mod_mask

    expand = PRGS[prg]

    def prg_words(key, d):
        return ring(expand(key, d))

    def pair_key(rkey, a, b):
        lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rkey, _PAIR), lo), hi)

    def pair_mask(rkey, me, other, d):  # what `me` adds for its edge to `other`
        m = prg_words(pair_key(rkey, me, other), d)
        return jnp.where(me < other, m, ring(jnp.uint32(0) - m))

    def self_key(rkey, i):
        return jax.random.fold_in(jax.random.fold_in(rkey, _SELF), i)

    def graph(rkey, ids):
        return masking_graph(rkey, ids, num_clients=num_clients, neighbors=neighbors)

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

        if neighbors is None:
            def add_pair(j, acc):
                use = real[j] & (j != me)
                return ring(acc + jnp.where(use, pair_mask(cin.round_key, me, j, d), jnp.uint32(0)))

            y = jax.lax.fori_loop(0, cin.ids.shape[0], add_pair, y)
            peers = jnp.sum(real) - 1
        else:
            nb, valid = cin.setup if cin.setup is not None else graph(cin.round_key, cin.ids)
            mine, use = nb[me], valid[me]

            def add_neighbour(s, acc):
                return ring(acc + jnp.where(use[s], pair_mask(cin.round_key, me, mine[s], d), jnp.uint32(0)))

            y = jax.lax.fori_loop(0, neighbors, add_neighbour, y)
            peers = jnp.sum(use)
        y = ring(y + prg_words(self_key(cin.round_key, me), d))
        drop = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(cin.round_key, _DROP), me)) < dropout_rate
        w = jnp.where(drop, 0.0, cin.weight)
        nbytes = math.ceil(d * bits / 8) + KEY_BYTES + SHARE_BYTES * peers
        return {"secagg": y}, ClientOut(w, jnp.where(drop, 0.0, cin.aux_weight), nbytes.astype(jnp.float32))

    encode.needs_cohort = True  # the engine hands each client the whole cohort's ids
    if neighbors is not None:
        encode.cohort_setup = graph  # computed once per round, handed to every client as ClientIn.setup

    def complete_masks(sin, sent, dropped, d):
        n = sin.ids.shape[0]

        def recover(i, acc):  # what survivor i's masks leave in the sum
            acc = ring(acc + jnp.where(sent[i], prg_words(self_key(sin.round_key, i), d), jnp.uint32(0)))

            def pair(j, a):
                return ring(a + jnp.where(sent[i] & dropped[j], pair_mask(sin.round_key, i, j, d), jnp.uint32(0)))

            return jax.lax.fori_loop(0, n, pair, acc)

        masks = jax.lax.fori_loop(0, n, recover, jnp.zeros((d,), jnp.uint32))
        return masks, jnp.sum(sent) < threshold  # the protocol refuses to unmask too few survivors

    def sparse_masks(sin, sent, dropped, d):
        nb, valid = graph(sin.round_key, sin.ids)
        alive = valid & sent[nb]  # [Cp, k] which neighbours delivered
        holders = jnp.sum(alive, axis=1)  # surviving holders of each client's shares
        needed = sent | (dropped & (holders > 0))  # survivors' self keys; dropped keys that masked a survivor
        short = needed & (holders < threshold)
        zero = jnp.zeros((d,), jnp.uint32)

        def self_mask(i, acc):  # only survivors: lax.cond skips the PRG for the others
            return jax.lax.cond(sent[i], lambda a: ring(a + prg_words(self_key(sin.round_key, i), d)), lambda a: a, acc)

        def lost_edges(j, acc):  # dropped j: the masks its surviving neighbours added for their edge to it
            def edge(s, a):
                i = nb[j, s]
                return jax.lax.cond(alive[j, s], lambda b: ring(b + pair_mask(sin.round_key, i, j, d)),
                                    lambda b: b, a)

            return jax.lax.cond(dropped[j] & (holders[j] > 0),
                                lambda a: jax.lax.fori_loop(0, neighbors, edge, a), lambda a: a, acc)

        cp = sin.ids.shape[0]
        masks = jax.lax.fori_loop(0, cp, self_mask, zero)
        masks = jax.lax.fori_loop(0, cp, lost_edges, masks)
        return masks, jnp.any(short) | ~jnp.any(sent)

    def finalize(total, sin: ServerIn):
        s = total["secagg"]
        d = s.shape[0]
        real = sin.ids < num_clients
        sent = sin.contributes & real
        dropped = real & ~sent
        masks, aborted = (complete_masks if neighbors is None else sparse_masks)(sin, sent, dropped, d)
        q = ring(s - masks)
        if mod_mask is not None:  # sign-extend from `bits` to 32
            q = jnp.where(q >= 2 ** (bits - 1), q | ~mod_mask, q)
        v = jax.lax.bitcast_convert_type(q, jnp.int32).astype(jnp.float32) / scale
        out, off = [], 0
        for shape, dtype in layout["shapes"]:
            size = math.prod(shape)
            out.append(v[off:off + size].reshape(shape).astype(dtype))
            off += size
        out = [jnp.where(aborted, jnp.zeros_like(x), x) for x in out]
        metrics = {"dropped": jnp.sum(dropped).astype(jnp.float32), "aborted": aborted.astype(jnp.float32)}
        return jax.tree.unflatten(layout["treedef"], out), sin.state, metrics

    return Transform("secagg", no_state, encode, finalize, integer_payload=True)
