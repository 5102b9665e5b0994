"""The core of both ETSI GS QKD 014 clients, without I/O: configuration, the KME's identity, the
requests, the checks on every answer, and the key IDs already seen.

:class:`~.client.ETSI014Client` (blocking) and :class:`~.aclient.AsyncETSI014Client` (asyncio) are
thin front ends over it: each only sends a :class:`Request` over its transport, sleeps where the
retry plan (:mod:`._retry`) says so, and hands the answer's JSON to :attr:`Request.finish`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import ssl
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypedDict, TypeVar, Unpack

from ..exceptions import ConfigurationError, InvalidKeyMaterial, KeyReuseError
from . import _site
from ._retry import RetryPlan
from .base import QKDKey
from .errors import KMEConnectionError, KMEResponseError
from .etsi014 import (
    API_PREFIX,
    KMEStatus,
    is_uuid,
    key_ids_body,
    key_request_body,
    parse_key_container,
    parse_status,
    sae_path,
)

if TYPE_CHECKING:
    from ._retry_policy import RetryPolicy

log = logging.getLogger("hybridkex.qkd.client")

T = TypeVar("T")

#: Largest KME answer accepted (a full container of 128 keys of 8192 bits is ~180 KB).
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# Idle keep-alive connections older than this are closed instead of reused: servers drop idle
# connections after their own timeout (the simulated KME: 5 s) and a reuse racing that close wastes
# a round trip (the request is then sent again on a new connection).
IDLE_MAX_AGE = 4.0
# How many key IDs each client remembers to refuse a repeated one (per role).
_SEEN_IDS_LIMIT = 1 << 17

_ACCEPT = {"Accept": "application/json"}
_ACCEPT_JSON_BODY = {**_ACCEPT, "Content-Type": "application/json"}


class KeyRequestOptions(TypedDict, total=False):
    """The optional members of an ETSI 014 Key request (Table 10), as ``enc_keys`` keyword arguments."""

    additional_slave_sae_ids: Sequence[str]
    extension_mandatory: Sequence[Mapping[str, Any]]
    extension_optional: Sequence[Mapping[str, Any]]


class Request(NamedTuple, Generic[T]):
    """One KME request, ready to send; ``finish(where, json)`` turns the answer's JSON into the result."""

    method: str
    path: str
    body: bytes | None
    where: str
    finish: Callable[[str, Any], T]

    @property
    def headers(self) -> dict[str, str]:
        return dict(_ACCEPT if self.body is None else _ACCEPT_JSON_BODY)


class ClientCore:
    """Configuration, checks and answer interpretation shared by both clients (no I/O here).

    The arguments are documented on :class:`~.client.ETSI014Client`; a front end sets up its
    transport in :meth:`_init_transport`.
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
        self._target = _site.parse_url(url, allow_insecure_http)
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
        from ._retry_policy import RetryPolicy  # noqa: PLC0415 - urllib3 for clients only, not a KME process

        self._retry_policy = RetryPolicy.for_kme(self.retries, self.backoff, self.max_backoff)
        self._trusted = _site.networks(trusted_networks)
        self._ssl: ssl.SSLContext | None = None
        if self._target.scheme == "https":
            if cert is None or key is None or ca is None:
                raise ConfigurationError(
                    "mutual TLS needs cert, key and ca (this SAE's certificate and key, and the CA of the KME)",
                    field="cert",
                )
            self._ssl = _site.client_context(cert, key, ca)
        self._cert = cert
        if sae_id is None:
            if cert is None:
                raise ConfigurationError("give sae_id, or a client certificate whose CN is the SAE ID", field="sae_id")
            sae_id = _site.certificate_common_name(cert)
        self._sae_id = sae_id
        self._expected_kme_id = kme_id
        self._learned_kme_id: str | None = kme_id
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._issued: OrderedDict[str, None] = OrderedDict()
        self._fetched: OrderedDict[str, None] = OrderedDict()
        self._closed = False
        self._init_transport()

    def _init_transport(self) -> None:
        """The front end's own state (connections, session); called at the end of ``__init__``."""

    # -- identity ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The KME's base URL (without ``/api/v1/keys``)."""
        return self._target.url

    @property
    def sae_id(self) -> str:
        """This SAE's ID (the subject CN of its certificate unless configured)."""
        return self._sae_id

    @property
    def retry_policy(self) -> RetryPolicy:
        """The retry policy both front ends follow, a :class:`urllib3.util.Retry` (see :mod:`._retry`)."""
        return self._retry_policy

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, sae_id={self._sae_id!r}, kme_id={self._learned_kme_id!r})"

    def _where(self, method: str, path: str) -> str:
        return f"KME {self.url} {method} {path}"

    def _check_peer(self, peername: Any, peercert: Mapping[str, Any] | None) -> None:
        """Check a fresh connection: the KME's ID from its certificate, and the secure-site rule."""
        address = str(peername[0]) if isinstance(peername, tuple) and peername else ""
        if address and not _site.in_secure_site(address, self._trusted):
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
                warnings.warn(msg, _site.SecureSiteWarning, stacklevel=4)
        if self._ssl is None:
            return
        cn = _site.peercert_cn(peercert)
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

    def _request(self, method: str, path: str, body: dict[str, Any] | None,
                 finish: Callable[[str, Any], T]) -> Request[T]:
        where = self._where(method, path)
        data = None if body is None else json.dumps(body).encode("utf-8")
        return Request(method, path, data, where, finish)

    def _enc_keys_request(
        self, slave_sae_id: str, number: int, size_bits: int, **options: Unpack[KeyRequestOptions]
    ) -> Request[list[QKDKey]]:
        """'Get key' with every option of the Key request (Table 10); always sent as POST."""
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ConfigurationError(f"must be a positive integer, got {number!r}", field="number")
        if isinstance(size_bits, bool) or not isinstance(size_bits, int) or size_bits <= 0 or size_bits % 8:
            raise ConfigurationError(f"must be a positive multiple of 8 bits, got {size_bits!r}", field="size_bits")
        path = self._path(slave_sae_id, "enc_keys")
        body = key_request_body(number, size_bits, **options)

        def finish(where: str, obj: Any) -> list[QKDKey]:
            keys = parse_key_container(obj, number=number, size_bits=size_bits, where=where)
            self._remember(self._issued, (k.key_id for k in keys), "issued")
            return keys

        return self._request("POST", path, body, finish)

    def _dec_keys_request(self, master_sae_id: str, key_ids: Sequence[str]) -> Request[list[QKDKey]]:
        """'Get key with key IDs': refused here if an ID is malformed, repeated or already fetched."""
        ids = list(key_ids)
        if not ids:
            raise InvalidKeyMaterial("no key IDs to fetch")
        for k in ids:
            if not is_uuid(k):
                raise InvalidKeyMaterial(f"QKD key ID {k!r} is not a UUID")
        if len({k.lower() for k in ids}) != len(ids):
            raise InvalidKeyMaterial("a QKD key ID is repeated in one request")
        with self._lock:
            for k in ids:
                if k.lower() in self._fetched:
                    raise KeyReuseError(f"QKD key {k} was already fetched by this SAE; a key is used once")

        path = self._path(master_sae_id, "dec_keys")

        def finish(where: str, obj: Any) -> list[QKDKey]:
            keys = parse_key_container(obj, number=len(ids), size_bits=None, where=where, expected_ids=ids)
            self._remember(self._fetched, ids, "delivered")
            return keys

        return self._request("POST", path, key_ids_body(ids), finish)

    def _status_request(self, slave_sae_id: str) -> Request[KMEStatus]:
        path = self._path(slave_sae_id, "status")

        def finish(where: str, obj: Any) -> KMEStatus:
            return parse_status(obj, master_sae_id=self._sae_id, slave_sae_id=slave_sae_id, where=where)

        return self._request("GET", path, None, finish)

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

    # -- answers ----------------------------------------------------------------------------------

    def _retry_plan(self, where: str) -> RetryPlan:
        return RetryPlan(where, self._sae_id, self._retry_policy)

    @staticmethod
    def _too_large(where: str, status: int, length: int | None = None) -> KMEResponseError:
        """An answer over :data:`MAX_RESPONSE_BYTES` (``length``: as announced by Content-Length)."""
        size = "" if length is None else f" of {length} bytes"
        return KMEResponseError(f"{where}: answer{size} is too large", status=status)

    def _timed_out(self, where: str, what: str = "no answer") -> str:
        return f"{where}: {what} within {self.timeout:g} s"
