"""KME failure kinds and the ``kme`` health component, decided from recorded outcomes (no I/O here)."""

from __future__ import annotations

import pytest

from hybridkex.exceptions import AlreadyFinalized, InvalidKeyMaterial, KeyReuseError, KeySourceError
from hybridkex.qkd.errors import (
    KMEBadRequestError,
    KMEConnectionError,
    KMEKeyNotFoundError,
    KMEResponseError,
    KMETimeoutError,
    KMEUnauthorizedError,
    KMEUnavailableError,
)
from hybridkex.tunnel.kmewatch import KMEWatch, PeerSAE, kme_error_kind
from hybridkex.tunnel.metrics import KME_ERROR_KINDS, Health

URL = "https://kme.example:8443"
PEERS = [PeerSAE("sae-a", "client-a", "peers[0].sae_id"), PeerSAE("sae-c", "client-c", "peers[1].sae_id")]


@pytest.mark.parametrize(("exc", "kind"), [
    (KMEConnectionError("refused"), "connection"),
    (KMETimeoutError("slow"), "timeout"),
    (KMEUnavailableError("503", status=503), "unavailable"),
    (KMEKeyNotFoundError("gone", status=400), "key_not_found"),
    (KMEUnauthorizedError("401", status=401), "unauthorized"),
    (KMEBadRequestError("400", status=400), "bad_request"),
    (KMEResponseError("bad json"), "bad_response"),
    (KeyReuseError("again"), "key_reuse"),
    (KeySourceError("other"), "other"),
    (ConnectionResetError(), "connection"),
    (AlreadyFinalized("closed at reload"), None),
    (InvalidKeyMaterial("caller bug"), None),
])
def test_every_kme_failure_has_a_documented_kind(exc: BaseException, kind: str | None) -> None:
    assert kme_error_kind(exc) == kind
    assert kind is None or kind in KME_ERROR_KINDS


def watch(master: bool, qkd: str = "required") -> tuple[KMEWatch, list[str]]:
    counted: list[str] = []
    now = [100.0]
    w = KMEWatch(counted.append, url=URL, master=master, clock=lambda: now[0])
    w.configure(PEERS if master else PEERS[:1], qkd)
    return w, counted


def test_master_outage_is_degraded_while_the_pool_covers_then_unhealthy() -> None:
    w, counted = watch(master=True)
    assert w.health({"sae-a": 5, "sae-c": 5}, 1) == ("ok", "")
    w.failure("sae-a", KMEConnectionError("connection refused"))
    state, detail = w.health({"sae-a": 5, "sae-c": 2}, 1)
    assert state == "degraded" and detail.startswith(f"KME {URL} unreachable for 0 s (KMEConnectionError: ")
    assert detail.endswith("the key pool still covers the next handshake: 5 key(s) for 'sae-a', 2 key(s) for "
                           "'sae-c'")
    state, detail = w.health({"sae-a": 5, "sae-c": 0}, 1)
    assert state == "unhealthy" and detail.endswith("no pooled QKD key for 'client-c' (SAE 'sae-c')")
    assert w.health({"sae-a": 5, "sae-c": 0}, 1)[0] == "unhealthy"
    w.success("sae-c")
    assert w.health({"sae-a": 5, "sae-c": 0}, 1) == ("ok", "")
    assert counted == ["connection"]


def test_slave_outage_is_unhealthy_at_once_and_only_degraded_when_qkd_is_optional() -> None:
    w, _ = watch(master=False)
    w.failure("sae-a", KMETimeoutError("no answer within 2 s"))
    assert w.health(None, 1) == ("unhealthy", f"KME {URL} unreachable for 0 s (KMETimeoutError: no answer within "
                                              "2 s); every handshake needs it")
    optional, _ = watch(master=False, qkd="optional")
    optional.failure("sae-a", KMEConnectionError("down"))
    assert optional.health(None, 1)[0] == "degraded"
    disabled, _ = watch(master=False, qkd="disabled")
    disabled.failure("sae-a", KMEConnectionError("down"))
    assert disabled.health(None, 1) == ("ok", "")


def test_a_refused_peer_sae_is_unhealthy_until_served_and_other_failures_are_not_refusals() -> None:
    w, counted = watch(master=True)
    w.failure("sae-c", KMEBadRequestError("slave SAE ID 'sae-c' is not known", status=400))
    w.failure("sae-c", KMEBadRequestError("slave SAE ID 'sae-c' is not known", status=400))
    state, detail = w.health({"sae-a": 9, "sae-c": 0}, 1)
    assert state == "unhealthy"
    assert detail == "the KME refuses peer SAE 'sae-c' (peers[1].sae_id, peer 'client-c'): slave SAE ID 'sae-c' " \
                     "is not known"
    w.failure("sae-a", KMEKeyNotFoundError("key gone", status=400))  # a key problem, not a refused peer
    assert "sae-a" not in w.health({"sae-a": 9, "sae-c": 0}, 1)[1]
    w.success("sae-c")
    assert w.health({"sae-a": 9, "sae-c": 1}, 1) == ("ok", "")
    assert counted == ["bad_request", "bad_request", "key_not_found"]


def test_the_slave_probe_treats_a_refused_status_question_as_reachable() -> None:
    w, counted = watch(master=False)
    w.failure("sae-a", KMEConnectionError("down"))
    w.failure("sae-a", KMEUnauthorizedError("not your pair", status=401), probe=True)
    assert w.health(None, 1) == ("ok", "") and counted == ["connection"]


def test_health_body_states() -> None:
    h = Health()
    assert h.report() == (True, "ok\n")
    h.set("kme", "degraded", "pool covers")
    assert h.report() == (True, "degraded\nkme: pool covers\n")
    h.set("disk", False, "full")
    assert h.report() == (False, "unhealthy\ndisk: full\nkme: pool covers\n")
    h.set("disk", True)
    h.set("kme", "ok")
    assert h.report() == (True, "ok\n")
    h.draining = True
    assert h.report() == (False, "draining\n")


def test_a_refusal_is_said_before_another_thread_can_find_it_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's first refill and the server's probe race; whichever records the refusal says it first."""
    import threading

    from hybridkex.tunnel import kmewatch

    w, _ = watch(master=True)
    said: list[str] = []
    logging_now, go_on = threading.Event(), threading.Event()

    def slow_log(level: int, event: str, msg: str, **fields: object) -> None:
        logging_now.set()
        go_on.wait(5)  # the other thread runs meanwhile
        said.append(event)

    monkeypatch.setattr(kmewatch, "log_event", slow_log)
    first = threading.Thread(target=w.failure, args=("sae-a", KMEBadRequestError("unknown SAE", status=400)))
    first.start()
    assert logging_now.wait(5)
    second = threading.Thread(target=lambda: (w.failure("sae-a", KMEBadRequestError("unknown SAE", status=400)),
                                              said.append("probe done")))
    second.start()
    second.join(0.3)
    go_on.set()
    first.join(5)
    second.join(5)
    assert said == ["kme_peer_refused", "probe done"]


def test_a_refusal_met_before_the_peers_are_configured_is_said_when_they_are(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's key pool starts filling before the watch knows its peers (seen in CI): the
    refusal it met is said, once, when configure() names the peer, with the configured KME URL."""
    from hybridkex.tunnel import kmewatch

    said: list[tuple[str, str, dict[str, object]]] = []
    monkeypatch.setattr(kmewatch, "log_event", lambda level, event, msg, **fields: said.append((event, msg, fields)))
    w = KMEWatch(lambda kind: None, url="", master=True)
    w.failure("sae-c", KMEBadRequestError("slave SAE ID 'sae-c' is not known", status=400))
    w.failure("sae-c", KMEBadRequestError("slave SAE ID 'sae-c' is not known", status=400))
    assert said == [] and w.refused("sae-c")
    w.configure(PEERS, "required", url=URL)
    assert [(e, f) for e, _, f in said] == [
        ("kme_peer_refused", {"peer": "client-c", "sae_id": "sae-c", "field": "peers[1].sae_id"})]
    assert said[0][1].startswith(f"the KME at {URL} refuses QKD keys for peer 'client-c' (SAE 'sae-c')")
    w.failure("sae-c", KMEBadRequestError("still not known", status=400))
    w.configure(PEERS, "required", url=URL)  # a reload: nothing new to say
    assert len(said) == 1
    assert w.health({"sae-a": 9, "sae-c": 0}, 1)[0] == "unhealthy"
