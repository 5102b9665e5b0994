"""The one retry plan of both ETSI 014 clients: its decisions, and that both front ends follow it alike.

First the plan alone (scripted results in, decisions out), then the blocking and the asyncio client
against the same scripted KME (real HTTPS with mutual TLS): the same requests, the same waits, the
same outcome.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3
from aiohttp import web
from qkdhelpers import ThreadedServer, sae_args
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from hybridkex.qkd import (
    AsyncETSI014Client,
    ETSI014Client,
    KMEBadRequestError,
    KMEConnectionError,
    KMEKeyNotFoundError,
    KMEResponseError,
    KMEUnauthorizedError,
    KMEUnavailableError,
    _retry_policy,
)
from hybridkex.qkd._retry import Answer, ConnectFailed, RetryPlan, Wait
from hybridkex.qkd._retry_policy import RetryPolicy
from hybridkex.qkd.etsi014 import MSG_KEYS_NOT_FOUND
from hybridkex.qkd.kme import server_ssl_context
from hybridkex.qkd.pki import DemoPKI

JSON = "application/json"


def answer(status: int, body: Any = None, retry_after: str | None = None, content_type: str = JSON) -> Answer:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    return Answer(status, content_type, json.dumps(body).encode() if body is not None else b"", headers)


def plan(retries: int = 3) -> RetryPlan:
    return RetryPlan("KME test POST /x", "sae-a", RetryPolicy.for_kme(retries, backoff=0.1, max_backoff=0.5))


@pytest.fixture
def no_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The jitter factor at its top (1.0), so that delays are exact."""
    monkeypatch.setattr(_retry_policy.random, "uniform", lambda low, high: high)


# -- the plan alone --------------------------------------------------------------------------------


def test_connection_failures_and_503s_wait_then_the_answer_is_returned(no_jitter: None) -> None:
    p = plan()
    assert p.next(ConnectFailed("refused")) == Wait(0.1)
    assert p.next(answer(503, {"message": "busy"})) == Wait(0.2)  # backoff doubles
    assert p.next(answer(503, {"message": "busy"}, retry_after="0")) == Wait(0.0)  # the KME's Retry-After
    assert p.next(answer(200, {"keys": []})) == {"keys": []}


def test_retry_after_is_capped_and_backoff_is_capped(no_jitter: None) -> None:
    p = plan(retries=6)
    assert p.next(answer(503, None, retry_after="30")) == Wait(0.5)
    assert [p.next(ConnectFailed("x")) for _ in range(4)] == [Wait(0.2), Wait(0.4), Wait(0.5), Wait(0.5)]


def test_jitter_stays_within_half_and_full_backoff() -> None:
    for _ in range(50):
        p = plan()
        p.next(ConnectFailed("x"))
        p.next(ConnectFailed("x"))
        delay = p.next(ConnectFailed("x"))
        assert isinstance(delay, Wait) and 0.2 <= delay.seconds <= 0.4


def test_no_attempt_left_raises_the_last_failure() -> None:
    p = plan(retries=2)
    for _ in range(2):
        assert isinstance(p.next(ConnectFailed("refused")), Wait)
    with pytest.raises(KMEConnectionError, match=r"cannot connect after 3 attempt\(s\) \(refused\)"):
        p.next(ConnectFailed("refused"))
    p = plan(retries=1)
    assert isinstance(p.next(answer(503, {"message": "Error on server side."})), Wait)
    with pytest.raises(KMEUnavailableError, match=r"after 2 attempt\(s\): Error on server side\.") as info:
        p.next(answer(503, {"message": "Error on server side."}))
    assert info.value.status == 503


def test_retry_after_as_an_http_date_is_honoured_and_a_malformed_one_means_our_backoff(no_jitter: None) -> None:
    p = plan()
    in_two_seconds = email.utils.formatdate(time.time() + 2, usegmt=True)
    assert p.next(answer(503, None, retry_after=in_two_seconds)) == Wait(0.5)  # capped at max_backoff
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert p.next(answer(503, None, retry_after=past)) == Wait(0.0)
    assert p.next(answer(503, None, retry_after="soon")) == Wait(0.4)  # third retry: 0.1 * 2**2


def test_the_policy_never_retries_after_the_request_was_sent() -> None:
    policy = RetryPolicy.for_kme(5, 0.1, 0.5)
    for error in (ProtocolError("connection lost"), ReadTimeoutError(None, "/x", "timed out")):  # type: ignore[arg-type]
        with pytest.raises(type(error)):
            policy.increment("POST", "/x", error=error)
    assert policy.is_retry("POST", 503) and not policy.is_retry("POST", 500)


@pytest.mark.parametrize(("result", "error"), [
    (answer(400, {"message": MSG_KEYS_NOT_FOUND}), KMEKeyNotFoundError),
    (answer(400, {"message": "bad"}), KMEBadRequestError),
    (answer(401, {"message": "Unauthorized."}), KMEUnauthorizedError),
    (answer(500, {"message": "oops"}), KMEResponseError),
    (answer(200, {"keys": []}, content_type="text/plain"), KMEResponseError),
    (Answer(200, JSON, b"{not json", {}), KMEResponseError),
])
def test_answers_that_are_not_503_are_never_retried(result: Answer, error: type[Exception]) -> None:
    p = plan()
    with pytest.raises(error):
        p.next(result)
    assert p.attempt == 0


# -- both front ends against one scripted KME ------------------------------------------------------


def keys(n: int = 1) -> dict[str, Any]:
    return {"keys": [{"key_ID": str(uuid.uuid4()), "key": base64.b64encode(bytes(32)).decode()} for _ in range(n)]}


class ScriptedKME:
    """Answers the requests in order with ``script`` (status, Retry-After or None); then 200 with keys."""

    def __init__(self) -> None:
        self.script: list[tuple[int, str | None]] = []
        self.requests = 0

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            await request.read()
            self.requests += 1
            if not self.script:
                return web.json_response(keys())
            status, retry_after = self.script.pop(0)
            message = MSG_KEYS_NOT_FOUND if status == 400 else "Error on server side."
            headers = {"Retry-After": retry_after} if retry_after is not None else None
            return web.json_response({"message": message}, status=status, headers=headers)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@pytest.fixture(scope="module")
def scripted(pki: DemoPKI) -> Iterator[tuple[ScriptedKME, ThreadedServer]]:
    kme = ScriptedKME()
    with ThreadedServer(kme.app, server_ssl_context(pki.cert("kme-a"), pki.key("kme-a"), pki.ca_cert)) as server:
        yield kme, server


@pytest.fixture
def decisions(monkeypatch: pytest.MonkeyPatch, no_jitter: None) -> list[Any]:
    """Every decision the retry plan makes, in order: a Wait, ``"done"`` or the error class raised."""
    made: list[Any] = []
    real_next = RetryPlan.next

    def recording(self: RetryPlan, result: Answer | ConnectFailed) -> Any:
        try:
            step = real_next(self, result)
        except Exception as exc:
            made.append(type(exc))
            raise
        made.append(step if isinstance(step, Wait) else "done")
        return step

    monkeypatch.setattr(RetryPlan, "next", recording)
    return made


def run_sync(url: str, pki: DemoPKI) -> Any:
    with ETSI014Client(url, **sae_args(pki, "sae-a"), retries=3, backoff=0.01, max_backoff=0.05) as c:
        return len(c.get_keys("sae-b"))


def run_async(url: str, pki: DemoPKI) -> Any:
    async def main() -> int:
        async with AsyncETSI014Client(url, **sae_args(pki, "sae-a"), retries=3, backoff=0.01,
                                      max_backoff=0.05) as c:
            return len(await c.get_keys("sae-b"))

    return asyncio.run(main())


SCRIPTS = {
    "503s then keys": [(503, "0"), (503, None), (503, "9")],
    "503 every time": [(503, None)] * 4,
    "503 then not found": [(503, "0"), (400, None)],
    "503 then unauthorized": [(503, None), (401, None)],
}


@pytest.mark.parametrize("script", SCRIPTS.values(), ids=SCRIPTS.keys())
def test_sync_and_async_clients_make_the_same_retry_decisions(
    scripted: tuple[ScriptedKME, ThreadedServer], decisions: list[Any], pki: DemoPKI,
    script: list[tuple[int, str | None]],
) -> None:
    kme, server = scripted
    seen: dict[str, tuple[Any, int, list[Any]]] = {}
    front_ends: dict[str, Callable[[str, DemoPKI], Any]] = {"sync": run_sync, "async": run_async}
    for name, run in front_ends.items():
        kme.script, kme.requests = list(script), 0
        decisions.clear()
        try:
            outcome: Any = run(server.url, pki)
        except Exception as exc:
            outcome = type(exc)
        seen[name] = (outcome, kme.requests, list(decisions))
    assert seen["sync"] == seen["async"]
    outcome, requests, made = seen["sync"]
    assert requests == len(made)  # one decision per answer, none without a request
    if script == SCRIPTS["503s then keys"]:
        # Retry-After 0, then our backoff (0.01 * 2), then Retry-After 9 capped at max_backoff.
        assert made == [Wait(0.0), Wait(0.02), Wait(0.05), "done"] and outcome == 1
    elif script == SCRIPTS["503 every time"]:
        assert outcome is KMEUnavailableError and requests == 4
    else:
        assert requests == 2 and outcome in (KMEKeyNotFoundError, KMEUnauthorizedError)


def test_the_policy_is_a_urllib3_retry_that_urllib3_itself_follows(
    scripted: tuple[ScriptedKME, ThreadedServer], pki: DemoPKI, no_jitter: None,
) -> None:
    """The clients' policy object, handed to a urllib3 pool, makes urllib3 retry the 503s alike."""
    kme, server = scripted
    kme.script, kme.requests = [(503, "0"), (503, None)], 0
    with ETSI014Client(server.url, **sae_args(pki, "sae-a"), retries=3, backoff=0.01, max_backoff=0.05) as c:
        policy = c.retry_policy
    assert isinstance(policy, urllib3.Retry)
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.cert("sae-a")), str(pki.key("sae-a")))
    with urllib3.HTTPSConnectionPool("127.0.0.1", server.port, ssl_context=ctx) as pool:
        resp = pool.urlopen("POST", "/api/v1/keys/sae-b/enc_keys", body=b"{}", retries=policy)
    assert resp.status == 200 and kme.requests == 3
