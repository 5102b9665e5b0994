"""The I/O-free parts: ETSI 014 data formats, the QKD link model and the key store (with SQLite).

The store is a plain class with a lock; here it is exercised directly, without HTTP.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest

from hybridkex.exceptions import ConfigurationError, RemoteProtocolError
from hybridkex.qkd import KMEResponseError
from hybridkex.qkd.etsi014 import (
    MSG_EXTENSION_MANDATORY_UNSUPPORTED,
    MSG_KEYS_NOT_FOUND,
    MSG_SIZE_NOT_MULTIPLE_OF_8,
    KeyRequest,
    RequestRejected,
    is_uuid,
    key_container_body,
    loads_strict,
    parse_key_container,
    parse_key_ids_query,
    parse_key_ids_request,
    parse_key_request,
    parse_key_request_query,
    sae_path,
)
from hybridkex.qkd.kme import KeyStore, KMELimits, QKDLinkModel
from hybridkex.qkd.kme.openapi import openapi_document, render

DOCS = Path(__file__).resolve().parents[2] / "docs"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def store(tmp_path: Path | None = None, *, rate: float = 0.0, capacity: int = 1 << 16,
          clock: Clock | None = None, **limits: int) -> KeyStore:
    link = QKDLinkModel(rate, capacity, clock=clock or Clock())
    db = None if tmp_path is None else tmp_path / "keys.sqlite"
    return KeyStore({"sae-a": "kme-a", "sae-b": "kme-b", "sae-c": "kme-b"}, link, limits=KMELimits(**limits),
                    db_path=db)


# -- formats -----------------------------------------------------------------------------------------


def test_uuid_form() -> None:
    u = str(uuid.uuid4())
    assert is_uuid(u) and is_uuid(u.upper())
    for bad in (u.replace("-", ""), "{" + u + "}", "urn:uuid:" + u, u + " ", 5, None, ""):
        assert not is_uuid(bad)


def test_sae_ids_are_url_encoded_in_paths() -> None:
    assert sae_path("sae a/b?") == "sae%20a%2Fb%3F"


@pytest.mark.parametrize("text", ['{"a": NaN}', '{"a": Infinity}', '{"a": 1, "a": 2}', "{", "[" * 50_000])
def test_strict_json(text: str) -> None:
    with pytest.raises(ValueError):
        loads_strict(text)
    with pytest.raises(ValueError):
        loads_strict(b"\xff")


def test_key_request_defaults_and_fields() -> None:
    assert parse_key_request({}) == KeyRequest()
    req = parse_key_request({"number": 2, "size": 512, "additional_slave_SAE_IDs": ["x"],
                             "extension_optional": [{"a_b": 1}]})
    assert (req.number, req.size, req.additional_slave_sae_ids) == (2, 512, ("x",))
    assert parse_key_request_query([]) == KeyRequest()
    assert parse_key_request_query([("number", "3"), ("size", "64")]) == KeyRequest(3, 64)


@pytest.mark.parametrize("params", [[("number", "1"), ("number", "2")], [("size", "1e3")], [("size", "")],
                                    [("key_ID", "x")], [("number", "²")]])
def test_key_request_query_rejections(params: list[tuple[str, str]]) -> None:
    with pytest.raises(RequestRejected) as info:
        parse_key_request_query(params)
    assert info.value.status == 400 and isinstance(info.value, RemoteProtocolError)


def test_key_ids_request() -> None:
    u = uuid.uuid4()
    assert parse_key_ids_request({"key_IDs": [{"key_ID": str(u).upper()}]}) == [str(u)]
    assert parse_key_ids_query([("key_ID", str(u))]) == [str(u)]
    with pytest.raises(RequestRejected):
        parse_key_ids_request({"key_IDs": [{"key_ID": str(u)}, {"key_ID": str(u).upper()}]})


def test_container_round_trip_and_order() -> None:
    from hybridkex.qkd import QKDKey

    keys = [QKDKey(str(uuid.uuid4()), bytes([i]) * 32) for i in range(3)]
    body = json.loads(json.dumps(key_container_body(keys)))
    assert parse_key_container(body, number=3, size_bits=256, where="t") == keys
    ids = [k.key_id for k in reversed(keys)]
    assert parse_key_container(body, number=3, size_bits=None, where="t", expected_ids=ids) == keys[::-1]
    with pytest.raises(KMEResponseError):
        parse_key_container(body, number=3, size_bits=None, where="t", expected_ids=[*ids[:2], str(uuid.uuid4())])


# -- the link model -----------------------------------------------------------------------------------


def test_link_fills_at_its_rate_up_to_capacity() -> None:
    clock = Clock()
    link = QKDLinkModel(1000, 4000, initial_bits=0, clock=clock)
    assert link.available_bits() == 0 and not link.take(1)
    clock.now = 2.0
    assert link.available_bits() == 2000
    assert link.take(1500) and link.available_bits() == 500
    assert link.seconds_until(1000) == pytest.approx(0.5)
    clock.now = 100.0
    assert link.available_bits() == 4000  # bounded
    assert link.seconds_until(5000) is None  # more than it can ever hold
    with pytest.raises(ConfigurationError):
        QKDLinkModel(-1, 10)
    with pytest.raises(ConfigurationError):
        QKDLinkModel(1, 0)


# -- the store ----------------------------------------------------------------------------------------


def test_store_exactly_once_and_authorization() -> None:
    s = store()
    keys = s.enc_keys("kme-a", "sae-a", "sae-b", KeyRequest(number=3))
    ids = [k.key_id for k in keys]
    with pytest.raises(RequestRejected) as info:
        s.dec_keys("kme-b", "sae-c", "sae-a", ids)  # not the slave
    assert info.value.status == 401
    with pytest.raises(RequestRejected) as info:
        s.dec_keys("kme-a", "sae-b", "sae-a", ids)  # sae-b is not served by KME A
    assert info.value.status == 401
    assert s.dec_keys("kme-b", "sae-b", "sae-a", ids) == keys
    with pytest.raises(RequestRejected) as info:
        s.dec_keys("kme-b", "sae-b", "sae-a", ids[:1])
    assert (info.value.status, str(info.value)) == (400, MSG_KEYS_NOT_FOUND)
    assert s.stats().pending_keys == 0


def test_store_limits_and_messages() -> None:
    s = store(capacity=4096, max_key_per_request=4, max_sae_id_count=1)
    for req, msg in [(KeyRequest(size=12 * 8 + 4), MSG_SIZE_NOT_MULTIPLE_OF_8),
                     (KeyRequest(extension_mandatory=({"x_y": 1},)), MSG_EXTENSION_MANDATORY_UNSUPPORTED),
                     (KeyRequest(number=5), None), (KeyRequest(size=16), None),
                     (KeyRequest(additional_slave_sae_ids=("sae-c", "sae-a")), None)]:
        with pytest.raises(RequestRejected) as info:
            s.enc_keys("kme-a", "sae-a", "sae-b", req)
        assert info.value.status == 400
        if msg:
            assert str(info.value) == msg
    # Exhaustion: 4096 bits = 16 keys of 256; the 17th is a 503 with no refill in sight (rate 0).
    for _ in range(4):
        s.enc_keys("kme-a", "sae-a", "sae-b", KeyRequest(number=4))
    with pytest.raises(RequestRejected) as info:
        s.enc_keys("kme-a", "sae-a", "sae-b", KeyRequest())
    assert info.value.status == 503 and info.value.retry_after is None


def test_store_pending_bound_gives_503() -> None:
    s = store(max_pending_keys=5)
    s.enc_keys("kme-a", "sae-a", "sae-b", KeyRequest(number=5))
    with pytest.raises(RequestRejected) as info:
        s.enc_keys("kme-a", "sae-a", "sae-b", KeyRequest())
    assert info.value.status == 503


def test_store_persistence_survives_reopen(tmp_path: Path) -> None:
    s = store(tmp_path)
    keys = s.enc_keys("kme-a", "sae-a", "sae-b", KeyRequest(number=4, additional_slave_sae_ids=("sae-c",)))
    ids = [k.key_id for k in keys]
    s.dec_keys("kme-b", "sae-b", "sae-a", ids[:2])
    s.dec_keys("kme-b", "sae-c", "sae-a", ids[:1])
    s.close()
    s2 = store(tmp_path)
    # ids[0] went to both slaves (deleted); ids[1] is still owed to sae-c; ids[2:] to both.
    assert s2.stats().pending_keys == 3
    with pytest.raises(RequestRejected):
        s2.dec_keys("kme-b", "sae-b", "sae-a", ids[:1])  # sae-b already had it
    assert s2.dec_keys("kme-b", "sae-c", "sae-a", ids[1:]) == keys[1:]
    assert s2.dec_keys("kme-b", "sae-b", "sae-a", ids[2:]) == keys[2:]
    s2.close()
    s3 = store(tmp_path)
    assert s3.stats().pending_keys == 0
    s3.close()


def test_store_is_thread_safe() -> None:
    s = store(capacity=1 << 22)
    ids: list[str] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(50):
            got = [k.key_id for k in s.enc_keys("kme-a", "sae-a", "sae-b", KeyRequest(number=2))]
            with lock:
                ids.extend(got)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(ids) == len(set(ids)) == 800 == s.stats().pending_keys


def test_store_key_material_never_in_repr_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    s = store()
    with caplog.at_level(logging.DEBUG, logger="hybridkex"):
        keys = s.enc_keys("kme-a", "sae-a", "sae-b", KeyRequest(number=2))
        s.dec_keys("kme-b", "sae-b", "sae-a", [k.key_id for k in keys])
    assert keys[0].key_id in caplog.text
    for k in keys:
        assert k.key.hex() not in caplog.text and k.key.hex() not in repr(k)


# -- OpenAPI ------------------------------------------------------------------------------------------


def test_openapi_file_matches_the_served_document() -> None:
    assert (DOCS / "openapi-etsi-qkd-014.json").read_text(encoding="utf-8") == render()


def test_openapi_covers_every_route() -> None:
    from aiohttp import web

    from hybridkex.qkd.kme import create_kme_app

    app = create_kme_app(store(), "kme-a")
    doc = openapi_document()
    served = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("formatter") or info.get("path")
        served.add((route.method.lower(), path))
    documented = set()
    for path, ops in doc["paths"].items():
        generic = path.replace("{slave_SAE_ID}", "{sae}").replace("{master_SAE_ID}", "{sae}")
        documented |= {(m, generic) for m in ops}
    assert served == documented
    for ops in doc["paths"].values():
        for op in ops.values():
            if op["operationId"] != "getOpenAPI":
                assert set(op["responses"]) == {"200", "400", "401", "503"}
    assert isinstance(app, web.Application)
