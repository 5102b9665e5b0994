"""docs/spec.md sections 6 and 8 recomputed independently from a recorded handshake: the byte
layout, the combined secret, the key-confirmation MACs and the proofs."""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa, x25519

from hybridkex.combiner import combine_raw
from hybridkex.hazmat.kdf import hkdf, hkdf_expand
from hybridkex.suites import DEFAULT_SUITE

from .helpers import INI_ID, PSK, RES_ID, ConnectionPair, DeterministicRandom, QKDPair, configs


def lp(x: bytes) -> bytes:
    return struct.pack(">I", len(x)) + x


def u16(x: int) -> bytes:
    return struct.pack(">H", x)


class Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos: self.pos + n]
        assert len(out) == n
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def text(self) -> str:
        return self.take(self.u16()).decode()

    def vec16(self) -> bytes:
        return self.take(self.u16())


def _record(auth: str):
    q = QKDPair.create()
    fetched: list = []

    def ini_keys(request):
        keys = q.ini.answer(request)
        fetched.extend(keys)
        return keys

    out = ConnectionPair.create(*configs(auth=auth), q, seed=5, ini_keys=ini_keys).run()
    assert out.ok
    return out, fetched


def _derive(s: bytes, purpose: bytes, length: int) -> bytes:
    info = lp(b"hybridkex/v1") + lp(DEFAULT_SUITE.name.encode()) + lp(purpose) + lp(b"")
    return hkdf_expand("sha256", s, info, length)


def test_combined_secret_from_the_spec():
    """Rebuild S from the messages and the initiator's injected randomness (spec 6.2, 6.3, 8.1)."""
    out, fetched = _record("psk")
    frames = [f for _, f in out.frames]
    for f in frames:
        assert f[:3] == b"HK\x01" and struct.unpack(">I", f[4:8])[0] == len(f) - 8
    # Hello
    h = Cursor(frames[0][8:])
    suites = [h.u16() for _ in range(h.u8())]
    assert suites == [DEFAULT_SUITE.code]
    assert h.text() == INI_ID
    nonce_i, pk_i = h.take(32), h.take(32)
    n_shares = h.u8()
    kem_code, ek = h.u16(), h.vec16()
    assert (n_shares, kem_code, len(ek)) == (1, 0x0001, 1184)
    modes = [h.u8() for _ in range(h.u8())]
    assert modes == [1]
    assert h.u8() == 1  # responder is master
    sae_i, kme_i = h.text(), h.text()
    assert h.u8() == 0b01 and h.u8() == 0  # accepts fresh only; no note
    assert (h.text(), h.u8(), h.u8()) == ("", 0, 0)
    assert h.pos == len(h.data)
    # Response
    r = Cursor(frames[1][8:])
    assert r.u16() == DEFAULT_SUITE.code and r.u8() == 1 and r.text() == RES_ID
    nonce_r, pk_r, ct = r.take(32), r.take(32), r.vec16()
    assert r.u8() == 1 and r.u8() == 0  # fresh, no note
    sae_r, kme_r = r.text(), r.text()
    key_ids = [r.take(36).decode() for _ in range(r.u8())]
    assert r.pos == len(r.data)
    # The initiator's secrets from its injected randomness: nonce, X25519 key, ML-KEM seed.
    rand = DeterministicRandom(5)
    assert rand(32) == nonce_i
    sk_x = x25519.X25519PrivateKey.from_private_bytes(rand(32))
    from cryptography.hazmat.primitives.asymmetric import mlkem

    sk_m = mlkem.MLKEM768PrivateKey.from_seed_bytes(rand(64))
    assert sk_m.public_key().public_bytes_raw() == ek
    ss_x = sk_x.exchange(x25519.X25519PublicKey.from_public_bytes(pk_r))
    ss_m = sk_m.decapsulate(ct)
    binding = (lp(b"".join(lp(k.encode()) for k in key_ids)) + lp(sae_r.encode()) + lp(sae_i.encode())
               + lp(kme_r.encode()) + lp(kme_i.encode()))
    suite = DEFAULT_SUITE.name.encode()
    ma = u16(1) + lp(b"hybridkex/v1 initiator") + lp(suite) + lp(INI_ID.encode()) + lp(nonce_i) + lp(pk_i) \
        + lp(ek) + lp(binding)
    mb = u16(1) + lp(b"hybridkex/v1 responder") + lp(suite) + lp(RES_ID.encode()) + lp(nonce_r) + lp(pk_r) \
        + lp(ct) + lp(binding)
    k_qkd = b"".join(k.key for k in fetched)
    s = combine_raw(DEFAULT_SUITE, qkd_key=k_qkd, x25519_secret=ss_x, pq_secret=ss_m, ma=ma, mb=mb)
    assert _derive(s, b"tls13 external psk", 32) == out.ini_session.tls_psk() == out.res_session.tls_psk()

    # 8.2 / 8.3: confirmation and PSK proofs.
    th_r = hashlib.sha256(frames[0] + frames[1]).digest()
    fin_r = frames[2][8:]
    confirm_r = hmac.digest(_derive(s, b"key confirmation responder", 32), th_r, "sha256")
    k_r = hkdf("sha256", salt=b"hybridkex/v1 psk authentication", ikm=PSK,
               info=lp(b"hybridkex/v1") + lp(suite) + lp(b"psk auth responder"), length=32)
    assert fin_r == confirm_r + u16(32) + hmac.digest(k_r, th_r + confirm_r, "sha256")
    th_i = hashlib.sha256(frames[0] + frames[1] + frames[2]).digest()
    confirm_i = hmac.digest(_derive(s, b"key confirmation initiator", 32), th_i, "sha256")
    k_i = hkdf("sha256", salt=b"hybridkex/v1 psk authentication", ikm=PSK,
               info=lp(b"hybridkex/v1") + lp(suite) + lp(b"psk auth initiator"), length=32)
    assert frames[3][8:] == confirm_i + u16(32) + hmac.digest(k_i, th_i + confirm_i, "sha256")
    assert out.ini_session.info.transcript_hash == hashlib.sha256(b"".join(frames)).hexdigest()


def test_signatures_from_the_spec():
    out, _ = _record("pki-hybrid")
    frames = [f for _, f in out.frames]
    from cryptography import x509

    cert_msg = Cursor(frames[2][8:])
    keys = {}
    for _ in range(cert_msg.u8()):
        alg, n = cert_msg.u8(), cert_msg.u8()
        chain = [cert_msg.vec16() for _ in range(n)]
        keys[alg] = x509.load_der_x509_certificate(chain[0]).public_key()
    assert isinstance(keys[1], ed25519.Ed25519PublicKey) and isinstance(keys[2], mldsa.MLDSA65PublicKey)
    th_r = hashlib.sha256(frames[0] + frames[1] + frames[2]).digest()
    fin = Cursor(frames[3][8:])
    confirm = fin.take(32)
    proof = fin.vec16()
    m = (b"hybridkex/v1 responder finished signature\x00" + DEFAULT_SUITE.name.encode() + b"\x00" + th_r
         + confirm)
    keys[1].verify(proof[:64], m)
    keys[2].verify(proof[64:], m)
    assert len(proof) == 64 + 3309
