"""Throwaway certificates for the benchmark: an ECDSA P-256 CA and server certificate for the TLS
baselines, and Ed25519 / ML-DSA-65 CAs with end-entity credentials for hybridkex's PKI modes."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..protocol import PKIAuthenticator, SigningCredential

__all__ = ["SERVER_HOST", "BaselineCerts", "HybridPKI"]

#: The host name the baseline server certificate is issued for (and the client checks).
SERVER_HOST = "bench.hybridkex.invalid"

_SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | mldsa.MLDSA65PrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _hash_for(key: _SigningKey) -> hashes.SHA256 | None:
    return hashes.SHA256() if isinstance(key, ec.EllipticCurvePrivateKey) else None


def _ca(key: _SigningKey, cn: str) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, _hash_for(key))
    )


def _leaf(ca_key: _SigningKey, ca_cert: x509.Certificate, key: _SigningKey, identity: str,
          role: str) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    eku = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    return (
        x509.CertificateBuilder()
        .subject_name(_name(identity))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .sign(ca_key, _hash_for(ca_key))
    )


@dataclass(frozen=True)
class BaselineCerts:
    """What today's TLS deployments use: a P-256 CA and a P-256 server certificate it signed.

    The server sends its certificate; the client trusts the CA (so it verifies the chain's
    signature and the server's CertificateVerify) and checks the host name where the library can.
    """

    ca_path: Path
    cert_path: Path
    key_path: Path
    ca: x509.Certificate
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, directory: Path) -> BaselineCerts:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _ca(ca_key, "hybridkex bench P-256 CA")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf(ca_key, ca, key, SERVER_HOST, "server")
        paths = directory / "p256-ca.pem", directory / "p256-server.pem", directory / "p256-server.key"
        paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        paths[2].chmod(0o600)
        return cls(*paths, ca, cert, key)


@dataclass(frozen=True)
class HybridPKI:
    """Ed25519 and ML-DSA-65 CAs with one credential per algorithm for each hybridkex identity."""

    anchors: dict[str, x509.Certificate]
    credentials: dict[tuple[str, str], SigningCredential]

    @classmethod
    def create(cls, identities: dict[str, str]) -> HybridPKI:
        """``identities`` maps a role (``"client"``/``"server"``) to the identity certified."""
        anchors: dict[str, x509.Certificate] = {}
        creds: dict[tuple[str, str], SigningCredential] = {}
        def make(alg: str) -> ed25519.Ed25519PrivateKey | mldsa.MLDSA65PrivateKey:
            return ed25519.Ed25519PrivateKey.generate() if alg == "ed25519" else mldsa.MLDSA65PrivateKey.generate()

        for alg in ("ed25519", "mldsa65"):
            ca_key = make(alg)
            anchors[alg] = _ca(ca_key, f"hybridkex bench {alg} CA")
            for role, identity in identities.items():
                key = make(alg)
                creds[(alg, role)] = SigningCredential((_leaf(ca_key, anchors[alg], key, identity, role),), key)
        return cls(anchors, creds)

    def authenticator(self, mode: str, role: str) -> PKIAuthenticator:
        """A PKI authenticator for ``mode`` (``pki-ed25519``, ``pki-mldsa65``, ``pki-hybrid``)."""
        algs = ("ed25519", "mldsa65") if mode == "pki-hybrid" else (mode.removeprefix("pki-"),)
        return PKIAuthenticator([self.anchors[a] for a in algs],
                                ed25519=self.credentials.get(("ed25519", role)) if "ed25519" in algs else None,
                                mldsa65=self.credentials.get(("mldsa65", role)) if "mldsa65" in algs else None)
