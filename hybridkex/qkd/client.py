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

One core (:mod:`._request`: requests, checks, identity; :mod:`._retry`: the retry plan, following
one :class:`urllib3.util.Retry` policy per client) serves both front ends, which only move bytes
and sleep.  The blocking client (here) sends with ``http.client`` + ``ssl`` and keeps a small pool
of keep-alive connections; it is thread-safe.  The asyncio client (:mod:`.aclient`) uses aiohttp
and must be used from one event loop.
"""

# Why the connections are pooled here and not by urllib3's HTTPSConnectionPool: the slave's
# dec_keys is on the handshake path, and urllib3 costs about 0.2 ms more CPU per request on it
# (this machine, KME in its own process, benchmarks/bench_kme_client.py: dec_keys 470-500 us
# per call here, 750-910 us with urllib3's pool; status 400-445 us against 580-605 us; a bare GET
# 312 us with http.client, 545 us with urllib3, 1050 us with httpx), i.e. about 5% of a full
# hybridkex handshake's CPU.  urllib3 does the retry policy (._retry_policy), where speed does not
# matter.

from __future__ import annotations

import http.client
import ssl
import time
from collections.abc import Sequence
from typing import Any, NoReturn, TypeVar, Unpack

from ..exceptions import AlreadyFinalized, ConfigurationError
from . import tlsfail
from ._request import IDLE_MAX_AGE, MAX_RESPONSE_BYTES, ClientCore, KeyRequestOptions, Request
from ._retry import Answer, ConnectFailed, Wait
from ._site import (  # noqa: F401 - importable from here
    SecureSiteWarning,
    certificate_common_name,
    in_secure_site,
    is_loopback_host,
)
from .aclient import AsyncETSI014Client
from .base import QKDKey
from .errors import KMEConnectionError, KMETimeoutError
from .etsi014 import KMEStatus

__all__ = ["AsyncETSI014Client", "ETSI014Client", "SecureSiteWarning", "certificate_common_name",
           "is_loopback_host"]

T = TypeVar("T")

_MAX_IDLE_CONNECTIONS = 8


class ETSI014Client(ClientCore):
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

    def _init_transport(self) -> None:
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
            except ConnectFailed as exc:
                raise KMEConnectionError(f"KME {self.url}: cannot connect ({exc}); is the KME running?") from None
        assert self._learned_kme_id is not None
        return self._learned_kme_id

    def get_keys(self, slave_sae_id: str, number: int = 1, size_bits: int = 256) -> list[QKDKey]:
        """Master role ('Get key'): ``number`` fresh keys of ``size_bits`` shared with ``slave_sae_id``."""
        return self.enc_keys(slave_sae_id, number, size_bits)

    def enc_keys(
        self, slave_sae_id: str, number: int = 1, size_bits: int = 256, **options: Unpack[KeyRequestOptions]
    ) -> list[QKDKey]:
        """'Get key' with every option of the Key request (Table 10); always sent as POST.

        ``options``: ``additional_slave_sae_ids`` (SAE IDs), ``extension_mandatory`` and
        ``extension_optional`` (sequences of JSON objects); each empty by default.
        """
        return self._call(self._enc_keys_request(slave_sae_id, number, size_bits, **options))

    def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QKDKey]:
        """Slave role ('Get key with key IDs'): the keys ``master_sae_id`` received, in the given order."""
        return self._call(self._dec_keys_request(master_sae_id, key_ids))

    def status(self, slave_sae_id: str) -> KMEStatus:
        """'Get status' for keys shared with ``slave_sae_id``."""
        return self._call(self._status_request(slave_sae_id))

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

    def _call(self, request: Request[T]) -> T:
        plan = self._retry_plan(request.where)
        while isinstance(step := plan.next(self._attempt(request)), Wait):
            time.sleep(step.seconds)
        return request.finish(request.where, step)

    def _attempt(self, request: Request[Any]) -> Answer | ConnectFailed:
        try:
            return self._roundtrip(request)
        except ConnectFailed as exc:
            return exc

    def _new_connection(self) -> http.client.HTTPConnection:
        t = self._target
        if self._ssl is None:
            return http.client.HTTPConnection(t.host, t.port, timeout=self.timeout)
        return http.client.HTTPSConnection(t.host, t.port, timeout=self.timeout, context=self._ssl)

    def _connect(self, where: str) -> http.client.HTTPConnection:
        """A new, connected and checked connection. Raises :class:`ConnectFailed` when retryable."""
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
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from None
        sock = conn.sock
        try:
            peercert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
            peername = sock.getpeername()
        except OSError as exc:  # dropped right after the handshake, before we sent anything
            conn.close()
            self._raise_if_certificate_refused(where)
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from None
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
                if now - since <= IDLE_MAX_AGE:
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

    def _roundtrip(self, request: Request[Any]) -> Answer:
        where = request.where
        for _ in range(2):  # the second pass only replaces a keep-alive connection closed while idle
            conn, reused = self._checkout()
            if conn is None:
                conn = self._connect(where)
            try:
                conn.request(request.method, request.path, body=request.body, headers=request.headers)
                resp = conn.getresponse()
            except tlsfail.CONNECTION_DROPPED as exc:  # includes http.client.RemoteDisconnected
                conn.close()
                if reused:  # closed while idle, or the KME restarted: it never saw this request
                    self._drop_idle()  # the other idle ones are as old: the retry gets a new connection
                    continue
                self._raise_dropped(where, exc)
            except TimeoutError:
                conn.close()
                raise KMETimeoutError(self._timed_out(where)) from None
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
                    raise self._too_large(where, resp.status, int(length))
                data = resp.read(MAX_RESPONSE_BYTES + 1)
                if len(data) > MAX_RESPONSE_BYTES:
                    raise self._too_large(where, resp.status)
            except TimeoutError:
                conn.close()
                raise KMETimeoutError(self._timed_out(where, "answer not complete")) from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise KMEConnectionError(f"{where}: answer cut short ({type(exc).__name__})") from None
            except BaseException:
                conn.close()
                raise
            headers = dict(resp.getheaders())
            if resp.isclosed() and not resp.will_close:
                self._release(conn)
            else:
                conn.close()
            return Answer(resp.status, resp.getheader("Content-Type") or "", data, headers)
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
