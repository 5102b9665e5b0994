"""Our ETSI 014 clients (blocking and asyncio) against a real but faulty KME.

The faulty KME is a small aiohttp application served over mutual TLS with the demo PKI's
``kme-a`` certificate; each test sets the fault it returns.  Every fault must end in the typed
error for it, after the retries the rules allow and no others.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from qkdhelpers import SyncOverAsync, ThreadedServer, free_port, sae_args

from hybridkex.exceptions import (
    AlreadyFinalized,
    ConfigurationError,
    HandshakeTimeout,
    HybridKEXError,
    InvalidKeyMaterial,
    KeyReuseError,
    KeySourceError,
    KeyUnavailableError,
    KMEError,
)
from hybridkex.qkd import (
    AsyncKeySource,
    ETSI014Client,
    KeySource,
    KMEBadRequestError,
    KMEConnectionError,
    KMEKeyNotFoundError,
    KMEResponseError,
    KMETimeoutError,
    KMEUnauthorizedError,
    KMEUnavailableError,
    SecureSiteWarning,
)
from hybridkex.qkd.client import AsyncETSI014Client, in_secure_site
from hybridkex.qkd.etsi014 import MSG_KEYS_NOT_FOUND
from hybridkex.qkd.kme import SimulatedKMEPair, server_ssl_context
from hybridkex.qkd.pki import DemoPKI


def container(*keys: tuple[str, bytes]) -> dict[str, Any]:
    return {"keys": [{"key_ID": kid, "key": base64.b64encode(k).decode()} for kid, k in keys]}


def fresh(n: int = 1, size: int = 32) -> dict[str, Any]:
    return container(*((str(uuid.uuid4()), bytes(range(size))) for _ in range(n)))


STATUS = {"source_KME_ID": "kme-a", "target_KME_ID": "kme-b", "master_SAE_ID": "sae-a", "slave_SAE_ID": "sae-b",
          "key_size": 256, "stored_key_count": 5, "max_key_count": 10, "max_key_per_request": 4,
          "max_key_size": 1024, "min_key_size": 64, "max_SAE_ID_count": 0}


class FaultyKME:
    """Answers every request with ``self.reply(request)``; counts requests."""

    def __init__(self) -> None:
        self.count = 0
        self.reply: Callable[[web.Request], Any] = lambda r: web.json_response(fresh())
        self.last_body: Any = None

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.count += 1
            raw = await request.read()
            self.last_body = json.loads(raw) if raw else None
            result = self.reply(request)
            if asyncio.iscoroutine(result):
                result = await result
            return result  # type: ignore[no-any-return]

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@pytest.fixture(scope="module")
def faulty_server(pki: DemoPKI) -> Iterator[tuple[FaultyKME, ThreadedServer]]:
    kme = FaultyKME()
    ctx = server_ssl_context(pki.cert("kme-a"), pki.key("kme-a"), pki.ca_cert)
    with ThreadedServer(kme.app, ctx) as server:
        yield kme, server


@pytest.fixture
def faulty(faulty_server: tuple[FaultyKME, ThreadedServer]) -> Iterator[FaultyKME]:
    kme, _ = faulty_server
    kme.count = 0
    kme.reply = lambda r: web.json_response(fresh())
    yield kme


@pytest.fixture
def client(faulty_server: tuple[FaultyKME, ThreadedServer], make_client: Callable[..., Any], pki: DemoPKI) -> Any:
    _, server = faulty_server
    return make_client(server.url, **sae_args(pki, "sae-a"), retries=2, backoff=0.01, max_backoff=0.05, timeout=5)


def json_reply(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Callable[[web.Request], Any]:
    return lambda r: web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json",
                                  headers=headers)


# -- happy path and identity ----------------------------------------------------------------------


def test_clients_implement_the_key_source_protocols(kmes: SimulatedKMEPair) -> None:
    sync = kmes.key_source("sae-a")
    asyn = kmes.async_key_source("sae-a")
    assert isinstance(sync, KeySource) and isinstance(asyn, AsyncKeySource)
    assert sync.sae_id == asyn.sae_id == "sae-a"
    sync.close()


def test_sae_and_kme_ids_come_from_the_certificates(kmes: SimulatedKMEPair, make_client: Callable[..., Any]) -> None:
    c = make_client(kmes.url_b, **sae_args(kmes.pki, "sae-b"))
    assert c.sae_id == "sae-b"
    status = c.status("sae-a")
    assert c.kme_id == "kme-b" == status.source_kme_id


def test_sync_kme_id_is_learned_on_first_access(kmes: SimulatedKMEPair) -> None:
    with ETSI014Client(kmes.url_b, **sae_args(kmes.pki, "sae-b")) as c:
        assert c.kme_id == "kme-b"  # connects once to read the KME certificate
    with ETSI014Client(f"https://127.0.0.1:{free_port()}", **sae_args(kmes.pki, "sae-b")) as down, \
            pytest.raises(KMEConnectionError):
        _ = down.kme_id


def test_round_trip_and_reuse_refusal(kmes: SimulatedKMEPair, make_client: Callable[..., Any]) -> None:
    master = make_client(kmes.url_a, **sae_args(kmes.pki, "sae-a"))
    slave = make_client(kmes.url_b, **sae_args(kmes.pki, "sae-b"))
    keys = master.get_keys("sae-b", 3, 512)
    assert slave.get_keys_by_id("sae-a", [k.key_id for k in keys]) == keys
    with pytest.raises(KeyReuseError):  # refused locally, before asking the KME
        slave.get_keys_by_id("sae-a", [keys[0].key_id])
    for k in keys:
        assert k.key.hex() not in repr(k) and k.key.hex() not in repr(master)


def test_request_sends_number_and_size_as_post(faulty: FaultyKME, client: Any) -> None:
    faulty.reply = lambda r: web.json_response(fresh(2, 64))
    assert len(client.get_keys("sae-b", 2, 512)) == 2
    assert faulty.last_body == {"number": 2, "size": 512}


def test_key_request_options_are_sent(faulty: FaultyKME, client: Any) -> None:
    client.enc_keys("sae-b", 1, 256, additional_slave_sae_ids=["sae-c"], extension_optional=[{"x_route": "direct"}])
    assert faulty.last_body == {"number": 1, "size": 256, "additional_slave_SAE_IDs": ["sae-c"],
                                "extension_optional": [{"x_route": "direct"}]}


def test_status_parsed(faulty: FaultyKME, client: Any) -> None:
    faulty.reply = json_reply(STATUS)
    status = client.status("sae-b")
    assert (status.stored_key_count, status.max_key_per_request, status.max_sae_id_count) == (5, 4, 0)


# -- malformed answers -----------------------------------------------------------------------------

K = str(uuid.uuid4())
BAD_CONTAINERS: dict[str, Any] = {
    "not json": b"{\"keys\": [",
    "json array": [],
    "no keys": {"kyes": []},
    "keys not a list": {"keys": {}},
    "wrong count": fresh(1),
    "too many": fresh(3),
    "wrong size": fresh(2, 16),
    "mixed sizes": container((str(uuid.uuid4()), b"a" * 32), (str(uuid.uuid4()), b"b" * 16)),
    "duplicate ids": container((K, b"a" * 32), (K, b"b" * 32)),
    "duplicate ids differing in case": container((K, b"a" * 32), (K.upper(), b"b" * 32)),
    "bad uuid": container(("not-a-uuid", b"a" * 32), (str(uuid.uuid4()), b"b" * 32)),
    "uuid in braces": container((f"{{{uuid.uuid4()}}}", b"a" * 32), (str(uuid.uuid4()), b"b" * 32)),
    "bad base64": {"keys": [{"key_ID": str(uuid.uuid4()), "key": "!!!!"}, {"key_ID": str(uuid.uuid4()), "key": "x"}]},
    "unpadded base64": {"keys": [{"key_ID": str(uuid.uuid4()), "key": base64.b64encode(b"a" * 32).decode()[:-1]}] * 2},
    "urlsafe base64": {"keys": [{"key_ID": str(uuid.uuid4()), "key": base64.urlsafe_b64encode(b"\xfb" * 32).decode()},
                                {"key_ID": str(uuid.uuid4()), "key": base64.b64encode(b"a" * 32).decode()}]},
    "non-canonical base64": {"keys": [{"key_ID": str(uuid.uuid4()), "key": "YR=="}] * 2},
    "key not a string": {"keys": [{"key_ID": str(uuid.uuid4()), "key": 5}] * 2},
    "entry not an object": {"keys": ["x", "y"]},
    "duplicate json member": b'{"keys": [], "keys": []}',
    "NaN": b'{"keys": NaN}',
    "extension not an object": {**fresh(2), "key_container_extension": 5},
}


@pytest.mark.parametrize("case", list(BAD_CONTAINERS))
def test_malformed_key_containers_are_refused(faulty: FaultyKME, client: Any, case: str) -> None:
    body = BAD_CONTAINERS[case]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    faulty.reply = lambda r: web.Response(body=raw, content_type="application/json")
    with pytest.raises(KMEResponseError) as info:
        client.get_keys("sae-b", 2, 256)
    assert faulty.count == 1  # a malformed answer is not retried
    assert isinstance(info.value, KMEError) and info.value.status == 200
    assert "KME https://127.0.0.1:" in str(info.value)


def test_non_json_content_type_is_refused(faulty: FaultyKME, client: Any) -> None:
    faulty.reply = lambda r: web.Response(text=json.dumps(fresh()), content_type="text/html")
    with pytest.raises(KMEResponseError, match="text/html"):
        client.get_keys("sae-b")


def test_oversized_answer_is_refused(faulty: FaultyKME, client: Any) -> None:
    faulty.reply = lambda r: web.Response(body=b"[" + b" " * (5 * 1024 * 1024) + b"]", content_type="application/json")
    with pytest.raises(KMEResponseError, match="too large"):
        client.get_keys("sae-b")


@pytest.mark.parametrize("mutate", [
    lambda s: s.pop("max_SAE_ID_count"),
    lambda s: s.update(key_size=True),
    lambda s: s.update(key_size="256"),
    lambda s: s.update(stored_key_count=-1),
    lambda s: s.update(source_KME_ID=""),
    lambda s: s.update(slave_SAE_ID="sae-z"),
    lambda s: s.update(master_SAE_ID="sae-z"),
    lambda s: s.update(status_extension=[]),
    lambda s: s.update(max_key_per_request=0),
])
def test_malformed_status_is_refused(faulty: FaultyKME, client: Any, mutate: Callable[[dict[str, Any]], Any]) -> None:
    status = dict(STATUS)
    mutate(status)
    faulty.reply = json_reply(status)
    with pytest.raises(KMEResponseError):
        client.status("sae-b")


def test_dec_keys_must_return_exactly_the_requested_ids(faulty: FaultyKME, client: Any) -> None:
    wanted = [str(uuid.uuid4()), str(uuid.uuid4())]
    faulty.reply = json_reply(container((wanted[0], b"a" * 32), (str(uuid.uuid4()), b"b" * 32)))
    with pytest.raises(KMEResponseError, match="other than those requested"):
        client.get_keys_by_id("sae-b", wanted)
    # Reordered but complete is fine, and comes back in the requested order.
    faulty.reply = json_reply(container((wanted[1], b"b" * 32), (wanted[0], b"a" * 32)))
    got = client.get_keys_by_id("sae-b", wanted)
    assert [k.key_id for k in got] == wanted and got[0].key == b"a" * 32


def test_kme_repeating_a_key_id_across_answers_is_refused(faulty: FaultyKME, client: Any) -> None:
    same = fresh(1)
    faulty.reply = json_reply(same)
    client.get_keys("sae-b")
    with pytest.raises(KeyReuseError):
        client.get_keys("sae-b")


# -- error statuses ---------------------------------------------------------------------------------


def test_400_not_found_is_typed(faulty: FaultyKME, client: Any) -> None:
    faulty.reply = json_reply({"message": MSG_KEYS_NOT_FOUND}, 400)
    with pytest.raises(KMEKeyNotFoundError) as info:
        client.get_keys_by_id("sae-b", [str(uuid.uuid4())])
    assert isinstance(info.value, KeyUnavailableError) and isinstance(info.value, KMEBadRequestError)
    assert info.value.status == 400 and faulty.count == 1


def test_400_shows_the_kme_message_sanitized(faulty: FaultyKME, client: Any) -> None:
    faulty.reply = json_reply({"message": "size shall be a multiple of 8\n\x1b[31mFAKE LOG LINE", "details": []}, 400)
    with pytest.raises(KMEBadRequestError) as info:
        client.get_keys("sae-b")
    text = str(info.value)
    assert "size shall be a multiple of 8" in text and "\n" not in text and "\x1b" not in text


def test_400_without_json_body_is_still_a_400(faulty: FaultyKME, client: Any) -> None:
    faulty.reply = lambda r: web.Response(status=400, text="oops")
    with pytest.raises(KMEBadRequestError, match="no error message"):
        client.get_keys("sae-b")


def test_401_is_typed(faulty: FaultyKME, client: Any) -> None:
    faulty.reply = lambda r: web.Response(status=401)  # the spec defines no body for 401
    with pytest.raises(KMEUnauthorizedError) as info:
        client.get_keys("sae-b")
    assert info.value.status == 401 and "sae-a" in str(info.value) and faulty.count == 1


@pytest.mark.parametrize("status", [404, 405, 422, 500, 302])
def test_status_codes_outside_the_spec_are_protocol_errors(faulty: FaultyKME, client: Any, status: int) -> None:
    faulty.reply = json_reply({"message": "nope"}, status, headers={"Location": "https://127.0.0.1:1/"})
    with pytest.raises(KMEResponseError) as info:
        client.get_keys("sae-b")
    assert info.value.status == status and faulty.count == 1


def test_503_is_retried_then_succeeds(faulty: FaultyKME, client: Any) -> None:
    def reply(request: web.Request) -> web.Response:
        if faulty.count <= 2:
            return web.json_response({"message": "Error on server side."}, status=503)
        return web.json_response(fresh())

    faulty.reply = reply
    assert len(client.get_keys("sae-b")) == 1
    assert faulty.count == 3


def test_503_every_time_gives_up_after_the_retries(faulty: FaultyKME, client: Any) -> None:
    faulty.reply = json_reply({"message": "Error on server side."}, 503, headers={"Retry-After": "0"})
    with pytest.raises(KMEUnavailableError) as info:
        client.get_keys("sae-b")
    assert faulty.count == 3  # 1 + retries=2
    assert isinstance(info.value, KeyUnavailableError) and info.value.status == 503


def test_slow_kme_times_out_without_retry(
    faulty_server: tuple[FaultyKME, ThreadedServer], faulty: FaultyKME, make_client: Callable[..., Any], pki: DemoPKI
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.json_response(fresh())

    faulty.reply = slow
    c = make_client(faulty_server[1].url, **sae_args(pki, "sae-a"), timeout=0.3, retries=3, backoff=0.01)
    with pytest.raises(KMETimeoutError) as info:
        c.get_keys("sae-b")
    assert isinstance(info.value, HandshakeTimeout) and isinstance(info.value, KeySourceError)
    assert faulty.count == 1  # the KME may have served it: never retried


def test_connection_dropped_after_request_is_not_retried(faulty: FaultyKME, client: Any) -> None:
    def drop(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.abort()
        return web.json_response(fresh())

    faulty.reply = drop
    with pytest.raises(KMEConnectionError, match="the KME may have served it") as info:
        client.get_keys("sae-b")
    assert faulty.count == 1
    # It accepts our certificate (it waits for requests on a fresh connection): no certificate hint.
    assert "certificate" not in str(info.value)


# -- connection-level failures ---------------------------------------------------------------------


def test_kme_down_is_retried_then_reported(make_client: Callable[..., Any], pki: DemoPKI) -> None:
    c = make_client(f"https://127.0.0.1:{free_port()}", **sae_args(pki, "sae-a"), retries=2, backoff=0.01)
    with pytest.raises(KMEConnectionError, match=r"after 3 attempt\(s\)"):
        c.get_keys("sae-b")


def test_kme_coming_up_during_retries_is_reached(pki: DemoPKI, client_kind: str) -> None:
    """The client keeps trying while the KME starts (a real restart race)."""
    import threading

    port = free_port()
    settings_ready = threading.Event()
    holder: list[SimulatedKMEPair] = []

    def start_later() -> None:
        settings_ready.wait(5)
        import time

        time.sleep(0.3)
        holder.append(SimulatedKMEPair.start(pki, port_a=port))

    t = threading.Thread(target=start_later)
    t.start()
    try:
        args = {"url": f"https://127.0.0.1:{port}", **sae_args(pki, "sae-a"), "retries": 8, "backoff": 0.1,
                "max_backoff": 1.0}
        c: Any = ETSI014Client(**args) if client_kind == "sync" else SyncOverAsync(AsyncETSI014Client(**args))
        settings_ready.set()
        assert c.status("sae-b").source_kme_id == "kme-a"
        (c.dispose if isinstance(c, SyncOverAsync) else c.close)()
    finally:
        t.join(10)
        for pair in holder:
            pair.stop()


def test_kme_certificate_not_matching_the_address_is_refused(
    make_client: Callable[..., Any], pki: DemoPKI
) -> None:
    # sae-c's certificate has no IP SAN: a server presenting it cannot be 127.0.0.1.
    kme = FaultyKME()
    ctx = server_ssl_context(pki.cert("sae-c"), pki.key("sae-c"), pki.ca_cert)
    with ThreadedServer(kme.app, ctx) as server:
        c = make_client(server.url, **sae_args(pki, "sae-a"), retries=3, backoff=0.01)
        with pytest.raises(KMEConnectionError, match="did not verify"):
            c.get_keys("sae-b")
    assert kme.count == 0


def test_kme_with_certificate_from_another_ca_is_refused(
    make_client: Callable[..., Any], pki: DemoPKI, other_pki: DemoPKI
) -> None:
    kme = FaultyKME()
    ctx = server_ssl_context(other_pki.cert("kme-a"), other_pki.key("kme-a"), pki.ca_cert)
    with ThreadedServer(kme.app, ctx) as server:
        c = make_client(server.url, **sae_args(pki, "sae-a"))
        with pytest.raises(KMEConnectionError, match="did not verify"):
            c.get_keys("sae-b")
    assert kme.count == 0


def test_kme_refusing_our_certificate(make_client: Callable[..., Any], kmes: SimulatedKMEPair,
                                      other_pki: DemoPKI) -> None:
    # Our SAE certificate comes from a CA the KME does not trust; we trust the KME.
    args = {"cert": other_pki.cert("sae-a"), "key": other_pki.key("sae-a"), "ca": kmes.pki.ca_cert}
    c = make_client(kmes.url_a, **args, retries=0)
    # Our (asyncio) KME drops the connection without an alert; a probe connection shows why.
    with pytest.raises(KMEConnectionError, match=r"the KME refused this SAE's certificate .*sae-a\.crt"):
        c.get_keys("sae-b")


class BlockingTLSServer:
    """A one-thread TLS server with the blocking ssl module (which sends OpenSSL's alerts).

    ``after_handshake(tls_socket)`` runs for each connection whose handshake succeeded.
    """

    def __init__(self, ctx: ssl.SSLContext, after_handshake: Callable[[ssl.SSLSocket], object]) -> None:
        self._ctx, self._after = ctx, after_handshake
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stop = threading.Event()

    def _serve(self) -> None:
        self._listener.settimeout(0.1)  # so that __exit__ can stop the thread
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            raw.settimeout(5)
            try:
                with self._ctx.wrap_socket(raw, server_side=True) as tls:
                    self._after(tls)
            except OSError:
                raw.close()

    def __enter__(self) -> BlockingTLSServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._listener.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_certificate_alert_gets_the_certificate_hint(
    make_client: Callable[..., Any], pki: DemoPKI, other_pki: DemoPKI, version: ssl.TLSVersion
) -> None:
    # This KME trusts only the other CA, so it refuses our SAE certificate with an unknown_ca alert:
    # during the handshake with TLS 1.2, after our side finished it (and sent the request) with 1.3.
    ctx = server_ssl_context(pki.cert("kme-a"), pki.key("kme-a"), other_pki.ca_cert)
    ctx.maximum_version = version
    with BlockingTLSServer(ctx, lambda tls: tls.recv(1)) as server:
        c = make_client(server.url, **sae_args(pki, "sae-a"), retries=0)
        with pytest.raises(KMEConnectionError, match="refused this SAE's certificate") as info:
            c.get_keys("sae-b")
    assert "is the KME running" not in str(info.value)


def test_a_tls_failure_that_is_not_about_certificates_gets_no_certificate_hint(
    make_client: Callable[..., Any], pki: DemoPKI
) -> None:
    def garble(tls: ssl.SSLSocket) -> None:
        tls.recv(65536)  # the request
        os.write(tls.fileno(), b"\x17\x03\x03\x00\x20" + bytes(32))  # a record that no key decrypts

    ctx = server_ssl_context(pki.cert("kme-a"), pki.key("kme-a"), pki.ca_cert)
    with BlockingTLSServer(ctx, garble) as server:
        c = make_client(server.url, **sae_args(pki, "sae-a"), retries=0)
        with pytest.raises(KMEConnectionError) as info:
            c.get_keys("sae-b")
    text = str(info.value)
    assert "certificate" not in text and "may have served it" in text
    assert "\n" not in text


def test_kme_id_mismatch_is_refused(faulty: FaultyKME, faulty_server: tuple[FaultyKME, ThreadedServer],
                                    make_client: Callable[..., Any], pki: DemoPKI) -> None:
    c = make_client(faulty_server[1].url, **sae_args(pki, "sae-a"), kme_id="kme-b")
    with pytest.raises(KMEConnectionError, match="'kme-a'"):
        c.get_keys("sae-b")


# -- configuration and the secure-site rules ---------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:1", "http://10.0.0.1:443", "ftp://127.0.0.1", "127.0.0.1:443",
                                 "https://127.0.0.1:443/?x=1", "https://user@127.0.0.1", "https://127.0.0.1:99999"])
def test_bad_or_plain_http_urls_are_refused(url: str, pki: DemoPKI) -> None:
    with pytest.raises(ConfigurationError):
        ETSI014Client(url, **sae_args(pki, "sae-a"))


def test_plain_http_only_on_loopback_and_only_when_allowed(pki: DemoPKI) -> None:
    with pytest.raises(ConfigurationError, match="loopback"):
        ETSI014Client("http://192.0.2.1:8080", sae_id="sae-a", allow_insecure_http=True)
    kme = FaultyKME()
    kme.reply = lambda r: web.json_response(fresh())
    with ThreadedServer(kme.app, None) as server:
        c = ETSI014Client(server.url, sae_id="sae-a", kme_id="kme-a", allow_insecure_http=True)
        assert len(c.get_keys("sae-b", 1, 256)) == 1
        c.close()


def test_mutual_tls_files_are_required(pki: DemoPKI) -> None:
    with pytest.raises(ConfigurationError):
        ETSI014Client("https://127.0.0.1:1", cert=pki.cert("sae-a"), ca=pki.ca_cert)
    with pytest.raises(ConfigurationError):
        ETSI014Client("https://127.0.0.1:1", cert=pki.cert("sae-a"), key=pki.key("sae-b"), ca=pki.ca_cert)


@pytest.mark.parametrize(("number", "size"), [(0, 256), (-1, 256), (1, 0), (1, 255), (True, 256)])
def test_bad_request_arguments_are_refused_locally(kmes: SimulatedKMEPair, number: int, size: int) -> None:
    with kmes.key_source("sae-a") as c, pytest.raises(ConfigurationError):
        c.get_keys("sae-b", number, size)


@pytest.mark.parametrize("ids", [[], ["nope"], [str(uuid.UUID(int=1))] * 2])
def test_bad_key_ids_are_refused_locally(kmes: SimulatedKMEPair, ids: list[str]) -> None:
    with kmes.key_source("sae-b") as c, pytest.raises(InvalidKeyMaterial):
        c.get_keys_by_id("sae-a", ids)


def test_secure_site_classification() -> None:
    from ipaddress import ip_network

    trusted = (ip_network("10.1.0.0/16"), ip_network("fd00::/8"))
    assert in_secure_site("127.0.0.1", ()) and in_secure_site("::1", ()) and in_secure_site("127.8.9.10", ())
    assert in_secure_site("::ffff:127.0.0.1", ())
    assert in_secure_site("10.1.2.3", trusted) and in_secure_site("fd00::5", trusted)
    assert not in_secure_site("10.2.0.1", trusted) and not in_secure_site("192.0.2.1", ())
    assert not in_secure_site("not an ip", trusted)


def test_kme_outside_the_secure_site_warns_once(kmes: SimulatedKMEPair) -> None:
    c = kmes.key_source("sae-a")
    peercert = {"subject": ((("commonName", "kme-a"),),)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c._check_peer(("192.0.2.7", 443), peercert)
        c._check_peer(("192.0.2.7", 443), peercert)
        c._check_peer(("127.0.0.1", 443), peercert)
    site = [w for w in caught if issubclass(w.category, SecureSiteWarning)]
    assert len(site) == 1 and "192.0.2.7" in str(site[0].message) and "secure site" in str(site[0].message)
    trusting = kmes.key_source("sae-a", trusted_networks=["192.0.2.0/24"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trusting._check_peer(("192.0.2.7", 443), peercert)
    with pytest.raises(ConfigurationError):
        kmes.key_source("sae-a", trusted_networks=["not-a-net"])


def test_no_warning_on_loopback(kmes: SimulatedKMEPair, make_client: Callable[..., Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", SecureSiteWarning)
        c = make_client(kmes.url_a, **sae_args(kmes.pki, "sae-a"))
        c.status("sae-b")


def test_closed_client_refuses(kmes: SimulatedKMEPair, make_client: Callable[..., Any]) -> None:
    c = make_client(kmes.url_a, **sae_args(kmes.pki, "sae-a"))
    c.status("sae-b")
    c.close()
    with pytest.raises(AlreadyFinalized):
        c.status("sae-b")
    assert issubclass(AlreadyFinalized, HybridKEXError)


def test_async_kme_id_before_connect(kmes: SimulatedKMEPair) -> None:
    c = AsyncETSI014Client(kmes.url_a, **sae_args(kmes.pki, "sae-a"))
    with pytest.raises(ConfigurationError):
        _ = c.kme_id

    async def main() -> str:
        async with c:
            await c.connect()
            return c.kme_id

    assert asyncio.run(main()) == "kme-a"


def test_sync_client_is_thread_safe(kmes: SimulatedKMEPair) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with kmes.key_source("sae-a") as c, ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(lambda _: c.get_keys("sae-b", 2), range(64)))
    ids = [k.key_id for b in batches for k in b]
    assert len(set(ids)) == len(ids) == 128


def test_ssl_errors_are_not_leaking_as_ssl_exceptions(faulty: FaultyKME, client: Any) -> None:
    faulty.reply = lambda r: web.json_response(fresh())
    try:
        client.get_keys("sae-b")
    except ssl.SSLError:  # pragma: no cover - would be a bug
        pytest.fail("ssl.SSLError escaped")
