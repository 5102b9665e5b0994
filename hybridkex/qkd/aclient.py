"""The asyncio ETSI GS QKD 014 client, :class:`AsyncETSI014Client`: aiohttp over the shared core.

Behaviour, checks and retries are those of :class:`~hybridkex.qkd.ETSI014Client` (:mod:`.client`
describes them); this module only sends requests with aiohttp and sleeps with asyncio.
"""

# aiohttp rather than httpx.AsyncClient: measured against the same KME (a bare status GET on a
# keep-alive connection), aiohttp costs about 0.38 ms of CPU per request and httpx about 2.9 ms;
# aiohttp is a dependency already (the simulated KME), and both front ends follow one retry policy
# (._retry_policy) whatever sends the bytes.

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import Any, TypeVar, Unpack

import aiohttp

from ..exceptions import AlreadyFinalized, ConfigurationError
from . import tlsfail
from ._request import IDLE_MAX_AGE, MAX_RESPONSE_BYTES, ClientCore, KeyRequestOptions, Request
from ._retry import Answer, ConnectFailed, StaleConnection, Wait
from .base import QKDKey
from .errors import KMEConnectionError, KMETimeoutError
from .etsi014 import KMEStatus

__all__ = ["AsyncETSI014Client"]

T = TypeVar("T")


class AsyncETSI014Client(ClientCore):
    """asyncio ETSI GS QKD 014 client for one SAE; an :class:`~hybridkex.qkd.AsyncKeySource`.

    Same arguments and behaviour as :class:`~hybridkex.qkd.ETSI014Client`.  Use it from one event
    loop, as an ``async with`` block or calling :meth:`aclose` at the end.  :attr:`kme_id` is known
    after the first request, or after ``await client.connect()``, unless ``kme_id`` was given.
    """

    def _init_transport(self) -> None:
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
        plan = self._retry_plan(f"KME {self.url}")
        while True:
            try:
                await self._probe()
            except ConnectFailed as exc:
                step = plan.next(exc)
            else:
                self._probed = True
                return
            await asyncio.sleep(step.seconds)

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
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from None
        try:
            self._check_peer(transport.get_extra_info("peername"), transport.get_extra_info("peercert"))
        finally:
            transport.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise AlreadyFinalized(f"AsyncETSI014Client for {self.url} is closed")
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else False,
                                             limit=32, keepalive_timeout=IDLE_MAX_AGE)
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
        self, slave_sae_id: str, number: int = 1, size_bits: int = 256, **options: Unpack[KeyRequestOptions]
    ) -> list[QKDKey]:
        """'Get key' with every option of the Key request (Table 10); always sent as POST.

        ``options``: ``additional_slave_sae_ids`` (SAE IDs), ``extension_mandatory`` and
        ``extension_optional`` (sequences of JSON objects); each empty by default.
        """
        return await self._call(self._enc_keys_request(slave_sae_id, number, size_bits, **options))

    async def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QKDKey]:
        """Slave role ('Get key with key IDs'): the keys ``master_sae_id`` received, in the given order."""
        return await self._call(self._dec_keys_request(master_sae_id, key_ids))

    async def status(self, slave_sae_id: str) -> KMEStatus:
        """'Get status' for keys shared with ``slave_sae_id``."""
        return await self._call(self._status_request(slave_sae_id))

    # -- HTTP -------------------------------------------------------------------------------------

    async def _call(self, request: Request[T]) -> T:
        if not self._probed:
            await self.connect()
        plan = self._retry_plan(request.where)
        while isinstance(step := plan.next(await self._attempt(request)), Wait):
            await asyncio.sleep(step.seconds)
        return request.finish(request.where, step)

    async def _attempt(self, request: Request[Any]) -> Answer | ConnectFailed:
        for _ in range(2):  # the second pass only replaces a keep-alive connection that died while idle
            try:
                return await self._roundtrip(request)
            except StaleConnection:
                continue
            except ConnectFailed as exc:
                return exc
        raise KMEConnectionError(f"{request.where}: the KME closed the connection twice before answering")

    async def _roundtrip(self, request: Request[Any]) -> Answer:
        session = self._get_session()
        t = self._target
        where = request.where
        url = f"{t.scheme}://{'[' + t.host + ']' if ':' in t.host else t.host}:{t.port}{request.path}"
        info = {"reused": False}  # set by the trace hook when aiohttp hands out a pooled connection
        try:
            async with session.request(request.method, url, data=request.body, headers=request.headers,
                                       allow_redirects=False, trace_request_ctx=info) as resp:
                conn = resp.connection
                transport = conn.transport if conn is not None else None
                if transport is None:  # already released to the pool: its protocol still knows it
                    transport = getattr(getattr(resp, "_protocol", None), "transport", None)
                if transport is not None:  # cheap enough to check on every answer
                    self._check_peer(transport.get_extra_info("peername"), transport.get_extra_info("peercert"))
                if (resp.content_length or 0) > MAX_RESPONSE_BYTES:
                    raise self._too_large(where, resp.status, resp.content_length)
                chunks: list[bytes] = []
                size = 0
                while chunk := await resp.content.readany():
                    size += len(chunk)
                    if size > MAX_RESPONSE_BYTES:
                        raise self._too_large(where, resp.status)
                    chunks.append(chunk)
                return Answer(resp.status, resp.headers.get("Content-Type", ""), b"".join(chunks), dict(resp.headers))
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
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from None
        except (aiohttp.SocketTimeoutError, TimeoutError):
            raise KMETimeoutError(self._timed_out(where)) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            alert, gone = tlsfail.alert_reason(exc), tlsfail.dropped(exc)
            if gone and info["reused"]:  # closed while idle, or the KME restarted: it never saw this request
                raise StaleConnection(str(exc)) from None
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
