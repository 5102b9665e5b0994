"""ETSI GS QKD 014 conformance of the simulated KME, endpoint by endpoint, over real mutual TLS.

Requests are sent with a bare ``http.client`` so that malformed ones can be sent too.
"""

from __future__ import annotations

import base64
import ssl
import uuid

import pytest
from qkdhelpers import Response, https_request

from hybridkex.qkd.etsi014 import (
    MSG_EXTENSION_MANDATORY_UNSUPPORTED,
    MSG_KEYS_NOT_FOUND,
    MSG_SERVER_ERROR,
    MSG_SIZE_NOT_MULTIPLE_OF_8,
    MSG_UNAUTHORIZED,
    STATUS_FIELDS,
)
from hybridkex.qkd.kme import SimulatedKMEPair
from hybridkex.qkd.pki import DemoPKI

KEYS = "/api/v1/keys"


def req(kmes: SimulatedKMEPair, pki: DemoPKI, kme: str, method: str, path: str, *, name: str = "sae-a",
        **kw: object) -> Response:
    url = kmes.url_a if kme == "a" else kmes.url_b
    return https_request(url, method, path, pki=pki, name=name, **kw)  # type: ignore[arg-type]


def assert_error(resp: Response, status: int, message: str | None = None) -> dict[str, object]:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.content_type.startswith("application/json")
    body = resp.json
    assert isinstance(body, dict) and isinstance(body["message"], str) and body["message"]
    if message is not None:
        assert body["message"] == message
    return body


def assert_keys(resp: Response, number: int, size_bits: int) -> list[dict[str, str]]:
    assert resp.status == 200, resp.body
    assert resp.content_type.startswith("application/json")
    body = resp.json
    assert set(body) == {"keys"}
    keys = body["keys"]
    assert len(keys) == number
    for k in keys:
        assert set(k) == {"key_ID", "key"}
        assert str(uuid.UUID(k["key_ID"])) == k["key_ID"]
        raw = base64.b64decode(k["key"], validate=True)
        assert base64.b64encode(raw).decode() == k["key"]  # standard, padded
        assert len(raw) * 8 == size_bits
    assert len({k["key_ID"] for k in keys}) == number
    return keys


def enc(kmes: SimulatedKMEPair, pki: DemoPKI, number: int = 1, size: int = 256) -> list[dict[str, str]]:
    resp = req(kmes, pki, "a", "POST", f"{KEYS}/sae-b/enc_keys", body={"number": number, "size": size})
    return assert_keys(resp, number, size)


# -- Get status ------------------------------------------------------------------------------------


def test_status_has_exactly_the_eleven_fields_with_the_right_values(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    resp = req(kmes, pki, "a", "GET", f"{KEYS}/sae-b/status")
    assert resp.status == 200 and resp.content_type.startswith("application/json")
    status = resp.json
    assert set(status) == set(STATUS_FIELDS)
    assert status["source_KME_ID"] == "kme-a" and status["target_KME_ID"] == "kme-b"
    assert status["master_SAE_ID"] == "sae-a" and status["slave_SAE_ID"] == "sae-b"
    for name in STATUS_FIELDS[4:]:
        assert type(status[name]) is int and status[name] >= 0
    assert status["min_key_size"] <= status["key_size"] <= status["max_key_size"]
    assert 0 < status["stored_key_count"] <= status["max_key_count"]
    assert status["max_key_per_request"] == 128 and status["max_SAE_ID_count"] == 4


def test_status_from_the_other_side(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    status = req(kmes, pki, "b", "GET", f"{KEYS}/sae-a/status", name="sae-b").json
    assert (status["source_KME_ID"], status["target_KME_ID"]) == ("kme-b", "kme-a")
    assert (status["master_SAE_ID"], status["slave_SAE_ID"]) == ("sae-b", "sae-a")


def test_status_for_unknown_slave_is_400(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    assert_error(req(kmes, pki, "a", "GET", f"{KEYS}/nobody/status"), 400)


# -- Get key ---------------------------------------------------------------------------------------


def test_enc_keys_bare_get_uses_defaults(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    assert_keys(req(kmes, pki, "a", "GET", f"{KEYS}/sae-b/enc_keys"), 1, 256)


def test_enc_keys_get_with_number_and_size(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    assert_keys(req(kmes, pki, "a", "GET", f"{KEYS}/sae-b/enc_keys?number=3&size=1024"), 3, 1024)


def test_enc_keys_post_empty_object_uses_defaults(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    assert_keys(req(kmes, pki, "a", "POST", f"{KEYS}/sae-b/enc_keys", body={}), 1, 256)


@pytest.mark.parametrize("headers", [{}, {"Content-Type": "application/json"}])
def test_enc_keys_post_with_an_empty_body_is_the_default_request(
    kmes: SimulatedKMEPair, pki: DemoPKI, headers: dict[str, str]
) -> None:
    """ETSI GS QKD 014 cl. 6.2: the Key request "may be empty"; no body means {} (one default key)."""
    resp = req(kmes, pki, "a", "POST", f"{KEYS}/sae-b/enc_keys", raw=b"", headers=headers)
    (key,) = assert_keys(resp, 1, 256)
    ids = {"key_IDs": [{"key_ID": key["key_ID"]}]}
    assert assert_keys(req(kmes, pki, "b", "POST", f"{KEYS}/sae-a/dec_keys", name="sae-b", body=ids), 1, 256) == [key]


def test_dec_keys_post_with_an_empty_body_is_still_400(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    # Unlike the Key request, the Key IDs object has a required member (key_IDs, Table 12).
    assert_error(req(kmes, pki, "b", "POST", f"{KEYS}/sae-a/dec_keys", name="sae-b", raw=b""), 400)


@pytest.mark.parametrize(
    ("request_line", "body", "field"),
    [
        ("POST sae-a/enc_keys", {}, "slave_SAE_ID"),
        ("POST sae-a/enc_keys", None, "slave_SAE_ID"),
        ("GET sae-a/enc_keys", None, "slave_SAE_ID"),
        ("GET sae-a/enc_keys?number=2&size=256", None, "slave_SAE_ID"),
        ("POST sae-b/enc_keys", {"additional_slave_SAE_IDs": ["sae-a"]}, "additional_slave_SAE_IDs"),
        ("POST sae-b/enc_keys", {"additional_slave_SAE_IDs": ["sae-c", "sae-a"]}, "additional_slave_SAE_IDs"),
        ("GET sae-a/status", None, "slave_SAE_ID"),
    ],
)
def test_a_master_naming_itself_as_a_slave_is_refused(
    kmes: SimulatedKMEPair, pki: DemoPKI, request_line: str, body: object, field: str
) -> None:
    """It could otherwise fetch its own key again through dec_keys (a second delivery to one SAE)."""
    method, path = request_line.split()
    before = kmes.store.stats()
    raw = b"" if body is None and method == "POST" else None
    error = assert_error(req(kmes, pki, "a", method, f"{KEYS}/{path}", body=body, raw=raw), 400)
    assert "cannot be a slave of its own keys" in str(error["message"])
    assert error["details"] == [{field: "sae-a"}]  # the Error object's details (Table 13) name the field
    after = kmes.store.stats()
    assert (after.keys_issued, after.pending_keys) == (before.keys_issued, before.pending_keys)


@pytest.mark.parametrize(("number", "size"), [(1, 64), (5, 256), (128, 256), (2, 8192)])
def test_enc_keys_post_sizes(kmes: SimulatedKMEPair, pki: DemoPKI, number: int, size: int) -> None:
    enc(kmes, pki, number, size)


def test_enc_keys_post_ignores_extension_optional(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    body = {"number": 1, "size": 256, "extension_optional": [{"abc_route_type": "direct"}]}
    assert_keys(req(kmes, pki, "a", "POST", f"{KEYS}/sae-b/enc_keys", body=body), 1, 256)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"size": 257}, MSG_SIZE_NOT_MULTIPLE_OF_8),
        ({"size": 100}, MSG_SIZE_NOT_MULTIPLE_OF_8),
        ({"extension_mandatory": [{"abc_route_type": "direct"}]}, MSG_EXTENSION_MANDATORY_UNSUPPORTED),
        ({"number": 0}, None),
        ({"number": 129}, None),  # above max_key_per_request
        ({"number": -1}, None),
        ({"number": True}, None),
        ({"number": 1.0}, None),
        ({"number": "1"}, None),
        ({"size": 32}, None),  # below min_key_size
        ({"size": 8200}, None),  # above max_key_size
        ({"additional_slave_SAE_IDs": "sae-c"}, None),
        ({"additional_slave_SAE_IDs": ["nobody"]}, None),
        ({"additional_slave_SAE_IDs": ["sae-b"]}, None),  # the slave named twice
        ({"additional_slave_SAE_IDs": ["sae-c", "sae-c"]}, None),
        ({"additional_slave_SAE_IDs": ["a", "b", "c", "d", "e"]}, None),  # above max_SAE_ID_count
        ({"extension_optional": {"x_y": 1}}, None),
        ({"extension_mandatory": [{"a_b": 1, "c_d": 2}]}, None),
        ({"nubmer": 2}, None),
        ([], None),
        ("text", None),
    ],
)
def test_enc_keys_post_rejects_bad_requests_with_400(
    kmes: SimulatedKMEPair, pki: DemoPKI, body: object, message: str | None
) -> None:
    before = kmes.store.stats().keys_issued
    assert_error(req(kmes, pki, "a", "POST", f"{KEYS}/sae-b/enc_keys", body=body), 400, message)
    assert kmes.store.stats().keys_issued == before  # a refused request consumes no key


@pytest.mark.parametrize("raw", [b"{", b" ", b'{"number": NaN}', b'{"number": 1, "number": 2}', b"\xff\xfe",
                                 b"[" * 100_000])
def test_enc_keys_post_rejects_malformed_json(kmes: SimulatedKMEPair, pki: DemoPKI, raw: bytes) -> None:
    assert_error(req(kmes, pki, "a", "POST", f"{KEYS}/sae-b/enc_keys", raw=raw), 400)


def test_enc_keys_post_rejects_oversized_body(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    raw = b'{"extension_optional": [{"x_pad": "' + b"a" * 200_000 + b'"}]}'
    assert_error(req(kmes, pki, "a", "POST", f"{KEYS}/sae-b/enc_keys", raw=raw), 400)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?number=2&size=12", MSG_SIZE_NOT_MULTIPLE_OF_8),
        ("?number=abc", None),
        ("?number=1&number=2", None),
        ("?number=-1", None),
        ("?additional_slave_SAE_IDs=sae-c", None),  # anything but number and size needs POST
        ("?number=1&size=256&x=1", None),
        ("?number=99999999999999", None),
    ],
)
def test_enc_keys_get_rejects_bad_queries(
    kmes: SimulatedKMEPair, pki: DemoPKI, query: str, message: str | None
) -> None:
    assert_error(req(kmes, pki, "a", "GET", f"{KEYS}/sae-b/enc_keys{query}"), 400, message)


def test_enc_keys_for_unknown_slave_is_400(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    assert_error(req(kmes, pki, "a", "POST", f"{KEYS}/nobody/enc_keys", body={}), 400)


# -- Get key with key IDs --------------------------------------------------------------------------


def test_dec_keys_post_returns_the_same_keys_in_order(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    keys = enc(kmes, pki, 4)
    wanted = list(reversed(keys))
    body = {"key_IDs": [{"key_ID": k["key_ID"]} for k in wanted]}
    got = assert_keys(req(kmes, pki, "b", "POST", f"{KEYS}/sae-a/dec_keys", name="sae-b", body=body), 4, 256)
    assert got == wanted


def test_dec_keys_get_single_key_id(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    (key,) = enc(kmes, pki)
    resp = req(kmes, pki, "b", "GET", f"{KEYS}/sae-a/dec_keys?key_ID={key['key_ID']}", name="sae-b")
    assert assert_keys(resp, 1, 256) == [key]


def test_dec_keys_accepts_upper_case_ids_and_vendor_members(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    (key,) = enc(kmes, pki)
    body = {"key_IDs": [{"key_ID": key["key_ID"].upper(), "master_SAE_ID": "sae-a", "key_ID_extension": {}}],
            "key_IDs_extension": {}}
    got = assert_keys(req(kmes, pki, "b", "POST", f"{KEYS}/sae-a/dec_keys", name="sae-b", body=body), 1, 256)
    assert got[0]["key"] == key["key"]


def test_dec_keys_second_retrieval_is_400_not_found(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    (key,) = enc(kmes, pki)
    path = f"{KEYS}/sae-a/dec_keys?key_ID={key['key_ID']}"
    assert req(kmes, pki, "b", "GET", path, name="sae-b").status == 200
    assert_error(req(kmes, pki, "b", "GET", path, name="sae-b"), 400, MSG_KEYS_NOT_FOUND)


def test_dec_keys_unknown_key_id_is_400_with_spec_message(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    body = {"key_IDs": [{"key_ID": str(uuid.uuid4())}]}
    assert_error(req(kmes, pki, "b", "POST", f"{KEYS}/sae-a/dec_keys", name="sae-b", body=body), 400,
                 MSG_KEYS_NOT_FOUND)


def test_dec_keys_with_one_unknown_id_delivers_nothing(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    keys = enc(kmes, pki, 2)
    body = {"key_IDs": [{"key_ID": keys[0]["key_ID"]}, {"key_ID": str(uuid.uuid4())}]}
    assert_error(req(kmes, pki, "b", "POST", f"{KEYS}/sae-a/dec_keys", name="sae-b", body=body), 400,
                 MSG_KEYS_NOT_FOUND)
    body = {"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}
    assert assert_keys(req(kmes, pki, "b", "POST", f"{KEYS}/sae-a/dec_keys", name="sae-b", body=body), 2, 256) == keys


def test_dec_keys_naming_the_wrong_master_is_400(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    (key,) = enc(kmes, pki)
    path = f"{KEYS}/sae-c/dec_keys?key_ID={key['key_ID']}"
    assert_error(req(kmes, pki, "b", "GET", path, name="sae-b"), 400, MSG_KEYS_NOT_FOUND)
    # The key is still there for the right request.
    assert req(kmes, pki, "b", "GET", f"{KEYS}/sae-a/dec_keys?key_ID={key['key_ID']}", name="sae-b").status == 200


@pytest.mark.parametrize(
    "body",
    [
        {"key_IDs": []},
        {"key_IDs": [{"key_ID": "not-a-uuid"}]},
        {"key_IDs": [{"key_ID": "{12345678-1234-1234-1234-123456789abc}"}]},
        {"key_IDs": [{"key_ID": 5}]},
        {"key_IDs": [{"keyID": str(uuid.UUID(int=1))}]},
        {"key_IDs": [{"key_ID": str(uuid.UUID(int=1))}, {"key_ID": str(uuid.UUID(int=1))}]},
        {"key_IDs": "x"},
        {"key_IDs": [{"key_ID": str(uuid.UUID(int=1))}], "extra": 1},
        {"key_IDs": [{"key_ID": str(uuid.UUID(int=2))}] * 129},
        {},
    ],
)
def test_dec_keys_rejects_malformed_requests(kmes: SimulatedKMEPair, pki: DemoPKI, body: object) -> None:
    assert_error(req(kmes, pki, "b", "POST", f"{KEYS}/sae-a/dec_keys", name="sae-b", body=body), 400)


@pytest.mark.parametrize("query", ["", "?key_ID=abc", f"?key_ID={uuid.UUID(int=3)}&key_ID={uuid.UUID(int=4)}",
                                   f"?key_ID={uuid.UUID(int=3)}&x=1", f"?keyID={uuid.UUID(int=3)}"])
def test_dec_keys_get_rejects_bad_queries(kmes: SimulatedKMEPair, pki: DemoPKI, query: str) -> None:
    assert_error(req(kmes, pki, "b", "GET", f"{KEYS}/sae-a/dec_keys{query}", name="sae-b"), 400)


def test_multicast_each_slave_gets_the_key_once(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    body = {"number": 2, "size": 256, "additional_slave_SAE_IDs": ["sae-c"]}
    keys = assert_keys(req(kmes, pki, "a", "POST", f"{KEYS}/sae-b/enc_keys", body=body), 2, 256)
    ids = {"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}
    for slave in ("sae-b", "sae-c"):
        got = assert_keys(req(kmes, pki, "b", "POST", f"{KEYS}/sae-a/dec_keys", name=slave, body=ids), 2, 256)
        assert got == keys
        assert_error(req(kmes, pki, "b", "POST", f"{KEYS}/sae-a/dec_keys", name=slave, body=ids), 400,
                     MSG_KEYS_NOT_FOUND)


# -- Authentication (401) ---------------------------------------------------------------------------


def test_dec_keys_by_an_sae_that_is_not_the_slave_is_401(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    (key,) = enc(kmes, pki)
    path = f"{KEYS}/sae-a/dec_keys?key_ID={key['key_ID']}"
    # sae-c is served by KME B but was not named as a slave.
    assert_error(req(kmes, pki, "b", "GET", path, name="sae-c"), 401, MSG_UNAUTHORIZED)
    # The master itself cannot fetch it through dec_keys either (the qkdsec round-trip probe does this).
    assert_error(req(kmes, pki, "a", "GET", path, name="sae-a"), 401, MSG_UNAUTHORIZED)
    # A refused attempt does not consume the key.
    assert req(kmes, pki, "b", "GET", path, name="sae-b").status == 200


@pytest.mark.parametrize(
    ("kme", "name"), [("b", "sae-a"), ("a", "sae-b"), ("a", "sae-d"), ("a", "kme-b"), ("a", "peer-a")]
)
@pytest.mark.parametrize("endpoint", ["status", "enc_keys", "dec_keys?key_ID=" + str(uuid.UUID(int=5))])
def test_sae_not_served_by_this_kme_is_401_everywhere(
    kmes: SimulatedKMEPair, pki: DemoPKI, kme: str, name: str, endpoint: str
) -> None:
    assert_error(req(kmes, pki, kme, "GET", f"{KEYS}/sae-b/{endpoint}", name=name), 401, MSG_UNAUTHORIZED)


def test_401_comes_before_request_parsing(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    assert_error(req(kmes, pki, "b", "POST", f"{KEYS}/sae-b/enc_keys", name="sae-a", raw=b"{"), 401)


def test_connection_without_client_certificate_is_refused(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        req(kmes, pki, "a", "GET", f"{KEYS}/sae-b/status", name=None)


def test_certificate_from_another_ca_is_refused(kmes: SimulatedKMEPair, pki: DemoPKI, other_pki: DemoPKI) -> None:
    ctx_pki = DemoPKI(other_pki.directory)
    import http.client

    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))  # trusts our KME...
    ctx.load_cert_chain(str(ctx_pki.cert("sae-a")), str(ctx_pki.key("sae-a")))  # ...but presents a foreign cert
    host, port = kmes.url_a.removeprefix("https://").split(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        conn.request("GET", f"{KEYS}/sae-b/status")
        conn.getresponse().read()
    conn.close()


# -- Only 200/400/401/503, always with a JSON Error body -------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/api/v1/keys/sae-b"),
        ("GET", "/api/v1/keys/sae-b/unknown"),
        ("DELETE", "/api/v1/keys/sae-b/enc_keys"),
        ("PUT", "/api/v1/keys/sae-a/dec_keys"),
        ("POST", "/api/v1/keys/sae-b/status"),
        ("HEAD", "/api/v1/keys/sae-b/status"),
    ],
)
def test_unknown_paths_and_methods_are_400_not_404_or_405(
    kmes: SimulatedKMEPair, pki: DemoPKI, method: str, path: str
) -> None:
    resp = req(kmes, pki, "a", method, path)
    assert resp.status == 400
    if method != "HEAD":
        assert_error(resp, 400)


def test_503_error_body_names_the_server_error(make_pair: object, pki: DemoPKI) -> None:
    pair = make_pair(rate_bps=0, capacity_bits=512)  # type: ignore[operator]
    resp = https_request(pair.url_a, "POST", f"{KEYS}/sae-b/enc_keys", pki=pki, body={"number": 3})
    body = assert_error(resp, 503, MSG_SERVER_ERROR)
    assert body["details"] and "retry-after" not in resp.headers  # never refills at rate 0


def test_openapi_document_is_published(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    resp = req(kmes, pki, "a", "GET", "/api/v1/openapi.json")
    assert resp.status == 200
    doc = resp.json
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) >= {f"{KEYS}/{{slave_SAE_ID}}/status", f"{KEYS}/{{slave_SAE_ID}}/enc_keys",
                                 f"{KEYS}/{{master_SAE_ID}}/dec_keys"}
