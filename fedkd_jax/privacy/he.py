"""Homomorphic aggregation with CKKS (optional extra ``he``: ``pip install fedkd_jax[he]``).

TenSEAL (OpenMined's Python binding of Microsoft SEAL) was chosen: it
installs from PyPI as a wheel on Python 3.11+, exposes CKKS vectors with
addition and serialisation, and is maintained; Pyfhel and OpenFHE's Python
wheels were the alternatives, with heavier APIs for the same operations.

Each cohort client encrypts its weighted update ``w * u`` (and ``w``) under
the key holder's public CKKS context; the server adds ciphertexts without
decrypting; the key holder decrypts only the sum. This runs outside the
compiled round (SEAL is a C++ library, not XLA), for small models: a round
trains the cohort with the algorithm's jitted ``client_update`` one client
at a time, encrypts, sums, decrypts and applies the server update.
:func:`run_rounds` runs the same rounds with and without encryption so the
overhead and the CKKS error can be measured side by side.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fedkd_jax.errors import ConfigError


def available() -> bool:
    try:
        import tenseal  # noqa: F401
    except ImportError:
        return False
    return True


class CKKS:
    """A CKKS context (the key holder's) and the operations the protocol needs."""

    def __init__(self, *, poly_modulus_degree: int = 8192, coeff_mod_bit_sizes=(60, 40, 40, 60), scale_bits: int = 40):
        try:
            import tenseal as ts
        except ImportError:
            raise ConfigError("he", "homomorphic aggregation needs the optional extra: pip install 'fedkd_jax[he]' "
                                    "(TenSEAL)") from None
        self.ts = ts
        self.ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree, -1, list(coeff_mod_bit_sizes))
        self.ctx.global_scale = 2.0 ** scale_bits
        self.slots = poly_modulus_degree // 2

    def encrypt(self, v: np.ndarray) -> list:
        """Encrypt a vector as chunks of ``slots`` values (one ciphertext each)."""
        v = np.asarray(v, np.float64)
        return [self.ts.ckks_vector(self.ctx, v[i:i + self.slots].tolist()) for i in range(0, len(v), self.slots)]

    @staticmethod
    def add(a: list, b: list) -> list:
        return [x + y for x, y in zip(a, b)]

    def decrypt(self, enc: list) -> np.ndarray:
        return np.concatenate([np.asarray(c.decrypt(), np.float64) for c in enc])

    @staticmethod
    def nbytes(enc: list) -> int:
        return int(sum(len(c.serialize()) for c in enc))


class HERound(NamedTuple):
    seconds: float
    encrypt_seconds: float
    bytes_up_per_client: int
    max_abs_error: float  # decrypted sum against the plaintext sum of the same uploads


def run_rounds(sim, state, pool, rounds: int, *, ckks: CKKS | None = None) -> tuple[Any, list[HERound]]:
    """``rounds`` FedAvg-style rounds of ``sim``'s algorithm with CKKS aggregation (or plaintext if ``ckks`` is None).

    Uses the simulator's cohorts, client keys and server update, so the two
    paths differ only in how the weighted sum is formed.
    """
    from fedkd_jax.algorithms.base import ClientData
    from fedkd_jax.engine import client_key, round_key
    from fedkd_jax.engine.simulator import _SERVER

    alg = sim.algorithm
    if alg.init_client is not None or alg.aux_from_update is not None:
        raise ConfigError("algorithm", "homomorphic aggregation here covers stateless algorithms without server-side "
                                       "ensembles (fedavg, fedprox)")
    client = jax.jit(lambda params, x, y, count, key: alg.client_update(params, (), ClientData(x, y, count), key))
    server = jax.jit(lambda st, mean, key: alg.server_update(st, mean, (), key, ())[0])
    x_pool, y_pool = np.asarray(pool.x), np.asarray(pool.y)
    log = []
    for _ in range(rounds):
        r = int(jax.device_get(state.round))
        plan = sim.plan(state.key, r, 1)
        rkey = round_key(state.key, state.round)
        params = alg.broadcast(state.server)
        t0 = time.perf_counter()
        enc_total, plain_total, w_total, enc_time, nbytes = None, None, 0.0, 0.0, 0
        for cid, rows, count in zip(plan.ids[0], plan.rows[0], plan.counts[0]):
            if count == 0:
                continue
            out = client(params, x_pool[rows], y_pool[rows], jnp.int32(count), client_key(rkey, int(cid)))
            w = float(out.weight)
            if w <= 0:
                continue
            flat, unravel = ravel_pytree(out.update)
            v = np.asarray(flat, np.float64) * w
            plain_total = v if plain_total is None else plain_total + v
            w_total += w
            if ckks is not None:
                t = time.perf_counter()
                enc = ckks.encrypt(v)
                enc_time += time.perf_counter() - t
                nbytes = ckks.nbytes(enc)
                enc_total = enc if enc_total is None else ckks.add(enc_total, enc)
        if plain_total is None:  # nobody contributed: the server keeps its state
            state = state.replace(round=state.round + 1)
            continue
        total = ckks.decrypt(enc_total)[: len(plain_total)] if ckks is not None else plain_total
        err = float(np.max(np.abs(total - plain_total))) if ckks is not None else 0.0
        mean = unravel(jnp.asarray(total / w_total, jnp.float32))
        new_server = server(state.server, mean, jax.random.fold_in(rkey, _SERVER))
        state = state.replace(round=state.round + 1, server=new_server)
        log.append(HERound(time.perf_counter() - t0, enc_time, nbytes, err))
    return state, log
