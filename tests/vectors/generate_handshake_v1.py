"""Generate tests/vectors/hybridkex-v1-handshakes.json: one complete hybridkex-v1 handshake per
authentication mode (PSK; PKI with Ed25519), with every frame's bytes and the values derived from them.

Run from the repository root:

    python tests/vectors/generate_handshake_v1.py > tests/vectors/hybridkex-v1-handshakes.json

The output is byte-for-byte reproducible (tests/test_handshake_vectors.py re-runs this script):

* every random input is SHAKE-256 of a fixed label, fed to the protocol core's injectable
  ``randbytes`` (nonces, X25519 private keys, the ML-KEM key-generation seed ``d || z``);
* the responder's ML-KEM encapsulation, whose randomness ``cryptography`` draws inside OpenSSL, is
  FIPS 203 ML-KEM.Encaps_internal(ek, m) with a fixed ``m`` (kyber-py, a pure-Python ML-KEM), put in
  through the hazmat hook ``hybridkex.hazmat.deterministic``;
* the QKD key and its key ID are fixed; Ed25519 signatures are deterministic (RFC 8032), the
  certificates have fixed serial numbers and dates, and the clock is fixed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
import uuid
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kyber_py.ml_kem.default_parameters import DEFAULT_PARAMETERS
from kyber_py.ml_kem.ml_kem import ML_KEM

from hybridkex.combiner import CombinedSecret, PartyView, QKDBinding, combine_raw, encode_party
from hybridkex.hazmat.deterministic import derandomize_encapsulation
from hybridkex.policy import Policy, QKDConfig
from hybridkex.protocol import (
    NEED_DATA,
    HandshakeComplete,
    Initiator,
    InitiatorConfig,
    PKIAuthenticator,
    PSKAuthenticator,
    QKDKeysByIdRequired,
    QKDKeysRequired,
    Responder,
    ResponderConfig,
    Session,
    SigningCredential,
)
from hybridkex.qkd import QKDKey

SUITE = "x25519-mlkem768-qkd-hkdfsha256"
INITIATOR, RESPONDER = "client.example", "server.example"
INI_SAE, INI_KME, RES_SAE, RES_KME = "sae-client", "kme-client", "sae-server", "kme-server"
#: 2027-01-15T08:00:00Z: certificate validity is checked at this time.
NOW = 1_800_000_000.0
NOW_DT = dt.datetime.fromtimestamp(NOW, tz=dt.UTC)
FRAME_NAMES = {1: "Hello", 2: "Response", 3: "Certificate", 4: "Finished", 0x7F: "Abort"}


def stream(label: str, n: int) -> bytes:
    return hashlib.shake_256(b"hybridkex-v1 handshake vector " + label.encode()).digest(n)


class Randomness:
    """A named, recorded byte source for one side: call ``i`` returns stream(f"{prefix} {i}")."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.calls: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        value = stream(f"{self.prefix} randbytes {len(self.calls)}", n)
        self.calls.append(value)
        return value


class FixedEncapsulation:
    """ML-KEM-768 encapsulation with a fixed 32-byte ``m`` (FIPS 203 Algorithm 17); remembers its result."""

    def __init__(self, m: bytes) -> None:
        self.m = m
        self.result: tuple[bytes, bytes] | None = None

    def __call__(self, kem_name: str, ek: bytes) -> tuple[bytes, bytes]:
        if kem_name != "ML-KEM-768":
            raise ValueError(f"no fixed encapsulation for {kem_name}")
        kem = ML_KEM(DEFAULT_PARAMETERS["ML768"])
        kem.random_bytes = lambda n: self.m[:n]  # kyber-py's documented randomness source, here fixed
        self.result = kem.encaps(ek)
        return self.result


# --- a deterministic Ed25519 PKI -------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca() -> tuple[ed25519.Ed25519PrivateKey, x509.Certificate]:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(stream("ca ed25519 key", 32))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("hybridkex vector CA"))
        .issuer_name(_name("hybridkex vector CA"))
        .public_key(key.public_key())
        .serial_number(0x1001)
        .not_valid_before(NOW_DT - dt.timedelta(days=30))
        .not_valid_after(NOW_DT + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, None)
    )
    return key, cert


def _leaf(ca_key: ed25519.Ed25519PrivateKey, ca: x509.Certificate, identity: str, role: str,
          serial: int) -> tuple[SigningCredential, bytes]:
    seed = stream(f"{role} ed25519 key", 32)
    key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    eku = ExtendedKeyUsageOID.SERVER_AUTH if role == "responder" else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(identity))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW_DT - dt.timedelta(days=1))
        .not_valid_after(NOW_DT + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .sign(ca_key, None)
    )
    return SigningCredential((cert,), key), seed


# --- one handshake ----------------------------------------------------------------------------------------


def _frames(data: bytes) -> list[bytes]:
    out = []
    while data:
        length = int.from_bytes(data[4:8], "big")
        out.append(data[:8 + length])
        data = data[8 + length:]
    return out


def _pump(side: Initiator | Responder, keys: list[QKDKey]) -> Session | None:
    """Answer the side's events until it needs data; its session once complete."""
    while True:
        event = side.next_event()
        if event is NEED_DATA:
            return None
        if isinstance(event, QKDKeysRequired | QKDKeysByIdRequired):
            side.provide_qkd_keys(keys)
        elif isinstance(event, HandshakeComplete):
            return event.session
        else:  # pragma: no cover - nothing else happens in these handshakes
            raise AssertionError(f"unexpected event {event!r}")


def _th(hash_name: str, frames: list[bytes], finished: bytes) -> str:
    """H(every frame sent before ``finished``): what that Finished's confirm and proof cover."""
    return hashlib.new(hash_name, b"".join(frames[:frames.index(finished)])).hexdigest()


def make_case(auth: str) -> dict[str, Any]:
    qkd_key = QKDKey(str(uuid.UUID(bytes=stream(f"{auth} qkd key id", 16), version=4)), stream(f"{auth} qkd key", 32))
    policy = Policy(suites=(SUITE,))
    auth_inputs: dict[str, Any]
    if auth == "psk":
        psk = stream("bootstrap psk", 32)
        ini_auth: Any = PSKAuthenticator({RESPONDER: psk})
        res_auth: Any = PSKAuthenticator({INITIATOR: psk})
        auth_inputs = {"bootstrap_psk": psk.hex()}
    else:
        ca_key, ca = _ca()
        ini_cred, ini_seed = _leaf(ca_key, ca, INITIATOR, "initiator", 0x2001)
        res_cred, res_seed = _leaf(ca_key, ca, RESPONDER, "responder", 0x2002)
        ini_auth = PKIAuthenticator([ca], ed25519=ini_cred)
        res_auth = PKIAuthenticator([ca], ed25519=res_cred)
        auth_inputs = {
            "trust_anchor_der": ca.public_bytes(Encoding.DER).hex(),
            "initiator_ed25519_private": ini_seed.hex(),
            "responder_ed25519_private": res_seed.hex(),
            "initiator_certificate_der": ini_cred.chain[0].public_bytes(Encoding.DER).hex(),
            "responder_certificate_der": res_cred.chain[0].public_bytes(Encoding.DER).hex(),
        }
    ini_rand, res_rand = Randomness(f"{auth} initiator"), Randomness(f"{auth} responder")
    encaps = FixedEncapsulation(stream(f"{auth} responder mlkem encapsulation m", 32))
    ini = Initiator(InitiatorConfig(INITIATOR, [ini_auth], policy, QKDConfig(INI_SAE, INI_KME),
                                    peer_identity=RESPONDER), randbytes=ini_rand, clock=lambda: NOW)
    res = Responder(ResponderConfig(RESPONDER, [res_auth], policy, QKDConfig(RES_SAE, RES_KME)),
                    randbytes=res_rand, clock=lambda: NOW)
    derandomize_encapsulation(res, encaps)

    frames: list[tuple[str, bytes]] = []
    ini_flight = ini.data_to_send()
    frames += [("initiator", f) for f in _frames(ini_flight)]
    res.receive_data(ini_flight)
    assert _pump(res, [qkd_key]) is None
    res_flight = res.data_to_send()
    frames += [("responder", f) for f in _frames(res_flight)]
    ini.receive_data(res_flight)
    ini_session = _pump(ini, [qkd_key])
    ini_last = ini.data_to_send()
    frames += [("initiator", f) for f in _frames(ini_last)]
    res.receive_data(ini_last)
    res_session = _pump(res, [qkd_key])
    assert ini_session is not None and res_session is not None
    assert ini_session.secret.equals(res_session.secret)

    # What the core drew from each source, in order (docs/spec.md 12).
    nonce_i, x_i, mlkem_seed = ini_rand.calls
    x_r, nonce_r = res_rand.calls
    frame_bytes = [f for _, f in frames]
    suite = ini_session.secret.suite
    finished = [f for f in frame_bytes if f[3] == 4]
    h = suite.hash_len
    # S once more from the components (docs/spec.md 8.1), to publish it and the values behind it.
    assert encaps.result is not None
    ss_m, ct = encaps.result
    pk_i, pk_r = (x25519.X25519PrivateKey.from_private_bytes(k).public_key() for k in (x_i, x_r))
    ss_x = x25519.X25519PrivateKey.from_private_bytes(x_i).exchange(pk_r)
    ek = mlkem.MLKEM768PrivateKey.from_seed_bytes(mlkem_seed).public_key().public_bytes_raw()
    binding = QKDBinding(key_ids=(qkd_key.key_id,), master_sae_id=RES_SAE, slave_sae_id=INI_SAE,
                         master_kme_id=RES_KME, slave_kme_id=INI_KME)
    ma = encode_party(suite, PartyView("initiator", INITIATOR.encode(), nonce_i, pk_i.public_bytes_raw(), ek), binding)
    mb = encode_party(suite, PartyView("responder", RESPONDER.encode(), nonce_r, pk_r.public_bytes_raw(), ct), binding)
    s = combine_raw(suite, qkd_key=qkd_key.key, x25519_secret=ss_x, pq_secret=ss_m, ma=ma, mb=mb)
    assert ini_session.secret.equals(CombinedSecret(suite, s))

    def fin(frame: bytes) -> dict[str, str]:
        body = frame[8:]
        return {"confirm": body[:h].hex(), "proof": body[h + 2:].hex()}

    info = ini_session.info
    return {
        "description": f"full handshake, authentication mode {info.auth_mode}, responder is the ETSI 014 master",
        "auth_mode": info.auth_mode,
        "suite": suite.name,
        "time": NOW,
        "initiator": {"identity": INITIATOR, "sae_id": INI_SAE, "kme_id": INI_KME},
        "responder": {"identity": RESPONDER, "sae_id": RES_SAE, "kme_id": RES_KME},
        "auth_inputs": auth_inputs,
        "qkd": {"key_id": qkd_key.key_id, "key": qkd_key.key.hex(), "master": "responder"},
        "randomness": {
            "initiator_nonce": nonce_i.hex(),
            "initiator_x25519_private": x_i.hex(),
            "initiator_mlkem_seed": mlkem_seed.hex(),
            "responder_x25519_private": x_r.hex(),
            "responder_mlkem_encaps_m": encaps.m.hex(),
            "responder_nonce": nonce_r.hex(),
        },
        "frames": [{"sender": who, "type": FRAME_NAMES[f[3]], "hex": f.hex()} for who, f in frames],
        "derived": {
            "x25519_secret": ss_x.hex(),
            "mlkem_secret": ss_m.hex(),
            "ma": ma.hex(),
            "mb": mb.hex(),
            "combined_secret": s.hex(),  # S (docs/spec.md 4.1)
            "transcript_hash_responder": _th(suite.hash, frame_bytes, finished[0]),  # TH_R
            "finished_responder": fin(finished[0]),
            "transcript_hash_initiator": _th(suite.hash, frame_bytes, finished[1]),  # TH_I
            "finished_initiator": fin(finished[1]),
            "transcript_hash": info.transcript_hash,
            "tls_psk": ini_session.tls_psk().hex(),
            "tls_psk_identity": ini_session.tls_identity().decode("ascii"),
            "next_auth_key_id": ini_session.next_auth_key_id().hex(),
        },
    }


def main() -> None:
    doc = {
        "source": "hybridkex (this project): self-computed, deterministic full handshakes of the hybridkex-v1 "
                  "protocol, docs/spec.md sections 5-8 and 14. Not an independent check.",
        "generator": "tests/vectors/generate_handshake_v1.py (reproduces this file byte for byte)",
        "fields": "hex strings except names, IDs and the TLS PSK identity (ASCII text). frames: every frame "
                  "exactly as sent, header included, in order. randomness: every random input, in the order "
                  "each side drew it (responder_mlkem_encaps_m is the m of FIPS 203 ML-KEM.Encaps_internal). "
                  "derived: S, TH_R/TH_I (the hashes the Finished MACs and proofs cover), confirm/proof of "
                  "each Finished, the session transcript hash (all frames), the TLS PSK and identity.",
        "cases": [make_case("psk"), make_case("pki-ed25519")],
    }
    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
