"""ETSI GS QKD 014 clients: :class:`ETSI014Client` (blocking) and :class:`AsyncETSI014Client` (asyncio).

Both are :class:`~hybridkex.qkd.KeySource` / :class:`~hybridkex.qkd.AsyncKeySource` implementations
for one local SAE talking to its KME over HTTPS with mutual TLS.

Theory of operation
-------------------
* **Identity.**  This SAE's ID is the subject CN of its client certificate unless ``sae_id`` is
  given; the KME's ID is the subject CN of the KME's certificate (checked against ``kme_id`` when
  that is given).  The KME certificate must also match the host or IP address in the URL.
* **Secure site.**  ETSI 014 key delivery is meant to stay inside the operator's secure site: keys
  cross this connection in the clear apart from TLS.  Plain ``http://`` is refused unless
  ``allow_insecure_http=True`` *and* the host is a loopback address, and a
  :class:`SecureSiteWarning` is issued (and logged) once per address when the KME is reached at an
  address outside loopback and ``trusted_networks``.
* **Retries.**  Only failures that cannot have consumed keys are retried, with exponential backoff
  and jitter, at most ``retries`` times: a connection that could not be established, and a 503
  answer (honouring a ``Retry-After`` up to ``max_backoff``).  A timeout or a broken connection
  *after* the request was sent is not retried: the KME may have served it, and the keys it removed
  cannot be asked for again.  A keep-alive connection that died while idle (closed by the KME, or
  by a KME restart) is replaced once, transparently: the request never reached a live KME.  The
  one-line errors name a refused SAE certificate only when that is known (:mod:`.tlsfail`).
* **Validation.**  Every answer is checked (:mod:`hybridkex.qkd.etsi014`): only the status codes
  the spec defines, JSON content, UUID key IDs, canonical base64, exact sizes and counts, no key ID
  twice, ``dec_keys`` returning exactly the IDs asked for.  A key ID that this client already
  received from ``enc_keys`` (or already fetched by ``dec_keys``) is refused with
  :class:`~hybridkex.exceptions.KeyReuseError`: a QKD key is used at most once.
* Key material never appears in logs, ``repr`` or exception messages.

The blocking client uses only the standard library (``http.client`` + ``ssl``), keeps a small
pool of keep-alive connections and is thread-safe.  The asyncio client uses aiohttp and must be
used from one event loop.
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import logging
import random
import ssl
import threading
import time
import urllib.parse
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import aiohttp
from cryptography import x509
from cryptography.x509.oid import NameOID

from ..exceptions import (
    AlreadyFinalized,
    ConfigurationError,
    HybridKEXError,
    InvalidKeyMaterial,
    KeyReuseError,
)
from . import tlsfail
from .base import QKDKey
from .errors import (
    KMEBadRequestError,
    KMEConnectionError,
    KMEKeyNotFoundError,
    KMEResponseError,
    KMETimeoutError,
    KMEUnauthorizedError,
    KMEUnavailableError,
)
from .etsi014 import (
    API_PREFIX,
    MSG_KEYS_NOT_FOUND,
    STATUS_CODES,
    KMEStatus,
    is_uuid,
    key_ids_body,
    key_request_body,
    loads_strict,
    parse_error_body,
    parse_key_container,
    parse_status,
    sae_path,
)

__all__ = ["AsyncETSI014Client", "ETSI014Client", "SecureSiteWarning", "certificate_common_name"]

log = logging.getLogger("hybridkex.qkd.client")

T = TypeVar("T")

#: Largest KME answer accepted (a full container of 128 keys of 8192 bits is ~180 KB).
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# Idle keep-alive connections older than this are closed instead of reused: servers drop idle
# connections after their own timeout (the simulated KME: 5 s) and a reuse racing that close wastes
# a round trip (the request is then sent again on a new connection).
_IDLE_MAX_AGE = 4.0
_MAX_IDLE_CONNECTIONS = 8
# How many key IDs each client remembers to refuse a repeated one (per role).
_SEEN_IDS_LIMIT = 1 << 17


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


def _peercert_cn(peercert: Mapping[str, Any] | None) -> str | None:
    # ssl.getpeercert() gives subject as a tuple of RDNs, each a tuple of (name, value) pairs.
    if not peercert:
        return None
    cns = [value for rdn in peercert.get("subject", ()) for (name, value) in rdn if name == "commonName"]
    return cns[0] if len(cns) == 1 else None


def _printable(text: str, limit: int = 200) -> str:
    # KME messages are shown to users; keep them one line, short and free of control characters.
    clean = "".join(ch if ch.isprintable() else "?" for ch in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class _Retry:
    """A 503 answer: try again after ``after`` seconds (``None``: our own backoff)."""

    message: str
    after: float | None


@dataclass(frozen=True, slots=True)
class _Target:
    scheme: str
    host: str
    port: int
    base_path: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.base_path}"


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_url(url: str, allow_insecure_http: bool) -> _Target:
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
        if not _is_loopback_host(parts.hostname):
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
    return _Target(parts.scheme, parts.hostname, port, base)


def _networks(
    values: Iterable[str | ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for v in values:
        try:
            out.append(v if not isinstance(v, str) else ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise ConfigurationError(
                f"{v!r} is not an IP network (e.g. 10.1.0.0/16)", field="trusted_networks"
            ) from None
    return tuple(out)


def in_secure_site(address: str, trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """True if ``address`` (an IP literal) is loopback or inside one of the ``trusted`` networks."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or any(ip.version == net.version and ip in net for net in trusted)


class _ClientCore:
    """Configuration, checks and answer interpretation shared by both clients (no I/O here)."""

    def __init__(
        self,
        url: str,
        *,
        cert: str | Path | None,
        key: str | Path | None,
        ca: str | Path | None,
        sae_id: str | None,
        kme_id: str | None,
        timeout: float,
        retries: int,
        backoff: float,
        max_backoff: float,
        trusted_networks: Iterable[str | ipaddress.IPv4Network | ipaddress.IPv6Network],
        allow_insecure_http: bool,
    ) -> None:
        self._target = _parse_url(url, allow_insecure_http)
        if timeout <= 0:
            raise ConfigurationError("must be > 0 seconds", field="timeout")
        if retries < 0:
            raise ConfigurationError("must be >= 0", field="retries")
        if backoff < 0 or max_backoff < backoff:
            raise ConfigurationError("need 0 <= backoff <= max_backoff", field="backoff")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self._trusted = _networks(trusted_networks)
        self._ssl: ssl.SSLContext | None = None
        if self._target.scheme == "https":
            if cert is None or key is None or ca is None:
                raise ConfigurationError(
                    "mutual TLS needs cert, key and ca (this SAE's certificate and key, and the CA of the KME)",
                    field="cert",
                )
            self._ssl = self._client_context(cert, key, ca)
        self._cert = cert
        if sae_id is None:
            if cert is None:
                raise ConfigurationError("give sae_id, or a client certificate whose CN is the SAE ID", field="sae_id")
            sae_id = certificate_common_name(cert)
        self._sae_id = sae_id
        self._expected_kme_id = kme_id
        self._learned_kme_id: str | None = kme_id
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._issued: OrderedDict[str, None] = OrderedDict()
        self._fetched: OrderedDict[str, None] = OrderedDict()
        self._closed = False

    @staticmethod
    def _client_context(cert: str | Path, key: str | Path, ca: str | Path) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
            ctx.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"cannot load TLS files ({cert}, {key}, {ca}): {exc}", field="cert") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # ETSI 014 cl. 5.1: TLS 1.2 or higher
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    # -- identity ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The KME's base URL (without ``/api/v1/keys``)."""
        return self._target.url

    @property
    def sae_id(self) -> str:
        """This SAE's ID (the subject CN of its certificate unless configured)."""
        return self._sae_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, sae_id={self._sae_id!r}, kme_id={self._learned_kme_id!r})"

    def _where(self, method: str, path: str) -> str:
        return f"KME {self.url} {method} {path}"

    def _check_peer(self, peername: Any, peercert: Mapping[str, Any] | None) -> None:
        """Check a fresh connection: the KME's ID from its certificate, and the secure-site rule."""
        address = str(peername[0]) if isinstance(peername, tuple) and peername else ""
        if address and not in_secure_site(address, self._trusted):
            with self._lock:
                first = address not in self._warned
                self._warned.add(address)
            if first:
                msg = (
                    f"KME {self.url} was reached at {address}, outside loopback and the trusted networks: "
                    "QKD key delivery must stay inside the operator's secure site "
                    "(add the network to trusted_networks once you have checked the path)"
                )
                log.warning("%s", msg)
                warnings.warn(msg, SecureSiteWarning, stacklevel=4)
        if self._ssl is None:
            return
        cn = _peercert_cn(peercert)
        if cn is None:
            raise KMEConnectionError(f"KME {self.url}: its certificate has no single subject CN (the KME ID)")
        with self._lock:
            if self._expected_kme_id is not None and cn != self._expected_kme_id:
                raise KMEConnectionError(
                    f"KME {self.url} presented a certificate for {cn!r}, expected KME ID {self._expected_kme_id!r}"
                )
            if self._learned_kme_id is None:
                self._learned_kme_id = cn
            elif cn != self._learned_kme_id:
                raise KMEConnectionError(
                    f"KME {self.url} now presents a certificate for {cn!r}, earlier {self._learned_kme_id!r}"
                )

    # -- requests ---------------------------------------------------------------------------------

    def _path(self, sae: str, endpoint: str) -> str:
        return f"{self._target.base_path}{API_PREFIX}/{sae_path(sae)}/{endpoint}"

    @staticmethod
    def _check_request(number: int, size_bits: int) -> None:
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ConfigurationError(f"must be a positive integer, got {number!r}", field="number")
        if isinstance(size_bits, bool) or not isinstance(size_bits, int) or size_bits <= 0 or size_bits % 8:
            raise ConfigurationError(f"must be a positive multiple of 8 bits, got {size_bits!r}", field="size_bits")

    @staticmethod
    def _check_ids(key_ids: Sequence[str]) -> list[str]:
        ids = list(key_ids)
        if not ids:
            raise InvalidKeyMaterial("no key IDs to fetch")
        for k in ids:
            if not is_uuid(k):
                raise InvalidKeyMaterial(f"QKD key ID {k!r} is not a UUID")
        if len({k.lower() for k in ids}) != len(ids):
            raise InvalidKeyMaterial("a QKD key ID is repeated in one request")
        return ids

    def _remember(self, book: OrderedDict[str, None], keys: Iterable[str], what: str) -> None:
        lowered = [k.lower() for k in keys]
        with self._lock:
            for k in lowered:
                if k in book:
                    raise KeyReuseError(f"KME {self.url} {what} key ID {k} a second time; refusing it")
            for k in lowered:
                book[k] = None
            while len(book) > _SEEN_IDS_LIMIT:
                book.popitem(last=False)

    def _refuse_fetched(self, key_ids: Sequence[str]) -> None:
        with self._lock:
            for k in key_ids:
                if k.lower() in self._fetched:
                    raise KeyReuseError(f"QKD key {k} was already fetched by this SAE; a key is used once")

    def _delay(self, attempt: int, retry: _Retry | None) -> float:
        if retry is not None and retry.after is not None:
            return min(max(retry.after, 0.0), self.max_backoff)
        base = min(self.max_backoff, self.backoff * (2.0**attempt))
        return float(base * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not a secret

    def _interpret(self, where: str, status: int, content_type: str, data: bytes, headers: Mapping[str, str]) -> Any:
        """Turn an HTTP answer into JSON, a :class:`_Retry`, or the typed error it stands for."""
        if status not in STATUS_CODES:
            raise KMEResponseError(f"{where}: HTTP {status}, a status ETSI GS QKD 014 does not define", status=status)
        obj: Any = None
        parse_error: str | None = None
        try:
            obj = loads_strict(data)
        except ValueError as exc:
            parse_error = str(exc)
        if status == 200:
            if content_type.split(";", 1)[0].strip().lower() != "application/json":
                shown_type = _printable(content_type, 60) or "untyped"
                raise KMEResponseError(f"{where}: answer is {shown_type}, not application/json", status=200)
            if parse_error is not None:
                raise KMEResponseError(f"{where}: answer is not valid JSON ({_printable(parse_error, 80)})", status=200)
            return obj
        message, _details = parse_error_body(obj)
        shown = _printable(message) if message else "(no error message)"
        if status == 400:
            if message == MSG_KEYS_NOT_FOUND:
                raise KMEKeyNotFoundError(f"{where}: {MSG_KEYS_NOT_FOUND} (unknown, or already delivered)", status=400)
            raise KMEBadRequestError(f"{where}: KME refused the request (400): {shown}", status=400)
        if status == 401:
            raise KMEUnauthorizedError(
                f"{where}: KME refused SAE {self._sae_id!r} (401): check that the KME serves this SAE "
                "(certificate CN) and that the peer SAE ID is the right one",
                status=401,
            )
        after: float | None = None
        raw_after = headers.get("Retry-After")
        if raw_after is not None and raw_after.strip().isdigit():
            after = float(raw_after.strip())
        return _Retry(shown, after)

    def _unavailable(self, where: str, retry: _Retry) -> KMEUnavailableError:
        return KMEUnavailableError(
            f"{where}: KME unavailable (503) after {self.retries + 1} attempt(s): {retry.message}", status=503
        )

    def _parse_keys(self, obj: Any, where: str, number: int, size_bits: int | None) -> list[QKDKey]:
        keys = parse_key_container(obj, number=number, size_bits=size_bits, where=where)
        self._remember(self._issued, (k.key_id for k in keys), "issued")
        return keys

    def _parse_keys_by_id(self, obj: Any, where: str, key_ids: Sequence[str]) -> list[QKDKey]:
        keys = parse_key_container(obj, number=len(key_ids), size_bits=None, where=where, expected_ids=key_ids)
        self._remember(self._fetched, key_ids, "delivered")
        return keys


class ETSI014Client(_ClientCore):
    """Blocking ETSI GS QKD 014 client for one SAE; a thread-safe :class:`~hybridkex.qkd.KeySource`.

    Args:
        url: the KME's base URL, ``https://HOST[:PORT]`` (a trailing ``/api/v1/keys`` is accepted).
        cert, key: this SAE's client certificate and private key (PEM).  The SAE ID is the
            certificate's subject CN unless ``sae_id`` is given.
        ca: the CA certificate(s) (PEM) that signed the KME's certificate.
        sae_id: this SAE's ID, if it is not the certificate CN.
        kme_id: the KME ID expected in the KME certificate's subject CN; learned from it if ``None``.
        timeout: seconds for connecting and for each read.
        retries: extra attempts after a connection failure or a 503 (the default, 5 with the default
            backoff, keeps trying for about 1.5 to 3 s: long enough to ride out a KME restart).
        backoff, max_backoff: first retry delay and cap (seconds); the delay doubles, with jitter.
        trusted_networks: networks (``"10.1.0.0/16"``) inside the secure site besides loopback.
        allow_insecure_http: permit ``http://`` to a loopback address (tests only).

    Raises:
        ConfigurationError: bad URL, plain HTTP, unreadable TLS files, bad numbers.
    """

    def __init__(
        self,
        url: str,
        *,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        ca: str | Path | None = None,
        sae_id: str | None = None,
        kme_id: str | None = None,
        timeout: float = 10.0,
        retries: int = 5,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        trusted_networks: Iterable[str | ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
        allow_insecure_http: bool = False,
    ) -> None:
        super().__init__(
            url, cert=cert, key=key, ca=ca, sae_id=sae_id, kme_id=kme_id, timeout=timeout, retries=retries,
            backoff=backoff, max_backoff=max_backoff, trusted_networks=trusted_networks,
            allow_insecure_http=allow_insecure_http,
        )
        self._idle: list[tuple[http.client.HTTPConnection, float]] = []

    # -- KeySource --------------------------------------------------------------------------------

    @property
    def kme_id(self) -> str:
        """The KME's ID (its certificate's subject CN); connects once to learn it if needed."""
        if self._learned_kme_id is None:
            if self._ssl is None:
                raise ConfigurationError("over plain HTTP the KME ID cannot be learned; pass kme_id", field="kme_id")
            try:
                self._release(self._connect(self._where("CONNECT", "/")))
            except _ConnectFailed as exc:
                raise KMEConnectionError(f"KME {self.url}: cannot connect ({exc}); is the KME running?") from None
        assert self._learned_kme_id is not None
        return self._learned_kme_id

    def get_keys(self, slave_sae_id: str, number: int = 1, size_bits: int = 256) -> list[QKDKey]:
        """Master role ('Get key'): ``number`` fresh keys of ``size_bits`` shared with ``slave_sae_id``."""
        return self.enc_keys(slave_sae_id, number, size_bits)

    def enc_keys(
        self,
        slave_sae_id: str,
        number: int = 1,
        size_bits: int = 256,
        *,
        additional_slave_sae_ids: Sequence[str] = (),
        extension_mandatory: Sequence[Mapping[str, Any]] = (),
        extension_optional: Sequence[Mapping[str, Any]] = (),
    ) -> list[QKDKey]:
        """'Get key' with every option of the Key request (Table 10); always sent as POST."""
        self._check_request(number, size_bits)
        path = self._path(slave_sae_id, "enc_keys")
        body = key_request_body(number, size_bits, additional_slave_sae_ids, extension_mandatory, extension_optional)
        where = self._where("POST", path)
        obj = self._call("POST", path, body, where)
        return self._parse_keys(obj, where, number, size_bits)

    def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QKDKey]:
        """Slave role ('Get key with key IDs'): the keys ``master_sae_id`` received, in the given order."""
        ids = self._check_ids(key_ids)
        self._refuse_fetched(ids)
        path = self._path(master_sae_id, "dec_keys")
        where = self._where("POST", path)
        obj = self._call("POST", path, key_ids_body(ids), where)
        return self._parse_keys_by_id(obj, where, ids)

    def status(self, slave_sae_id: str) -> KMEStatus:
        """'Get status' for keys shared with ``slave_sae_id``."""
        path = self._path(slave_sae_id, "status")
        where = self._where("GET", path)
        obj = self._call("GET", path, None, where)
        return parse_status(obj, master_sae_id=self._sae_id, slave_sae_id=slave_sae_id, where=where)

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the idle connections; later requests raise :class:`~hybridkex.exceptions.AlreadyFinalized`."""
        with self._lock:
            self._closed = True
        self._drop_idle()

    def __enter__(self) -> ETSI014Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP -------------------------------------------------------------------------------------

    def _new_connection(self) -> http.client.HTTPConnection:
        t = self._target
        if self._ssl is None:
            return http.client.HTTPConnection(t.host, t.port, timeout=self.timeout)
        return http.client.HTTPSConnection(t.host, t.port, timeout=self.timeout, context=self._ssl)

    def _connect(self, where: str) -> http.client.HTTPConnection:
        """A new, connected and checked connection. Raises :class:`_ConnectFailed` when retryable."""
        conn = self._new_connection()
        try:
            conn.connect()
        except ssl.SSLCertVerificationError as exc:
            conn.close()
            raise KMEConnectionError(
                f"{where}: the KME's certificate did not verify ({exc.verify_message}); "
                "check the CA file and that the certificate names this host or IP"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if (alert := tlsfail.alert_reason(exc)) is not None:  # TLS 1.2 refuses during the handshake
                raise KMEConnectionError(tlsfail.cert_hint(where, self._cert, alert)) from None
            raise _ConnectFailed(f"{type(exc).__name__}: {exc}") from None
        sock = conn.sock
        try:
            peercert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
            peername = sock.getpeername()
        except OSError as exc:  # dropped right after the handshake, before we sent anything
            conn.close()
            self._raise_if_certificate_refused(where)
            raise _ConnectFailed(f"{type(exc).__name__}: {exc}") from None
        try:
            self._check_peer(peername, peercert)
        except BaseException:
            conn.close()
            raise
        return conn

    def _checkout(self) -> tuple[http.client.HTTPConnection | None, bool]:
        now = time.monotonic()
        stale: list[http.client.HTTPConnection] = []
        found: http.client.HTTPConnection | None = None
        with self._lock:
            if self._closed:
                raise AlreadyFinalized(f"ETSI014Client for {self.url} is closed")
            while self._idle:
                conn, since = self._idle.pop()
                if now - since <= _IDLE_MAX_AGE:
                    found = conn
                    break
                stale.append(conn)
        for conn in stale:
            conn.close()
        return found, found is not None

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()

    def _release(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < _MAX_IDLE_CONNECTIONS:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()

    def _roundtrip(
        self, method: str, path: str, body: bytes | None, where: str
    ) -> tuple[int, str, bytes, dict[str, str]]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        for _ in range(2):  # the second pass only replaces a keep-alive connection closed while idle
            conn, reused = self._checkout()
            if conn is None:
                conn = self._connect(where)
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
            except tlsfail.CONNECTION_DROPPED as exc:  # includes http.client.RemoteDisconnected
                conn.close()
                if reused:  # closed while idle, or the KME restarted: it never saw this request
                    self._drop_idle()  # the other idle ones are as old: the retry gets a new connection
                    continue
                self._raise_dropped(where, exc)
            except TimeoutError:
                conn.close()
                raise KMETimeoutError(f"{where}: no answer within {self.timeout:g} s") from None
            except ssl.SSLError as exc:
                conn.close()
                if (alert := tlsfail.alert_reason(exc)) is not None:
                    raise KMEConnectionError(tlsfail.cert_hint(where, self._cert, alert)) from None
                raise KMEConnectionError(
                    f"{where}: TLS failure after the request was sent ({exc.reason or exc}); the KME may have served it"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise KMEConnectionError(f"{where}: {type(exc).__name__}: {exc}") from None
            try:
                length = resp.getheader("Content-Length")
                if length is not None and length.isdigit() and int(length) > MAX_RESPONSE_BYTES:
                    raise KMEResponseError(f"{where}: answer of {length} bytes is too large", status=resp.status)
                data = resp.read(MAX_RESPONSE_BYTES + 1)
                if len(data) > MAX_RESPONSE_BYTES:
                    raise KMEResponseError(f"{where}: answer is too large", status=resp.status)
            except TimeoutError:
                conn.close()
                raise KMETimeoutError(f"{where}: answer not complete within {self.timeout:g} s") from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise KMEConnectionError(f"{where}: answer cut short ({type(exc).__name__})") from None
            except BaseException:
                conn.close()
                raise
            hdrs = {k: v for k, v in resp.getheaders()}
            if resp.isclosed() and not resp.will_close:
                self._release(conn)
            else:
                conn.close()
            return resp.status, resp.getheader("Content-Type") or "", data, hdrs
        raise KMEConnectionError(f"{where}: the KME closed the connection twice before answering")

    def _raise_if_certificate_refused(self, where: str) -> None:
        t = self._target
        if self._ssl is not None and tlsfail.closes_before_request(t.host, t.port, self._ssl, self.timeout):
            raise KMEConnectionError(tlsfail.cert_hint(where, self._cert, tlsfail.PROBE_DETAIL)) from None

    def _raise_dropped(self, where: str, exc: BaseException) -> NoReturn:
        self._raise_if_certificate_refused(where)
        raise KMEConnectionError(
            f"{where}: connection lost after the request was sent ({type(exc).__name__}); the KME may have served it"
        ) from None

    def _call(self, method: str, path: str, body_obj: dict[str, Any] | None, where: str) -> Any:
        body = None if body_obj is None else json.dumps(body_obj).encode("utf-8")
        attempt = 0
        while True:
            retry: _Retry | None = None
            try:
                status, ctype, data, headers = self._roundtrip(method, path, body, where)
            except _ConnectFailed as exc:
                if attempt >= self.retries:
                    raise KMEConnectionError(
                        f"{where}: cannot connect after {attempt + 1} attempt(s) ({exc}); is the KME running?"
                    ) from None
            else:
                outcome = self._interpret(where, status, ctype, data, headers)
                if not isinstance(outcome, _Retry):
                    return outcome
                retry = outcome
                if attempt >= self.retries:
                    raise self._unavailable(where, retry)
            delay = self._delay(attempt, retry)
            log.info("%s: retrying in %.2f s (attempt %d of %d)", where, delay, attempt + 2, self.retries + 1)
            time.sleep(delay)
            attempt += 1


class _ConnectFailed(HybridKEXError):
    """Internal: a connection could not be established (nothing was sent, so a retry is safe)."""


class _StaleConnection(HybridKEXError):
    """Internal: a reused keep-alive connection was dead before any answer (a retry is safe)."""


class AsyncETSI014Client(_ClientCore):
    """asyncio ETSI GS QKD 014 client for one SAE; an :class:`~hybridkex.qkd.AsyncKeySource`.

    Same arguments and behaviour as :class:`ETSI014Client`.  Use it from one event loop, as an
    ``async with`` block or calling :meth:`aclose` at the end.  :attr:`kme_id` is known after the
    first request, or after ``await client.connect()``, unless ``kme_id`` was given.
    """

    def __init__(
        self,
        url: str,
        *,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        ca: str | Path | None = None,
        sae_id: str | None = None,
        kme_id: str | None = None,
        timeout: float = 10.0,
        retries: int = 5,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        trusted_networks: Iterable[str | ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
        allow_insecure_http: bool = False,
    ) -> None:
        super().__init__(
            url, cert=cert, key=key, ca=ca, sae_id=sae_id, kme_id=kme_id, timeout=timeout, retries=retries,
            backoff=backoff, max_backoff=max_backoff, trusted_networks=trusted_networks,
            allow_insecure_http=allow_insecure_http,
        )
        self._session: aiohttp.ClientSession | None = None
        # aiohttp may hand a pooled connection back before we can look at it, so the KME's
        # certificate and address are checked once on a connection of our own (connect()), and
        # again on each answer whose connection is still reachable.
        self._probed = False

    @property
    def kme_id(self) -> str:
        """The KME's ID (its certificate's subject CN).

        Raises:
            ConfigurationError: not known yet (no request made and no ``kme_id`` given).
        """
        if self._learned_kme_id is None:
            raise ConfigurationError("KME ID not known yet: await connect() first, or pass kme_id", field="kme_id")
        return self._learned_kme_id

    async def connect(self) -> None:
        """Open a connection now (learning the KME ID and checking the secure-site rule)."""
        if self._closed:
            raise AlreadyFinalized(f"AsyncETSI014Client for {self.url} is closed")
        attempt = 0
        while True:
            try:
                await self._probe()
                self._probed = True
                return
            except _ConnectFailed as exc:
                if attempt >= self.retries:
                    raise KMEConnectionError(
                        f"KME {self.url}: cannot connect after {attempt + 1} attempt(s) ({exc}); is the KME running?"
                    ) from None
            await asyncio.sleep(self._delay(attempt, None))
            attempt += 1

    async def _probe(self) -> None:
        # A status request would need a slave ID; a bare TLS connection is enough to learn the KME ID.
        t = self._target
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(asyncio.Protocol, t.host, t.port, ssl=self._ssl,
                                       server_hostname=t.host if self._ssl else None),
                self.timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            raise KMEConnectionError(f"KME {self.url}: certificate did not verify ({exc.verify_message})") from None
        except (OSError, TimeoutError) as exc:
            if (alert := tlsfail.alert_reason(exc)) is not None:  # TLS 1.2 refuses during the handshake
                raise KMEConnectionError(tlsfail.cert_hint(f"KME {self.url}", self._cert, alert)) from None
            raise _ConnectFailed(f"{type(exc).__name__}: {exc}") from None
        try:
            self._check_peer(transport.get_extra_info("peername"), transport.get_extra_info("peercert"))
        finally:
            transport.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise AlreadyFinalized(f"AsyncETSI014Client for {self.url} is closed")
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else False,
                                             limit=32, keepalive_timeout=_IDLE_MAX_AGE)
            self._session = aiohttp.ClientSession(
                connector=connector,
                trace_configs=[tlsfail.reuse_trace()],
                timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_read=self.timeout),
                raise_for_status=False,
                auto_decompress=False,
            )
        return self._session

    async def aclose(self) -> None:
        """Close the HTTP session; later requests raise :class:`~hybridkex.exceptions.AlreadyFinalized`."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AsyncETSI014Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- AsyncKeySource ---------------------------------------------------------------------------

    async def get_keys(self, slave_sae_id: str, number: int = 1, size_bits: int = 256) -> list[QKDKey]:
        """Master role ('Get key'): ``number`` fresh keys of ``size_bits`` shared with ``slave_sae_id``."""
        return await self.enc_keys(slave_sae_id, number, size_bits)

    async def enc_keys(
        self,
        slave_sae_id: str,
        number: int = 1,
        size_bits: int = 256,
        *,
        additional_slave_sae_ids: Sequence[str] = (),
        extension_mandatory: Sequence[Mapping[str, Any]] = (),
        extension_optional: Sequence[Mapping[str, Any]] = (),
    ) -> list[QKDKey]:
        """'Get key' with every option of the Key request (Table 10); always sent as POST."""
        self._check_request(number, size_bits)
        path = self._path(slave_sae_id, "enc_keys")
        body = key_request_body(number, size_bits, additional_slave_sae_ids, extension_mandatory, extension_optional)
        where = self._where("POST", path)
        obj = await self._call("POST", path, body, where)
        return self._parse_keys(obj, where, number, size_bits)

    async def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QKDKey]:
        """Slave role ('Get key with key IDs'): the keys ``master_sae_id`` received, in the given order."""
        ids = self._check_ids(key_ids)
        self._refuse_fetched(ids)
        path = self._path(master_sae_id, "dec_keys")
        where = self._where("POST", path)
        obj = await self._call("POST", path, key_ids_body(ids), where)
        return self._parse_keys_by_id(obj, where, ids)

    async def status(self, slave_sae_id: str) -> KMEStatus:
        """'Get status' for keys shared with ``slave_sae_id``."""
        path = self._path(slave_sae_id, "status")
        where = self._where("GET", path)
        obj = await self._call("GET", path, None, where)
        return parse_status(obj, master_sae_id=self._sae_id, slave_sae_id=slave_sae_id, where=where)

    # -- HTTP -------------------------------------------------------------------------------------

    async def _roundtrip(
        self, method: str, path: str, body: dict[str, Any] | None, where: str
    ) -> tuple[int, str, bytes, dict[str, str]]:
        for _ in range(2):  # the second pass only replaces a keep-alive connection that died while idle
            try:
                return await self._roundtrip_once(method, path, body, where)
            except _StaleConnection:
                continue
        raise KMEConnectionError(f"{where}: the KME closed the connection twice before answering")

    async def _roundtrip_once(
        self, method: str, path: str, body: dict[str, Any] | None, where: str
    ) -> tuple[int, str, bytes, dict[str, str]]:
        session = self._get_session()
        t = self._target
        url = f"{t.scheme}://{'[' + t.host + ']' if ':' in t.host else t.host}:{t.port}{path}"
        info = {"reused": False}  # set by the trace hook when aiohttp hands out a pooled connection
        try:
            async with session.request(method, url, json=body, headers={"Accept": "application/json"},
                                       allow_redirects=False, trace_request_ctx=info) as resp:
                conn = resp.connection
                transport = conn.transport if conn is not None else None
                if transport is None:  # already released to the pool: its protocol still knows it
                    transport = getattr(getattr(resp, "_protocol", None), "transport", None)
                if transport is not None:  # cheap enough to check on every answer
                    self._check_peer(transport.get_extra_info("peername"), transport.get_extra_info("peercert"))
                if (resp.content_length or 0) > MAX_RESPONSE_BYTES:
                    raise KMEResponseError(f"{where}: answer of {resp.content_length} bytes is too large",
                                           status=resp.status)
                chunks: list[bytes] = []
                size = 0
                while True:
                    chunk = await resp.content.readany()
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > MAX_RESPONSE_BYTES:
                        raise KMEResponseError(f"{where}: answer is too large", status=resp.status)
                    chunks.append(chunk)
                return resp.status, resp.headers.get("Content-Type", ""), b"".join(chunks), dict(resp.headers)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise KMEConnectionError(
                f"{where}: the KME's certificate did not verify ({exc.certificate_error}); "
                "check the CA file and that the certificate names this host or IP"
            ) from None
        except aiohttp.ClientConnectorSSLError as exc:
            if (alert := tlsfail.alert_reason(exc.os_error)) is not None:
                raise KMEConnectionError(tlsfail.cert_hint(where, self._cert, alert)) from None
            raise KMEConnectionError(f"{where}: TLS handshake with the KME failed ({exc})") from None
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise _ConnectFailed(f"{type(exc).__name__}: {exc}") from None
        except (aiohttp.SocketTimeoutError, TimeoutError):
            raise KMETimeoutError(f"{where}: no answer within {self.timeout:g} s") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            alert, gone = tlsfail.alert_reason(exc), tlsfail.dropped(exc)
            if gone and info["reused"]:  # closed while idle, or the KME restarted: it never saw this request
                raise _StaleConnection(str(exc)) from None
            if alert is None and gone and self._ssl is not None and await tlsfail.closes_before_request_async(
                    t.host, t.port, self._ssl, self.timeout):
                alert = tlsfail.PROBE_DETAIL
            if alert is not None:
                raise KMEConnectionError(tlsfail.cert_hint(where, self._cert, alert)) from None
            raise KMEConnectionError(
                f"{where}: connection lost after the request was sent ({type(exc).__name__}: {exc}); "
                "the KME may have served it"
            ) from None
        except aiohttp.ClientError as exc:
            raise KMEConnectionError(
                f"{where}: request failed after it was sent ({type(exc).__name__}: {exc}); the KME may have served it"
            ) from None

    async def _call(self, method: str, path: str, body: dict[str, Any] | None, where: str) -> Any:
        if not self._probed:
            await self.connect()
        attempt = 0
        while True:
            retry: _Retry | None = None
            try:
                status, ctype, data, headers = await self._roundtrip(method, path, body, where)
            except _ConnectFailed as exc:
                if attempt >= self.retries:
                    raise KMEConnectionError(
                        f"{where}: cannot connect after {attempt + 1} attempt(s) ({exc}); is the KME running?"
                    ) from None
            else:
                outcome = self._interpret(where, status, ctype, data, headers)
                if not isinstance(outcome, _Retry):
                    return outcome
                retry = outcome
                if attempt >= self.retries:
                    raise self._unavailable(where, retry)
            delay = self._delay(attempt, retry)
            log.info("%s: retrying in %.2f s (attempt %d of %d)", where, delay, attempt + 2, self.retries + 1)
            await asyncio.sleep(delay)
            attempt += 1

