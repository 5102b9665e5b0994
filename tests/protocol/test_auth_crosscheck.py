"""Our X.509 path validation (``verify_chain``) against an independent one: ``cryptography``'s verifier.

``cryptography.x509.verification`` accepts ML-DSA-signed chains (it refuses Ed25519 keys, which is why
``hybridkex.protocol.auth`` validates chains itself).  For ML-DSA-65 chains shaped as its WebPKI policy
wants them (key identifiers, key usage, SAN), both validators must reach the same verdict on every case:
a valid chain with and without an intermediate, and the common ways a chain is wrong.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from hybridkex.exceptions import AuthenticationError
from hybridkex.protocol._wire import CertificateChain, SignatureAlgorithm
from hybridkex.protocol.auth import verify_chain

NOW = dt.datetime(2027, 1, 15, 12, 0, tzinfo=dt.UTC)
NAME = "responder.example"
DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Node:
    key: mldsa.MLDSA65PrivateKey
    cert: x509.Certificate


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _cert(cn: str, issuer: Node | None, *, ca: bool, not_before: dt.datetime = NOW - 30 * DAY,
          not_after: dt.datetime = NOW + 30 * DAY, san: str = NAME,
          eku: x509.ObjectIdentifier = ExtendedKeyUsageOID.SERVER_AUTH, key_cert_sign: bool | None = None) -> Node:
    key = mldsa.MLDSA65PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    signer = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
    )
    usage = _usage(ca=ca)
    if key_cert_sign is not None:
        usage = _usage(ca=key_cert_sign)
    builder = builder.add_extension(usage, critical=True)
    if not ca:
        builder = (builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([eku]), critical=False))
    return Node(key, builder.sign(signer, None))


@pytest.fixture(scope="module")
def pki() -> dict[str, Node]:
    root = _cert("cross-check root", None, ca=True, not_before=NOW - 365 * DAY, not_after=NOW + 365 * DAY)
    other_root = _cert("cross-check root", None, ca=True)  # same name, other key: an impostor
    inter = _cert("cross-check intermediate", root, ca=True)
    return {"root": root, "other_root": other_root, "inter": inter}


def _under(issuer: Node, anchor: Node) -> tuple[list[Node], Node, bool]:
    """A leaf issued by ``issuer``, sent with it; ``issuer`` is not fit to issue, so this must fail."""
    return [_cert("leaf", issuer, ca=False), issuer], anchor, False


Case = Callable[[dict[str, Node]], tuple[list[Node], Node, bool]]

# Each case: (chain leaf first, trust anchor, expected verdict).
CASES: dict[str, Case] = {
    "leaf under root": lambda p: ([_cert("leaf", p["root"], ca=False)], p["root"], True),
    "leaf under intermediate": lambda p: ([_cert("leaf", p["inter"], ca=False), p["inter"]], p["root"], True),
    "other anchor": lambda p: ([_cert("leaf", p["root"], ca=False)], p["other_root"], False),
    "expired leaf": lambda p: ([_cert("leaf", p["root"], ca=False, not_after=NOW - DAY)], p["root"], False),
    "leaf not yet valid": lambda p: ([_cert("leaf", p["root"], ca=False, not_before=NOW + DAY)], p["root"], False),
    "wrong name": lambda p: ([_cert("leaf", p["root"], ca=False, san="other.example")], p["root"], False),
    "client-only leaf": lambda p: ([_cert("leaf", p["root"], ca=False, eku=ExtendedKeyUsageOID.CLIENT_AUTH)],
                                   p["root"], False),
    "intermediate missing": lambda p: ([_cert("leaf", p["inter"], ca=False)], p["root"], False),
    "issuer not a CA": lambda p: _under(_cert("not a CA", p["root"], ca=False), p["root"]),
    "issuer may not sign certificates": lambda p: _under(
        _cert("no keyCertSign", p["root"], ca=True, key_cert_sign=False), p["root"]),
}


def _ours(chain: list[Node], anchor: Node) -> bool:
    der = tuple(n.cert.public_bytes(Encoding.DER) for n in chain)
    try:
        verify_chain(CertificateChain(SignatureAlgorithm.MLDSA65, der), [anchor.cert], now=NOW, identity=NAME,
                     role="responder")
    except AuthenticationError:
        return False
    return True


def _theirs(chain: list[Node], anchor: Node) -> bool:
    verifier = PolicyBuilder().store(Store([anchor.cert])).time(NOW).build_server_verifier(x509.DNSName(NAME))
    try:
        verifier.verify(chain[0].cert, [n.cert for n in chain[1:]])
    except VerificationError:
        return False
    return True


@pytest.mark.parametrize("case", list(CASES))
def test_both_validators_agree_on_mldsa_chains(pki: dict[str, Node], case: str) -> None:
    chain, anchor, expected = CASES[case](pki)
    assert _theirs(chain, anchor) is expected, f"cryptography's verifier: {case}"
    assert _ours(chain, anchor) is expected, f"hybridkex verify_chain: {case}"
