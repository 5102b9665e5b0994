"""Where the KME is and who it is: the KME URL, the secure-site rule, certificate names, the TLS context.

Used by both ETSI GS QKD 014 clients (:mod:`.client`, :mod:`.aclient`); no I/O beyond reading the
configured PEM files.
"""

from __future__ import annotations

import ipaddress
import ssl
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from ..exceptions import ConfigurationError
from .etsi014 import API_PREFIX

__all__ = ["SecureSiteWarning", "certificate_common_name", "in_secure_site", "is_loopback_host"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SecureSiteWarning(UserWarning):
    """The KME was reached at an address outside loopback and the configured trusted networks.

    ETSI GS QKD 014 assumes the SAE and its KME sit in the same secure site: the keys travel over
    this connection.  Add the KME's network to ``trusted_networks`` once you have checked that the
    path stays inside that site.
    """


def certificate_common_name(pem_path: str | Path) -> str:
    """The subject CN of a PEM certificate: how hybridkex maps a certificate to an SAE or KME ID.

    Raises:
        ConfigurationError: the file is not a PEM certificate or has no single CN.
    """
    try:
        cert = x509.load_pem_x509_certificate(Path(pem_path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read certificate {pem_path}: {exc}", field="cert") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str) or not names[0].value:
        raise ConfigurationError(f"certificate {pem_path} needs exactly one subject CN", field="cert")
    return names[0].value


def peercert_cn(peercert: Mapping[str, Any] | None) -> str | None:
    """The single subject CN of a certificate as ``ssl.getpeercert()`` gives it, else ``None``."""
    # The subject is a tuple of RDNs, each a tuple of (name, value) pairs.
    if not peercert:
        return None
    cns = [value for rdn in peercert.get("subject", ()) for (name, value) in rdn if name == "commonName"]
    return cns[0] if len(cns) == 1 else None


@dataclass(frozen=True, slots=True)
class Target:
    """The parsed KME URL."""

    scheme: str
    host: str
    port: int
    base_path: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.base_path}"


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_url(url: str, allow_insecure_http: bool) -> Target:
    """The KME's base URL; plain HTTP only when allowed and only to a loopback host."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigurationError(f"{url!r} is not an https://HOST[:PORT] URL", field="url")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigurationError(f"{url!r}: the KME URL takes no user, query or fragment", field="url")
    if parts.scheme == "http":
        if not allow_insecure_http:
            raise ConfigurationError(
                f"{url!r} uses plain HTTP; ETSI GS QKD 014 requires HTTPS with mutual TLS "
                "(use https://, or allow_insecure_http=True for a loopback test KME)",
                field="url",
            )
        if not is_loopback_host(parts.hostname):
            raise ConfigurationError(
                f"{url!r}: plain HTTP is allowed only to a loopback address, never across a network",
                field="url",
            )
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigurationError(f"{url!r} has an invalid port", field="url") from None
    base = parts.path.rstrip("/")
    if base.endswith(API_PREFIX):  # accept the API root as well as the KME's base URL
        base = base[: -len(API_PREFIX)]
    return Target(parts.scheme, parts.hostname, port, base)


def networks(values: Iterable[str | Network]) -> tuple[Network, ...]:
    """``trusted_networks`` as network objects."""
    out = []
    for v in values:
        try:
            out.append(v if not isinstance(v, str) else ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise ConfigurationError(
                f"{v!r} is not an IP network (e.g. 10.1.0.0/16)", field="trusted_networks"
            ) from None
    return tuple(out)


def in_secure_site(address: str, trusted: Sequence[Network]) -> bool:
    """True if ``address`` (an IP literal) is loopback or inside one of the ``trusted`` networks."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or any(ip.version == net.version and ip in net for net in trusted)


def client_context(cert: str | Path, key: str | Path, ca: str | Path) -> ssl.SSLContext:
    """The mutual-TLS context of an SAE: its certificate and key, the KME's CA, host names checked."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load TLS files ({cert}, {key}, {ca}): {exc}", field="cert") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # ETSI 014 cl. 5.1: TLS 1.2 or higher
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
