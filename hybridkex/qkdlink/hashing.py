"""The two universal hash families the link uses.

* Toeplitz matrices over GF(2): ``m x n`` bits, defined by ``n + m - 1`` seed bits, two-universal
  (for x != y, Pr[T x = T y] = 2^-m over the seed).  Error verification (a short ``m``) and privacy
  amplification (``m`` = the final key length) both use it.  The product is a binary convolution,
  computed with a float FFT: every sum is an integer at most ``n`` (< 2^53), so rounding is exact.
* A polynomial hash over GF(2^127 - 1) for messages of any length (Wegman-Carter MAC, :mod:`.auth`):
  the message, length-prefixed, is cut into 15-byte limbs m_1..m_L and hashed to
  sum m_i r^(L-i+1) mod p, which is (L/p)-almost-Delta-universal.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from ..exceptions import ConfigurationError

__all__ = ["P127", "poly127", "toeplitz_hash"]

P127 = (1 << 127) - 1
_LIMB = 15  # bytes: every limb is below 2^120 < p


def toeplitz_hash(bits: NDArray[np.uint8], seed: NDArray[np.uint8], out_bits: int) -> NDArray[np.uint8]:
    """``T @ bits mod 2`` for the Toeplitz matrix T[i, j] = seed[i - j + n - 1] (len(seed) = n + m - 1)."""
    n = len(bits)
    if out_bits <= 0 or n == 0:
        raise ConfigurationError("need at least one input and one output bit", field="out_bits")
    if len(seed) != n + out_bits - 1:
        raise ConfigurationError(f"seed must be {n + out_bits - 1} bits", field="seed")
    size = 1 << (len(seed) + n - 2).bit_length()
    conv = np.fft.irfft(np.fft.rfft(seed.astype(np.float64), size) * np.fft.rfft(bits.astype(np.float64), size), size)
    window = conv[n - 1:n - 1 + out_bits]
    return (np.rint(window).astype(np.int64) & 1).astype(np.uint8)


def poly127(key: int, message: bytes) -> int:
    """The polynomial hash of ``message`` under ``key`` (0 <= key < p), an integer below p."""
    if not 0 <= key < P127:
        raise ConfigurationError("hash key out of range", field="key")
    # The length prefix makes messages of different lengths different polynomials (no trailing-zero
    # collisions), keeping the (L/p) bound for any two distinct messages.
    data = len(message).to_bytes(8, "big") + message
    acc = 0
    for i in range(0, len(data), _LIMB):
        # Each limb gets a leading 1 byte so a limb of zeros is not the zero coefficient.
        limb = int.from_bytes(b"\x01" + data[i:i + _LIMB], "big")
        acc = (acc + limb) * key % P127
    return acc
