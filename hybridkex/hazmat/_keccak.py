"""A small Keccak-f[1600] sponge for KMAC (NIST SP 800-185), which neither hashlib nor cryptography offers.

Only the KMAC KDF variants of ETSI TS 103 744 use it; they are not on any default path, so clarity
wins over speed.  Checked against hashlib's SHA3/SHAKE and the ETSI KMAC test vectors.
Hand-written because no maintained library fits: hashlib has SHA-3 but no KMAC, cryptography has no
KMAC, and pycryptodome's KMAC refuses keys shorter than 32 bytes, which the CatKDF inputs can be.
"""

from __future__ import annotations

_RC = [
    0x0000000000000001, 0x0000000000008082, 0x800000000000808A, 0x8000000080008000,
    0x000000000000808B, 0x0000000080000001, 0x8000000080008081, 0x8000000000008009,
    0x000000000000008A, 0x0000000000000088, 0x0000000080008009, 0x000000008000000A,
    0x000000008000808B, 0x800000000000008B, 0x8000000000008089, 0x8000000000008003,
    0x8000000000008002, 0x8000000000000080, 0x000000000000800A, 0x800000008000000A,
    0x8000000080008081, 0x8000000000008080, 0x0000000080000001, 0x8000000080008008,
]  # fmt: skip
_ROT = [
    [0, 36, 3, 41, 18],
    [1, 44, 10, 45, 2],
    [62, 6, 43, 15, 61],
    [28, 55, 25, 21, 56],
    [27, 20, 39, 8, 14],
]
_MASK = (1 << 64) - 1


def _rol(v: int, n: int) -> int:
    return ((v << n) | (v >> (64 - n))) & _MASK if n else v


def _keccak_f(a: list[list[int]]) -> None:
    for rc in _RC:
        c = [a[x][0] ^ a[x][1] ^ a[x][2] ^ a[x][3] ^ a[x][4] for x in range(5)]
        d = [c[(x - 1) % 5] ^ _rol(c[(x + 1) % 5], 1) for x in range(5)]
        for x in range(5):
            for y in range(5):
                a[x][y] ^= d[x]
        b = [[0] * 5 for _ in range(5)]
        for x in range(5):
            for y in range(5):
                b[y][(2 * x + 3 * y) % 5] = _rol(a[x][y], _ROT[x][y])
        for x in range(5):
            for y in range(5):
                a[x][y] = b[x][y] ^ ((~b[(x + 1) % 5][y]) & b[(x + 2) % 5][y])
        a[0][0] ^= rc


def keccak(rate: int, data: bytes, suffix: int, out_len: int) -> bytes:
    """Keccak sponge with ``rate`` bytes, domain ``suffix`` bits (0x06 SHA3, 0x1F SHAKE, 0x04 cSHAKE)."""
    state = [[0] * 5 for _ in range(5)]
    padded = bytearray(data)
    padded.append(suffix)
    padded.extend(b"\x00" * ((-len(padded)) % rate))
    padded[-1] |= 0x80
    for off in range(0, len(padded), rate):
        block = padded[off : off + rate]
        for i in range(rate // 8):
            state[i % 5][i // 5] ^= int.from_bytes(block[8 * i : 8 * i + 8], "little")
        _keccak_f(state)
    out = bytearray()
    while True:
        for i in range(rate // 8):
            out += state[i % 5][i // 5].to_bytes(8, "little")
        if len(out) >= out_len:
            return bytes(out[:out_len])
        _keccak_f(state)


def left_encode(x: int) -> bytes:
    n = max(1, (x.bit_length() + 7) // 8)
    return bytes([n]) + x.to_bytes(n, "big")


def right_encode(x: int) -> bytes:
    n = max(1, (x.bit_length() + 7) // 8)
    return x.to_bytes(n, "big") + bytes([n])


def encode_string(s: bytes) -> bytes:
    return left_encode(8 * len(s)) + s


def bytepad(x: bytes, w: int) -> bytes:
    z = left_encode(w) + x
    return z + b"\x00" * ((-len(z)) % w)


def cshake(security: int, data: bytes, out_len: int, name: bytes, custom: bytes) -> bytes:
    rate = 168 if security == 128 else 136
    if not name and not custom:
        return keccak(rate, data, 0x1F, out_len)
    prefix = bytepad(encode_string(name) + encode_string(custom), rate)
    return keccak(rate, prefix + data, 0x04, out_len)


def kmac(security: int, key: bytes, data: bytes, out_len: int, custom: bytes = b"") -> bytes:
    """KMAC128 or KMAC256 (SP 800-185 section 4) with output length ``out_len`` bytes."""
    rate = 168 if security == 128 else 136
    new_x = bytepad(encode_string(key), rate) + data + right_encode(8 * out_len)
    return cshake(security, new_x, out_len, b"KMAC", custom)
