"""The OpenAPI check of KME answers (openapicheck, run after every QKD test) really checks.

Every kind of answer the KME gives (200, 400, 401, 503; each endpoint) is recorded and conforms, and
answers that break the document in one place each are refused, both as exchanges and as answers of a
real server the recorder is attached to.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from openapicheck import Exchange, Recorder, api, violation
from qkdhelpers import ThreadedServer, https_request

from hybridkex.qkd.kme import SimulatedKMEPair, server_ssl_context
from hybridkex.qkd.kme.openapi import openapi_document
from hybridkex.qkd.pki import DemoPKI

KEYS = "/api/v1/keys"
JSON = {"content-type": "application/json; charset=utf-8"}
STATUS = {"source_KME_ID": "kme-a", "target_KME_ID": "kme-b", "master_SAE_ID": "sae-a", "slave_SAE_ID": "sae-b",
          "key_size": 256, "stored_key_count": 10, "max_key_count": 100, "max_key_per_request": 128,
          "max_key_size": 8192, "min_key_size": 64, "max_SAE_ID_count": 0}
KEY = {"key_ID": str(uuid.uuid4()), "key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}


def ex(method: str, target: str, status: int, body: Any, headers: dict[str, str] | None = None) -> Exchange:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Exchange(method, target, status, headers if headers is not None else JSON, raw)


def test_every_kind_of_kme_answer_is_recorded_and_conforms(
    make_pair: Callable[..., SimulatedKMEPair], pki: DemoPKI, kme_answers: Recorder,
) -> None:
    pair = make_pair(rate_bps=1024, capacity_bits=1024)  # 4 keys of 256 bits, then 503 with Retry-After
    kme_answers.take()
    a, b = pair.url_a, pair.url_b
    assert https_request(a, "GET", f"{KEYS}/sae-b/status", pki=pki).status == 200
    got = https_request(a, "POST", f"{KEYS}/sae-b/enc_keys", pki=pki, body={"number": 4})
    assert got.status == 200
    key_id = got.json["keys"][0]["key_ID"]
    assert https_request(b, "GET", f"{KEYS}/sae-a/dec_keys?key_ID={key_id}", pki=pki, name="sae-b").status == 200
    assert https_request(a, "GET", f"{KEYS}/sae-b/enc_keys?number=1&size=256", pki=pki).status == 503
    assert https_request(a, "POST", f"{KEYS}/sae-b/enc_keys", pki=pki, body={"size": 7}).status == 400
    assert https_request(b, "POST", f"{KEYS}/sae-a/dec_keys", pki=pki, name="sae-c",
                         body={"key_IDs": [{"key_ID": key_id}]}).status in (400, 401)
    assert https_request(a, "GET", f"{KEYS}/sae-b/status", pki=pki, name="sae-d").status == 401
    assert https_request(a, "GET", "/api/v1/openapi.json", pki=pki).status == 200
    assert https_request(a, "GET", "/nothing/here", pki=pki).status == 400

    seen = kme_answers.take()
    assert {e.status for e in seen} >= {200, 400, 401, 503}
    assert len(seen) >= 9  # the server side saw each answer the client checked
    unavailable = [e for e in seen if e.status == 503]
    assert all("Retry-After" in e.headers for e in unavailable)  # so its declared schema was checked
    assert [why for e in seen if (why := violation(e)) is not None] == []


def test_a_conforming_answer_passes() -> None:
    assert violation(ex("GET", f"{KEYS}/sae-b/status", 200, STATUS)) is None
    assert violation(ex("POST", f"{KEYS}/sae-b/enc_keys", 200, {"keys": [KEY]})) is None
    assert violation(ex("POST", f"{KEYS}/sae-b/enc_keys", 503, {"message": "Error on server side."},
                        {**JSON, "Retry-After": "2"})) is None


WRONG = {
    "extra Status member": ex("GET", f"{KEYS}/sae-b/status", 200, {**STATUS, "vendor_field": 1}),
    "Status member missing": ex("GET", f"{KEYS}/sae-b/status", 200, {k: v for k, v in STATUS.items()
                                                                     if k != "max_SAE_ID_count"}),
    "count as a string": ex("GET", f"{KEYS}/sae-b/status", 200, {**STATUS, "stored_key_count": "10"}),
    "key ID not a UUID": ex("POST", f"{KEYS}/sae-b/enc_keys", 200, {"keys": [{**KEY, "key_ID": "k-1"}]}),
    "no keys array": ex("GET", f"{KEYS}/sae-a/dec_keys?key_ID={KEY['key_ID']}", 200, {"key": KEY}),
    "404 is not an ETSI 014 status": ex("GET", f"{KEYS}/sae-b/status", 404, {"message": "Not found"}),
    "500 is not an ETSI 014 status": ex("POST", f"{KEYS}/sae-b/enc_keys", 500, {"message": "oops"}),
    "error without message": ex("POST", f"{KEYS}/sae-b/enc_keys", 400, {"error": "bad"}),
    "error as text": ex("POST", f"{KEYS}/sae-a/dec_keys", 400, b"bad request", {"content-type": "text/plain"}),
    "empty 401": ex("GET", f"{KEYS}/sae-b/status", 401, b"", {}),
    "Retry-After 0": ex("POST", f"{KEYS}/sae-b/enc_keys", 503, {"message": "busy"}, {**JSON, "Retry-After": "0"}),
    "unknown path answered 404": ex("GET", "/nothing/here", 404, {"message": "Not Found"}),
    "unknown path without Error body": ex("GET", "/nothing/here", 400, {"reason": "no such path"}),
}


@pytest.mark.parametrize("wrong", WRONG.values(), ids=WRONG.keys())
def test_a_deliberately_wrong_answer_fails_the_check(wrong: Exchange) -> None:
    assert violation(wrong) is not None


def test_a_wrong_answer_of_a_real_server_is_caught_by_the_recorder(pki: DemoPKI) -> None:
    """The recording path end to end: a server whose status answer lacks a member, over real TLS."""
    recorder = Recorder()

    def app() -> web.Application:
        async def status(request: web.Request) -> web.Response:
            return web.json_response({k: v for k, v in STATUS.items() if k != "key_size"})

        application = web.Application()
        application.router.add_get(f"{KEYS}/{{slave}}/status", status)
        return recorder.attach(application)

    context = server_ssl_context(pki.cert("kme-a"), pki.key("kme-a"), pki.ca_cert)
    with ThreadedServer(app, context) as server, pytest.raises(AssertionError, match="key_size"):
        https_request(server.url, "GET", f"{KEYS}/sae-b/status", pki=pki)
    (seen,) = recorder.take()
    assert seen.status == 200 and "key_size" in (violation(seen) or "")


def test_the_document_is_valid_openapi_3_1_and_a_broken_one_is_not() -> None:
    validate(openapi_document())  # what api() does on loading, spelled out
    assert api() is not None
    broken = openapi_document()
    del broken["paths"][f"{KEYS}/{{slave_SAE_ID}}/status"]["get"]["responses"]["200"]["description"]  # required
    with pytest.raises(OpenAPIValidationError):
        validate(broken)
