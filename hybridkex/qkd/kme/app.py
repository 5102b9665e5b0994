"""The HTTP side of one simulated KME: a thin aiohttp application over :class:`~.store.KeyStore`.

All the logic lives in the store; this layer maps URLs to store calls, reads the caller's SAE ID
from the client certificate (subject CN; the TLS layer has already verified the chain), parses
request bodies and queries with :mod:`hybridkex.qkd.etsi014`, and turns every refusal into one
of the four status codes ETSI GS QKD 014 defines, each with a JSON Error body carrying
``message``.  Unknown paths, wrong methods and oversized bodies become 400 as well, and an
unexpected failure becomes 503, so a client never sees a 404, 405, 413 or 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from ...exceptions import ConfigurationError
from ..etsi014 import (
    API_PREFIX,
    MSG_BAD_REQUEST,
    MSG_SERVER_ERROR,
    MSG_UNAUTHORIZED,
    RequestRejected,
    error_body,
    key_container_body,
    loads_strict,
    parse_key_ids_query,
    parse_key_ids_request,
    parse_key_request,
    parse_key_request_query,
)
from .metrics import KMEMetrics
from .openapi import openapi_document
from .store import KeyStore

__all__ = ["OPENAPI_PATH", "caller_sae_id", "create_kme_app", "server_ssl_context"]

log = logging.getLogger("hybridkex.qkd.kme")

#: Where each simulated KME publishes its OpenAPI description.
OPENAPI_PATH = "/api/v1/openapi.json"
#: Largest request body accepted (a Key IDs request for 128 keys is about 8 KB).
MAX_REQUEST_BYTES = 64 * 1024

def server_ssl_context(cert: str | Path, key: str | Path, ca: str | Path) -> ssl.SSLContext:
    """A TLS server context that requires a client certificate signed by ``ca`` (mutual TLS).

    Raises:
        ConfigurationError: a file cannot be read.
    """
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load KME TLS files ({cert}, {key}, {ca}): {exc}", field="pki") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # ETSI 014 cl. 5.1
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def caller_sae_id(request: web.Request) -> str | None:
    """The caller's SAE ID: the single subject CN of its verified client certificate, else ``None``."""
    transport = request.transport
    peercert: Mapping[str, Any] | None = transport.get_extra_info("peercert") if transport is not None else None
    if not peercert:
        return None
    cns = [value for rdn in peercert.get("subject", ()) for (name, value) in rdn if name == "commonName"]
    return cns[0] if len(cns) == 1 and cns[0] else None


def _json(status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode("utf-8"), content_type="application/json",
                        headers=headers)


async def _json_body(request: web.Request, *, empty: Any = None, timeout: float | None = None) -> Any:
    # A body trickled in byte by byte must not hold the connection: bounded by ``timeout``.  Waited
    # on, not cancelled at once: after the event loop (or the process) stalled past the deadline, the
    # timer fires in the same turn as the body arrives, and a whole request was refused (seen in CI).
    read = asyncio.ensure_future(request.read())
    try:
        done, _ = await asyncio.wait({read}, timeout=timeout)
        if not done:
            done, _ = await asyncio.wait({read}, timeout=0.05)  # one more look after a stall
        if not done:
            raise RequestRejected(f"request body not received within {timeout:g} s")
        raw = read.result()
    finally:
        if not read.done():
            read.cancel()
    if not raw and empty is not None:
        return empty
    try:
        return loads_strict(raw)
    except ValueError:
        raise RequestRejected("request body is not valid JSON (RFC 8259, UTF-8)") from None


def _endpoint(path: str) -> str:
    """The ``endpoint`` label of a request path (a fixed few values: never an SAE ID)."""
    if path == OPENAPI_PATH:
        return "openapi"
    last = path.rsplit("/", 1)[-1]
    return last if path.startswith(API_PREFIX + "/") and last in ("status", "enc_keys", "dec_keys") else "other"


def create_kme_app(
    store: KeyStore,
    kme_id: str,
    *,
    delay: float = 0.0,
    caller: Callable[[web.Request], str | None] = caller_sae_id,
    read_timeout: float | None = None,
    metrics: KMEMetrics | None = None,
) -> web.Application:
    """The aiohttp application of KME ``kme_id`` (serve it over TLS with :func:`server_ssl_context`).

    Args:
        store: the state shared with the other KME of the pair.
        kme_id: this KME's ID (its certificate's CN).
        delay: seconds added before every answer, to simulate a distant or busy KME (benchmarks).
        caller: maps a request to the caller's SAE ID (default: client certificate subject CN).
        read_timeout: seconds to receive a request body (``None``: no limit).
        metrics: counts every answer by endpoint and status, and the keys handed out.
    """
    if delay < 0:
        raise ConfigurationError("must be >= 0", field="delay")

    @web.middleware
    async def counted(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await etsi_errors(request, handler)
        if metrics is not None:
            metrics.count_request(_endpoint(request.path), response.status)
        return response

    async def etsi_errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            if delay:
                await asyncio.sleep(delay)
            if request.path.startswith(API_PREFIX + "/") and not store.serves(kme_id, caller(request)):
                # Authenticate before reading anything else (cl. 4: identify the calling SAE).
                log.warning("%s %s at %s refused: SAE %r is not served here", request.method, request.path,
                            kme_id, caller(request))
                raise RequestRejected(MSG_UNAUTHORIZED, status=401)
            return await handler(request)
        except RequestRejected as exc:
            headers = {}
            if exc.status == 503 and exc.retry_after is not None:
                headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
            if exc.status != 401:
                log.info("%s %s at %s: %d %s", request.method, request.path, kme_id, exc.status, exc)
            return _json(exc.status, error_body(str(exc), exc.details), headers)
        except web.HTTPException as exc:
            # No such path or method, or body too large: ETSI 014 defines only 400 for a bad request.
            return _json(400, error_body(MSG_BAD_REQUEST, [{"reason": f"{exc.status} {exc.reason}"}]))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s %s at %s failed", request.method, request.path, kme_id)
            return _json(503, error_body(MSG_SERVER_ERROR))

    app = web.Application(middlewares=[counted], client_max_size=MAX_REQUEST_BYTES)

    async def status(request: web.Request) -> web.StreamResponse:
        return _json(200, store.status(kme_id, caller(request), request.match_info["sae"]))

    async def enc_keys(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            key_request = parse_key_request_query(request.query.items())
        else:
            # ETSI GS QKD 014 cl. 6.2: the Key request "may be empty", i.e. all defaults, as {}.
            key_request = parse_key_request(await _json_body(request, empty={}, timeout=read_timeout))
        keys = store.enc_keys(kme_id, caller(request), request.match_info["sae"], key_request)
        if metrics is not None:
            metrics.count_keys("master", len(keys))
        return _json(200, key_container_body(keys))

    async def dec_keys(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            key_ids = parse_key_ids_query(request.query.items())
        else:
            key_ids = parse_key_ids_request(await _json_body(request, timeout=read_timeout))
        keys = store.dec_keys(kme_id, caller(request), request.match_info["sae"], key_ids)
        if metrics is not None:
            metrics.count_keys("slave", len(keys))
        return _json(200, key_container_body(keys))

    document = openapi_document()

    async def openapi(request: web.Request) -> web.StreamResponse:
        del request
        return _json(200, document)

    base = API_PREFIX + "/{sae}"
    app.router.add_get(base + "/status", status, allow_head=False)
    app.router.add_get(base + "/enc_keys", enc_keys, allow_head=False)
    app.router.add_post(base + "/enc_keys", enc_keys)
    app.router.add_get(base + "/dec_keys", dec_keys, allow_head=False)
    app.router.add_post(base + "/dec_keys", dec_keys)
    app.router.add_get(OPENAPI_PATH, openapi, allow_head=False)
    return app
