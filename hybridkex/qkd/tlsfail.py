"""Telling why a KME's TLS connection failed, so the one-line error says what to fix.

Two failures look alike from the client and need different advice:

* the KME does not accept this SAE's certificate.  With TLS 1.3 the client finishes its handshake
  before the server has checked the client certificate, so the refusal arrives after the request
  was sent: as a certificate alert, or (asyncio servers, Python's included) as a bare EOF;
* a keep-alive connection died under the client (the KME restarted or closed it while idle): the
  next write or read fails with EOF too.  That one is not an error at all: the clients replace the
  connection and send the request again, since a request that fails *on a reused connection*
  before any answer never reached a live KME process.

So the certificate hint is given only when it is known to be right: the KME sent a certificate
alert, or a probe connection shows that the KME closes a fresh connection of ours before any
request (a KME that accepts the certificate waits for the request instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
from typing import Any

import aiohttp

__all__ = ["CONNECTION_DROPPED", "PROBE_DETAIL", "alert_reason", "cert_hint", "closes_before_request",
           "closes_before_request_async", "dropped", "refused_certificate", "reuse_trace"]

#: Exceptions meaning "the connection ended without an answer" (as opposed to a TLS protocol error);
#: ``http.client.RemoteDisconnected`` is a ConnectionResetError.
CONNECTION_DROPPED = (
    ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError,
)

# OpenSSL reason names of the alerts a server sends when it refuses the client's certificate.
_CERT_ALERTS = ("BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED",
                "UNSUPPORTED_CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED", "CERTIFICATE_REQUIRED")
#: The detail of a certificate hint that a probe connection established.
PROBE_DETAIL = "it closes every connection of this SAE before the first request"
# How long a probe waits for the KME to drop a fresh connection: a refusal comes at once.
_PROBE_WAIT = 1.0


def refused_certificate(exc: BaseException) -> bool:
    """True if ``exc`` is a TLS alert by which the peer refused our certificate."""
    reason = getattr(exc, "reason", None)
    return isinstance(exc, ssl.SSLError) and isinstance(reason, str) and "ALERT" in reason and any(
        alert in reason for alert in _CERT_ALERTS)


def cert_hint(where: str, cert: object, detail: str) -> str:
    """The one-line error for a refused SAE certificate."""
    return (f"{where}: the KME refused this SAE's certificate {cert} ({detail}); check that the KME trusts "
            "the CA that issued it")


def alert_reason(exc: BaseException) -> str | None:
    """The certificate alert in ``exc`` or the exception it wraps (aiohttp wraps ssl errors), if any."""
    for e in (exc, exc.__cause__ or exc.__context__):
        if e is not None and refused_certificate(e):
            return str(getattr(e, "reason", ""))
    return None


def dropped(exc: BaseException) -> bool:
    """True if ``exc`` (or what it wraps) says the connection ended without an answer."""
    inner = exc.__cause__ or exc.__context__
    if isinstance(exc, (aiohttp.ServerDisconnectedError, *CONNECTION_DROPPED)) or isinstance(inner, CONNECTION_DROPPED):
        return True
    return isinstance(exc, aiohttp.ClientOSError) and exc.errno in (errno.EPIPE, errno.ECONNRESET)


def reuse_trace() -> aiohttp.TraceConfig:
    """An aiohttp trace that sets ``trace_request_ctx["reused"]`` when a request gets a pooled connection."""
    async def note(session: aiohttp.ClientSession, ctx: Any, params: aiohttp.TraceConnectionReuseconnParams) -> None:
        del session, params
        if isinstance(ctx.trace_request_ctx, dict):
            ctx.trace_request_ctx["reused"] = True

    trace = aiohttp.TraceConfig()
    trace.on_connection_reuseconn.append(note)
    return trace


def _dropped(exc: BaseException) -> bool:
    return refused_certificate(exc) or isinstance(exc, CONNECTION_DROPPED)


def closes_before_request(host: str, port: int, context: ssl.SSLContext, timeout: float) -> bool:
    """Does the KME close a fresh mutual-TLS connection before we send anything? (blocking)"""
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return False  # not reachable right now: no evidence either way
    with contextlib.closing(raw):
        try:
            tls = context.wrap_socket(raw, server_hostname=host)
        except OSError as exc:
            return _dropped(exc)
        with contextlib.closing(tls):
            tls.settimeout(min(timeout, _PROBE_WAIT))
            try:
                return tls.recv(1) == b""
            except TimeoutError:
                return False  # the KME waits for a request: it accepted the certificate
            except OSError as exc:
                return _dropped(exc)


async def closes_before_request_async(host: str, port: int, context: ssl.SSLContext, timeout: float) -> bool:
    """:func:`closes_before_request` for asyncio."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=host), timeout)
    except ssl.SSLError as exc:
        return _dropped(exc)
    except (OSError, TimeoutError):
        return False
    try:
        return await asyncio.wait_for(reader.read(1), min(timeout, _PROBE_WAIT)) == b""
    except TimeoutError:
        return False
    except OSError as exc:
        return _dropped(exc)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
