"""The random stream behind ``seed=``: Philox4x32-10, a counter-based generator.

Philox (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC 2011) maps a 128-bit counter and a 64-bit key to 128 random bits in ten rounds of two
32-bit multiplications.  Nothing is carried from one draw to the next, so each lane of a
batch can draw its own uniforms wherever it runs (a thread of the Numba driver, lane by lane
in the reference) and every backend that implements these few lines gets the same numbers.

The stream (the contract; ``numba_kernels.philox_uniform`` is the same function, tested
bit for bit against this one):

* key: the seed, an int in ``[0, 2**64)``: ``k0 = seed & 0xFFFFFFFF``, ``k1 = seed >> 32``;
* the uniform of flat atom ``a`` of flat lane ``b`` (the batch in C order, sample dims
  first) comes from the counter ``(a >> 1, b & 0xFFFFFFFF, b >> 32, 0)``: words 0 and 1 of
  its output for even ``a``, words 2 and 3 for odd ``a``;
* two words ``(x, y)`` become ``U = (2**26 * (x >> 6) + (y >> 6) + 0.5) / 2**52``, strictly
  inside (0, 1): 52 random bits, so ``log U`` is always finite.
"""
from __future__ import annotations

import numpy as np

M0, M1 = 0xD2511F53, 0xCD9E8D57          # the round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85          # the key increments (golden ratio, sqrt(3) - 1)
ROUNDS = 10
_MASK = 0xFFFFFFFF


def check_seed(seed):
    """``seed`` as an int in ``[0, 2**64)``; ``None`` draws one from the OS's entropy."""
    if seed is None:
        return int(np.random.default_rng().integers(0, 2 ** 64, dtype=np.uint64))
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int in [0, 2**64) or None, got {type(seed).__name__}; "
                        f"pass uniforms= to use another generator")
    if not 0 <= int(seed) < 2 ** 64:
        raise ValueError(f"seed must lie in [0, 2**64), got {int(seed)}")
    return int(seed)


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint64 arrays holding 32-bit words (broadcast together); returns
    the four output words."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in (c0, c1, c2, c3))
    k0, k1 = np.uint64(k0), np.uint64(k1)
    m0, m1, mask = np.uint64(M0), np.uint64(M1), np.uint64(_MASK)
    for r in range(ROUNDS):
        p0, p1 = m0 * c0, m1 * c2                     # 32 x 32 -> 64 bits: no overflow
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask,
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask)
        k0, k1 = (k0 + np.uint64(W0)) & mask, (k1 + np.uint64(W1)) & mask
    return c0, c1, c2, c3


def uniforms(seed, lanes, atoms, first_lane=0):
    """``[lanes, atoms]`` float64 uniforms in (0, 1) of the stream above, for flat lanes
    ``first_lane .. first_lane + lanes - 1`` and flat atoms ``0 .. atoms - 1``."""
    seed = check_seed(seed)
    b = np.arange(first_lane, first_lane + lanes, dtype=np.uint64)[:, None]
    pair = np.arange((atoms + 1) // 2, dtype=np.uint64)[None, :]
    w = philox4x32(pair, b & np.uint64(_MASK), b >> np.uint64(32), np.uint64(0),
                   seed & _MASK, seed >> 32)
    out = np.empty((lanes, 2 * pair.shape[1]))
    out[:, 0::2] = _to_unit(w[0], w[1])
    out[:, 1::2] = _to_unit(w[2], w[3])
    return out[:, :atoms]


def _to_unit(x, y):
    bits = (x >> np.uint64(6)) * np.uint64(2 ** 26) + (y >> np.uint64(6))
    return (bits.astype(np.float64) + 0.5) / 2.0 ** 52
