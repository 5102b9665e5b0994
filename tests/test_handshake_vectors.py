"""The handshake-level known-answer vectors (tests/vectors/hybridkex-v1-handshakes.json).

Two checks: re-running the generators reproduces both vector files byte for byte; and every key value
of each recorded handshake is recomputed from the frame bytes and the recorded random inputs with
hashlib, hmac and cryptography only, following docs/spec.md (sections 4, 6 and 8) as written, so
this checks the spec and the vectors against each other, not hybridkex against itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors"
DOC = json.loads((VECTORS / "hybridkex-v1-handshakes.json").read_text(encoding="utf-8"))
CASES = DOC["cases"]
FRAME_TYPES = {"Hello": 1, "Response": 2, "Certificate": 3, "Finished": 4}


@pytest.mark.parametrize(("script", "output"), [("generate_handshake_v1.py", "hybridkex-v1-handshakes.json"),
                                                ("generate_hybridkex_v1.py", "hybridkex-v1.json")])
def test_generator_reproduces_the_file(script: str, output: str) -> None:
    run = subprocess.run([sys.executable, str(VECTORS / script)], cwd=ROOT, capture_output=True, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert run.stdout == (VECTORS / output).read_bytes()


def test_one_handshake_per_auth_mode() -> None:
    assert [c["auth_mode"] for c in CASES] == ["psk", "pki-ed25519"]
    for c in CASES:
        assert [f["sender"][0] + f["type"] for f in c["frames"]][:2] == ["iHello", "rResponse"]


# --- docs/spec.md, written out ---------------------------------------------------------------------------


def lp(x: bytes) -> bytes:
    return struct.pack(">I", len(x)) + x


def hkdf_extract(hash_name: str, salt: bytes, ikm: bytes) -> bytes:
    return hmac.digest(salt, ikm, hash_name)  # RFC 5869 2.2


def hkdf_expand(hash_name: str, prk: bytes, info: bytes, length: int) -> bytes:
    out, block, i = b"", b"", 1  # RFC 5869 2.3
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([i]), hash_name)
        out, i = out + block, i + 1
    return out[:length]


def derive(hash_name: str, suite: str, s: bytes, purpose: bytes, length: int) -> bytes:
    """Spec 4.3."""
    return hkdf_expand(hash_name, s, lp(b"hybridkex/v1") + lp(suite.encode()) + lp(purpose) + lp(b""), length)


class Cursor:
    """Spec 6.1 notation: u8, u16, text = u16(len) || UTF-8, vec16."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        assert len(out) == n, "truncated"
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def text(self) -> str:
        return self.take(self.u16()).decode("utf-8")

    def vec16(self) -> bytes:
        return self.take(self.u16())

    def done(self) -> bool:
        return self.pos == len(self.data)


def parse_hello(body: bytes) -> dict[str, Any]:
    """Spec 6.2."""
    c = Cursor(body)
    m: dict[str, Any] = {"suites": [c.u16() for _ in range(c.u8())], "identity": c.text(), "nonce": c.take(32),
                         "x25519": c.take(32)}
    m["shares"] = {}
    for _ in range(c.u8()):
        code = c.u16()
        m["shares"][code] = c.vec16()
    m["modes"] = [c.u8() for _ in range(c.u8())]
    m["qkd_master"], m["sae_id"], m["kme_id"] = c.u8(), c.text(), c.text()
    m["accepted"], m["note"], m["peer_sae_id"], m["usage"] = c.u8(), c.u8(), c.text(), c.u8()
    m["key_ids"] = [c.take(36).decode("ascii") for _ in range(c.u8())]
    assert c.done()
    return m


def parse_response(body: bytes) -> dict[str, Any]:
    """Spec 6.3."""
    c = Cursor(body)
    m: dict[str, Any] = {"suite": c.u16(), "mode": c.u8(), "identity": c.text(), "nonce": c.take(32),
                         "x25519": c.take(32), "ct": c.vec16(), "usage": c.u8(), "note": c.u8(),
                         "sae_id": c.text(), "kme_id": c.text()}
    m["key_ids"] = [c.take(36).decode("ascii") for _ in range(c.u8())]
    assert c.done()
    return m


def parse_certificate(body: bytes) -> dict[int, list[bytes]]:
    """Spec 6.4: algorithm -> chain (leaf first)."""
    c = Cursor(body)
    chains = {}
    for _ in range(c.u8()):
        alg, n = c.u8(), c.u8()
        chains[alg] = [c.vec16() for _ in range(n)]
    assert c.done()
    return chains


def parse_finished(body: bytes, hash_len: int) -> tuple[bytes, bytes]:
    c = Cursor(body)
    confirm, proof = c.take(hash_len), c.vec16()
    assert c.done()
    return confirm, proof


def encode_party(code: int, role: bytes, suite: str, identity: str, *, nonce: bytes, pk: bytes, kem: bytes,
                 binding: bytes) -> bytes:
    """Spec 4.2."""
    return (struct.pack(">H", code) + lp(b"hybridkex/v1 " + role) + lp(suite.encode()) + lp(identity.encode())
            + lp(nonce) + lp(pk) + lp(kem) + lp(binding))


def raw_public(key: Any) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["auth_mode"])
def test_recompute_the_handshake_from_its_frames(case: dict[str, Any]) -> None:
    h = bytes.fromhex
    rnd, derived = case["randomness"], case["derived"]
    suite = case["suite"]
    assert suite == "x25519-mlkem768-qkd-hkdfsha256"  # spec 3: code 0x0001, SHA-256, ML-KEM-768, etsi order
    hash_name, hash_len, code = "sha256", 32, 0x0001

    # 6.1: frames = "HK" || u8(1) || u8(type) || u32(len) || body.
    frames = [h(f["hex"]) for f in case["frames"]]
    for f, meta in zip(frames, case["frames"], strict=True):
        assert f[:3] == b"HK\x01" and f[3] == FRAME_TYPES[meta["type"]]
        assert struct.unpack(">I", f[4:8])[0] == len(f) - 8
    kinds = [(m["sender"], m["type"]) for m in case["frames"]]
    hello = parse_hello(frames[0][8:])
    resp = parse_response(frames[1][8:])

    # The initiator's random inputs are what the Hello carries.
    x_i = x25519.X25519PrivateKey.from_private_bytes(h(rnd["initiator_x25519_private"]))
    x_r = x25519.X25519PrivateKey.from_private_bytes(h(rnd["responder_x25519_private"]))
    sk_m = mlkem.MLKEM768PrivateKey.from_seed_bytes(h(rnd["initiator_mlkem_seed"]))
    assert hello["suites"] == [code] and hello["identity"] == case["initiator"]["identity"]
    assert hello["nonce"] == h(rnd["initiator_nonce"]) and hello["x25519"] == raw_public(x_i)
    assert hello["shares"] == {0x0001: sk_m.public_key().public_bytes_raw()}
    assert hello["qkd_master"] == 1 and hello["accepted"] == 0b01 and hello["note"] == 0  # responder master, fresh
    assert (hello["sae_id"], hello["kme_id"]) == (case["initiator"]["sae_id"], case["initiator"]["kme_id"])
    assert (hello["peer_sae_id"], hello["usage"], hello["key_ids"]) == ("", 0, [])
    assert resp["suite"] == code and resp["identity"] == case["responder"]["identity"]
    assert resp["nonce"] == h(rnd["responder_nonce"]) and resp["x25519"] == raw_public(x_r)
    assert (resp["usage"], resp["note"], resp["key_ids"]) == (1, 0, [case["qkd"]["key_id"]])
    assert (resp["sae_id"], resp["kme_id"]) == (case["responder"]["sae_id"], case["responder"]["kme_id"])

    # 4.1 / 8.1: the components and S.
    ss_x = x_i.exchange(x25519.X25519PublicKey.from_public_bytes(resp["x25519"]))
    assert ss_x == x_r.exchange(x25519.X25519PublicKey.from_public_bytes(hello["x25519"]))
    ss_m = sk_m.decapsulate(resp["ct"])
    ek = hello["shares"][0x0001]
    binding = (lp(b"".join(lp(k.encode("ascii")) for k in resp["key_ids"])) + lp(resp["sae_id"].encode())
               + lp(hello["sae_id"].encode()) + lp(resp["kme_id"].encode()) + lp(hello["kme_id"].encode()))
    ma = encode_party(code, b"initiator", suite, hello["identity"], nonce=hello["nonce"], pk=hello["x25519"], kem=ek,
                      binding=binding)
    mb = encode_party(code, b"responder", suite, resp["identity"], nonce=resp["nonce"], pk=resp["x25519"],
                      kem=resp["ct"], binding=binding)
    k_qkd = h(case["qkd"]["key"])
    prk = hkdf_extract(hash_name, b"hybridkex/v1 CatKDF " + suite.encode(), k_qkd + ss_x + ss_m)
    info = hashlib.new(hash_name, lp(b"hybridkex/v1 combined secret") + lp(ma) + lp(mb)).digest()
    s = hkdf_expand(hash_name, prk, info, hash_len)
    assert (ss_x.hex(), ss_m.hex(), ma.hex(), mb.hex(), s.hex()) == (
        derived["x25519_secret"], derived["mlkem_secret"], derived["ma"], derived["mb"], derived["combined_secret"])

    # 8.2: transcripts and confirmation; 8.3: proofs.
    fin_r = kinds.index(("responder", "Finished"))
    fin_i = kinds.index(("initiator", "Finished"))
    th_r = hashlib.new(hash_name, b"".join(frames[:fin_r])).digest()
    th_i = hashlib.new(hash_name, b"".join(frames[:fin_i])).digest()
    assert (th_r.hex(), th_i.hex()) == (derived["transcript_hash_responder"], derived["transcript_hash_initiator"])
    proofs = {}
    for role, index, th in (("responder", fin_r, th_r), ("initiator", fin_i, th_i)):
        confirm, proof = parse_finished(frames[index][8:], hash_len)
        key = derive(hash_name, suite, s, b"key confirmation " + role.encode(), hash_len)
        assert confirm == hmac.digest(key, th, hash_name)
        assert {"confirm": confirm.hex(), "proof": proof.hex()} == derived[f"finished_{role}"]
        proofs[role] = (confirm, proof, th)
    if case["auth_mode"] == "psk":
        assert hello["modes"] == [1] and resp["mode"] == 1
        psk = h(case["auth_inputs"]["bootstrap_psk"])
        for role, (confirm, proof, th) in proofs.items():
            k_role = hkdf_expand(hash_name, hkdf_extract(hash_name, b"hybridkex/v1 psk authentication", psk),
                                 lp(b"hybridkex/v1") + lp(suite.encode()) + lp(b"psk auth " + role.encode()),
                                 hash_len)
            assert hmac.compare_digest(proof, hmac.digest(k_role, th + confirm, hash_name))
    else:
        assert hello["modes"] == [2] and resp["mode"] == 2
        anchor = x509.load_der_x509_certificate(h(case["auth_inputs"]["trust_anchor_der"]))
        for role, (confirm, proof, th) in proofs.items():
            chains = parse_certificate(frames[kinds.index((role, "Certificate"))][8:])
            assert list(chains) == [1] and len(chains[1]) == 1  # one Ed25519 chain, the leaf only
            leaf = x509.load_der_x509_certificate(chains[1][0])
            leaf.verify_directly_issued_by(anchor)
            assert leaf.public_bytes(Encoding.DER) == h(case["auth_inputs"][f"{role}_certificate_der"])
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.DNSName) == [case[role]["identity"]]
            message = (f"hybridkex/v1 {role} finished signature".encode() + b"\x00" + suite.encode() + b"\x00"
                       + th + confirm)
            public = leaf.public_key()
            assert isinstance(public, ed25519.Ed25519PublicKey)
            public.verify(proof, message)  # raises if it does not verify
            seed = h(case["auth_inputs"][f"{role}_ed25519_private"])  # Ed25519 is deterministic (RFC 8032)
            assert ed25519.Ed25519PrivateKey.from_private_bytes(seed).sign(message) == proof

    # 5.2 / 8.2: the session transcript hash covers every frame; 4.3 / 4.3.1: the TLS PSK and identity.
    assert hashlib.new(hash_name, b"".join(frames)).hexdigest() == derived["transcript_hash"]
    assert derive(hash_name, suite, s, b"tls13 external psk", hash_len).hex() == derived["tls_psk"]
    raw_identity = derive(hash_name, suite, s, b"tls13 external psk identity", 16)
    identity = b"hk1-psk." + base64.urlsafe_b64encode(raw_identity).rstrip(b"=")
    assert identity.decode("ascii") == derived["tls_psk_identity"]
    assert derive(hash_name, suite, s, b"next authentication key id", 16).hex() == derived["next_auth_key_id"]


def test_the_code_accepts_the_recorded_frames() -> None:
    """A fresh responder fed the recorded Hello, with the recorded randomness and QKD key, sends the
    recorded Response and Finished: the vectors are the wire format, not a reconstruction."""
    from hybridkex.hazmat.deterministic import derandomize_encapsulation
    from hybridkex.policy import Policy, QKDConfig
    from hybridkex.protocol import PSKAuthenticator, QKDKeysRequired, Responder, ResponderConfig
    from hybridkex.qkd import QKDKey

    case = CASES[0]
    h = bytes.fromhex
    frames = [h(f["hex"]) for f in case["frames"]]
    draws = [h(case["randomness"]["responder_x25519_private"]), h(case["randomness"]["responder_nonce"])]
    sk = mlkem.MLKEM768PrivateKey.from_seed_bytes(h(case["randomness"]["initiator_mlkem_seed"]))
    ct = parse_response(frames[1][8:])["ct"]
    res = Responder(ResponderConfig(case["responder"]["identity"],
                                    [PSKAuthenticator({case["initiator"]["identity"]:
                                                       h(case["auth_inputs"]["bootstrap_psk"])})],
                                    Policy(suites=(case["suite"],)),
                                    QKDConfig(case["responder"]["sae_id"], case["responder"]["kme_id"])),
                    randbytes=lambda n: draws.pop(0), clock=lambda: case["time"])
    derandomize_encapsulation(res, lambda kem, ek: (sk.decapsulate(ct), ct))
    res.receive_data(frames[0])
    assert isinstance(res.next_event(), QKDKeysRequired)
    res.provide_qkd_keys([QKDKey(case["qkd"]["key_id"], h(case["qkd"]["key"]))])
    res.next_event()
    assert res.data_to_send() == frames[1] + frames[2]
