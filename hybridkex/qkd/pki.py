"""A throwaway demo PKI: one CA and certificates for the KMEs, SAEs and TLS peers.

For local runs and tests only (the CA key sits next to the certificates, unencrypted).  Layout of
the directory, all PEM:

* ``ca.crt``, ``ca.key``: the demo CA (ECDSA P-256).
* ``NAME.crt`` + ``NAME.key`` for each entity.  The subject CN is the entity's ID: the SAE ID for
  SAEs (this is how the simulated KME maps a client certificate to an SAE, and how
  :class:`~hybridkex.qkd.ETSI014Client` learns its own SAE ID), the KME ID for KMEs.

Kinds of certificate:

* ``kme`` (``kme-a``, ``kme-b``): TLS server and client, SAN ``DNS:NAME``, ``DNS:localhost``,
  ``IP:127.0.0.1`` and ``IP:::1``.
* ``sae`` (``sae-a``, ``sae-b``): TLS client only, SAN ``DNS:NAME``.
* ``peer`` (``peer-a``, ``peer-b``): TLS server and client with the same SANs as a KME, for the
  hybridkex endpoints themselves.

Private keys are written with mode 0600.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..exceptions import ConfigurationError

__all__ = ["DEFAULT_KMES", "DEFAULT_PEERS", "DEFAULT_SAES", "DemoPKI", "create_demo_pki"]

Kind = Literal["kme", "sae", "peer"]

DEFAULT_KMES: tuple[str, ...] = ("kme-a", "kme-b")
DEFAULT_SAES: tuple[str, ...] = ("sae-a", "sae-b")
DEFAULT_PEERS: tuple[str, ...] = ("peer-a", "peer-b")

_CA_CN = "hybridkex demo CA"
_LOOPBACK_IPS = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


def _valid_name(name: str) -> str:
    # Names become file names and URL path segments: keep them simple.
    ok = name and len(name) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_.") for c in name)
    if not ok or name.startswith(".") or name == "ca":
        raise ConfigurationError(f"{name!r}: use 1-64 letters, digits, '-', '_' or '.' (not 'ca')", field="name")
    return name


def _write(path: Path, data: bytes, private: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if private:
        os.chmod(path, 0o600)  # also when the file existed with wider permissions


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class DemoPKI:
    """A demo PKI directory (see the module docstring); create with :meth:`create` or :func:`create_demo_pki`."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        """The CA certificate every party trusts."""
        return self.directory / "ca.crt"

    def cert(self, name: str) -> Path:
        """``NAME.crt``."""
        return self.directory / f"{_valid_name(name)}.crt"

    def key(self, name: str) -> Path:
        """``NAME.key``."""
        return self.directory / f"{_valid_name(name)}.key"

    def names(self) -> list[str]:
        """Every entity with a certificate and key here."""
        return sorted(p.stem for p in self.directory.glob("*.crt") if p.stem != "ca" and p.with_suffix(".key").exists())

    @classmethod
    def load(cls, directory: str | Path, required: Iterable[str] = ()) -> DemoPKI:
        """Open an existing PKI directory, checking that the CA and ``required`` entities exist.

        Raises:
            ConfigurationError: a file is missing (the message says how to create it).
        """
        pki = cls(Path(directory))
        missing = [p for p in (pki.ca_cert, *(f for n in required for f in (pki.cert(n), pki.key(n))))
                   if not p.is_file()]
        if missing:
            raise ConfigurationError(
                f"{missing[0]} not found; create a demo PKI with 'hybridkex pki init {directory}'", field="pki"
            )
        return pki

    @classmethod
    def create(
        cls,
        directory: str | Path,
        *,
        kmes: Sequence[str] = DEFAULT_KMES,
        saes: Sequence[str] = DEFAULT_SAES,
        peers: Sequence[str] = DEFAULT_PEERS,
        days: int = 365,
        overwrite: bool = False,
    ) -> DemoPKI:
        """Create a CA and a certificate + key for every KME, SAE and peer name in ``directory``.

        Raises:
            ConfigurationError: ``directory`` already holds a PKI and ``overwrite`` is false.
        """
        pki = cls(Path(directory))
        names = [_valid_name(n) for n in (*kmes, *saes, *peers)]
        if len(set(names)) != len(names):
            raise ConfigurationError("a name appears twice", field="name")
        pki.directory.mkdir(parents=True, exist_ok=True)
        if pki.ca_cert.exists() and not overwrite:
            raise ConfigurationError(
                f"{pki.ca_cert} already exists; pick an empty directory or pass --force to replace the PKI",
                field="pki",
            )
        if days < 1:
            raise ConfigurationError("must be >= 1", field="days")
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CA_CN)])
        ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(ski, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write(pki.directory / "ca.key", _key_pem(ca_key), private=True)
        _write(pki.ca_cert, ca.public_bytes(serialization.Encoding.PEM), private=False)
        for name in kmes:
            pki.issue(name, kind="kme", days=days)
        for name in saes:
            pki.issue(name, kind="sae", days=days)
        for name in peers:
            pki.issue(name, kind="peer", days=days)
        return pki

    def issue(
        self,
        name: str,
        *,
        kind: Kind = "sae",
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        days: int = 365,
    ) -> tuple[Path, Path]:
        """Issue (or re-issue) ``NAME.crt`` + ``NAME.key`` signed by this PKI's CA; CN = ``name``.

        ``dns`` and ``ips`` add subject alternative names to the defaults of ``kind``.

        Returns:
            ``(certificate path, key path)``.
        """
        name = _valid_name(name)
        if kind not in ("kme", "sae", "peer"):
            raise ConfigurationError(f"unknown certificate kind {kind!r} (kme, sae or peer)", field="kind")
        ca_key_path = self.directory / "ca.key"
        try:
            ca_cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
            ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read the demo CA in {self.directory}: {exc}", field="pki") from None
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError(f"{ca_key_path} is not an ECDSA key", field="pki")
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        server = kind in ("kme", "peer")
        sans: list[x509.GeneralName] = [x509.DNSName(name)]
        if server:
            sans += [x509.DNSName("localhost"), *(x509.IPAddress(ip) for ip in _LOOPBACK_IPS)]
        sans += [x509.DNSName(d) for d in dns]
        try:
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        except ValueError as exc:
            raise ConfigurationError(str(exc), field="ips") from None
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write(self.key(name), _key_pem(key), private=True)
        _write(self.cert(name), cert.public_bytes(serialization.Encoding.PEM), private=False)
        return self.cert(name), self.key(name)

    @classmethod
    @contextlib.contextmanager
    def temporary(
        cls,
        *,
        kmes: Sequence[str] = DEFAULT_KMES,
        saes: Sequence[str] = DEFAULT_SAES,
        peers: Sequence[str] = DEFAULT_PEERS,
    ) -> Iterator[DemoPKI]:
        """A demo PKI in a private temporary directory, deleted when the ``with`` block ends."""
        directory = tempfile.mkdtemp(prefix="hybridkex-pki-")
        try:
            yield cls.create(directory, kmes=kmes, saes=saes, peers=peers)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def create_demo_pki(directory: str | Path, *, overwrite: bool = False, peers: Sequence[str] = DEFAULT_PEERS) -> DemoPKI:
    """Create the default demo PKI (``kme-a``, ``kme-b``, ``sae-a``, ``sae-b`` and ``peers``) in ``directory``."""
    return DemoPKI.create(directory, overwrite=overwrite, peers=peers)
