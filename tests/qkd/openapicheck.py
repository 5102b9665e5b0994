"""Every KME answer in the QKD tests, checked against the OpenAPI document the KME serves.

The document is :func:`hybridkex.qkd.kme.openapi.openapi_document` (what ``/api/v1/openapi.json``
serves); openapi-core checks it is a valid OpenAPI 3.1 document when it is loaded, and checks each
answer against it: a status code the operation declares, the declared media type, the schema of the
body (formats such as ``uuid`` included) and the declared headers (``Retry-After`` on 503).

Two ways answers get here:

* :class:`Recorder` sits in every in-process KME the QKD tests start (``tests/qkd/conftest.py``
  hooks ``create_kme_app``): it copies each answer as it leaves the KME, and the answers are
  checked at the end of each test, outside the KME's event loop;
* :func:`qkdhelpers.https_request` checks the answers it reads (KMEs in their own process too).
"""

from __future__ import annotations

import functools
import json
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web
from openapi_core import OpenAPI
from openapi_core.templating.paths.exceptions import OperationNotFound, PathNotFound
from openapi_core.testing import MockRequest, MockResponse
from openapi_schema_validator import OAS31Validator

from hybridkex.qkd.kme.openapi import openapi_document

# The document's server URL is https://127.0.0.1:{port}; the port does not take part in matching.
_HOST_URL = "https://127.0.0.1:8443"


@dataclass(frozen=True)
class Exchange:
    """One request line and the answer to it, as sent on the wire."""

    method: str
    target: str  # path and query
    status: int
    headers: Mapping[str, str]
    body: bytes

    def __str__(self) -> str:
        return f"{self.method} {self.target} -> {self.status} {self.body[:200]!r}"


@functools.cache
def api() -> OpenAPI:
    """The document, loaded (and itself validated as OpenAPI 3.1) once per test session."""
    return OpenAPI.from_dict(openapi_document())


def violation(ex: Exchange) -> str | None:
    """Why ``ex`` does not conform to the document, or ``None`` when it does."""
    parts = urllib.parse.urlsplit(ex.target)
    headers = {k.title(): v for k, v in ex.headers.items()}
    content_type = headers.get("Content-Type", "").split(";", 1)[0].strip()
    request = MockRequest(_HOST_URL, ex.method.lower(), parts.path, args=dict(urllib.parse.parse_qsl(parts.query)))
    response = MockResponse(ex.body, status_code=ex.status, headers=headers, content_type=content_type)
    try:
        api().validate_response(request, response)
    except (PathNotFound, OperationNotFound):
        # Outside the document's paths and methods, its description promises 400 with an Error body.
        return _unknown_path_violation(ex, content_type)
    except Exception as exc:  # openapi-core's validation errors have no common base but Exception
        cause = exc.__cause__ or exc
        return f"{ex}: {type(exc).__name__}: {cause}"
    return None


def _unknown_path_violation(ex: Exchange, content_type: str) -> str | None:
    if ex.status != 400 or content_type != "application/json":
        return f"{ex}: a path or method outside the document must get 400 application/json"
    if ex.method == "HEAD" and not ex.body:  # the client never sees the body of an answer to HEAD
        return None
    try:
        body = json.loads(ex.body)
    except ValueError as exc:
        return f"{ex}: not JSON ({exc})"
    errors = [e.message for e in OAS31Validator(openapi_document()["components"]["schemas"]["Error"]).iter_errors(body)]
    return f"{ex}: not an Error body: {'; '.join(errors)}" if errors else None


def check(ex: Exchange) -> None:
    """Raise AssertionError when ``ex`` does not conform to the document."""
    if (why := violation(ex)) is not None:
        raise AssertionError(f"KME answer violates its OpenAPI document: {why}")


class Recorder:
    """Copies every answer of the KME apps it is attached to; :meth:`take` hands them over."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: list[Exchange] = []
        self.total = 0

    def attach(self, app: web.Application) -> web.Application:
        app.on_response_prepare.append(self._record)
        return app

    async def _record(self, request: web.Request, response: web.StreamResponse) -> None:
        body = response.body if isinstance(response, web.Response) else None
        if not isinstance(body, bytes):  # the KME answers with whole JSON bodies only
            body = b"<not a whole-body answer>"
        ex = Exchange(request.method, request.raw_path, response.status, dict(response.headers), body)
        with self._lock:
            self._seen.append(ex)
            self.total += 1

    def take(self) -> list[Exchange]:
        with self._lock:
            seen, self._seen = self._seen, []
        return seen
