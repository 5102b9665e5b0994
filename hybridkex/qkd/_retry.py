"""What a KME answer means and whether to try again: the one retry policy of both clients (no I/O).

Only failures that cannot have consumed keys are retried: a connection that could not be made
(:class:`ConnectFailed`: nothing was sent) and a 503 answer, whose ``Retry-After`` (seconds or an
HTTP date) is honoured up to ``max_backoff``; otherwise the delay doubles from ``backoff``, with
jitter, up to ``max_backoff``.  Everything after a request was sent (a timeout, a lost connection)
is raised by the front ends and never reaches the plan: the KME may have served it.

The policy is one :class:`~._retry_policy.RetryPolicy`, a :class:`urllib3.util.Retry` (urllib3 counts the attempts,
tells connect failures from the rest and parses ``Retry-After``), made once per client; each request
follows it with a :class:`RetryPlan`.  A front end runs one request as::

    plan = client._retry_plan(where)
    while isinstance(step := plan.next(attempt()), Wait):
        sleep(step.seconds)
    return step  # the answer's JSON
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from ..exceptions import HybridKEXError
from .errors import (
    KMEBadRequestError,
    KMEConnectionError,
    KMEKeyNotFoundError,
    KMEResponseError,
    KMEUnauthorizedError,
    KMEUnavailableError,
)
from .etsi014 import MSG_KEYS_NOT_FOUND, STATUS_CODES, loads_strict, parse_error_body

if TYPE_CHECKING:
    from ._retry_policy import RetryPolicy

log = logging.getLogger("hybridkex.qkd.client")


class ConnectFailed(HybridKEXError):
    """Internal: a connection could not be established (nothing was sent, so a retry is safe)."""


class StaleConnection(HybridKEXError):
    """Internal: a reused keep-alive connection was dead before any answer (a retry is safe)."""


class Answer(NamedTuple):
    """An HTTP answer as the transport read it (size already bounded)."""

    status: int
    content_type: str
    body: bytes
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep this long, then make the next attempt."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Unavailable:
    """A 503 answer: try again (when, :class:`RetryPolicy` says from its ``Retry-After``)."""

    message: str


def printable(text: str, limit: int = 200) -> str:
    """A KME message made fit to show: one line, short, no control characters."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def interpret(where: str, answer: Answer, sae_id: str) -> Any:
    """Turn an HTTP answer into JSON, an :class:`Unavailable`, or the typed error it stands for."""
    status = answer.status
    if status not in STATUS_CODES:
        raise KMEResponseError(f"{where}: HTTP {status}, a status ETSI GS QKD 014 does not define", status=status)
    obj: Any = None
    parse_error: str | None = None
    try:
        obj = loads_strict(answer.body)
    except ValueError as exc:
        parse_error = str(exc)
    if status == 200:
        content_type = answer.content_type
        if content_type.split(";", 1)[0].strip().lower() != "application/json":
            shown_type = printable(content_type, 60) or "untyped"
            raise KMEResponseError(f"{where}: answer is {shown_type}, not application/json", status=200)
        if parse_error is not None:
            raise KMEResponseError(f"{where}: answer is not valid JSON ({printable(parse_error, 80)})", status=200)
        return obj
    message, _details = parse_error_body(obj)
    shown = printable(message) if message else "(no error message)"
    if status == 400:
        if message == MSG_KEYS_NOT_FOUND:
            raise KMEKeyNotFoundError(f"{where}: {MSG_KEYS_NOT_FOUND} (unknown, or already delivered)", status=400)
        raise KMEBadRequestError(f"{where}: KME refused the request (400): {shown}", status=400)
    if status == 401:
        raise KMEUnauthorizedError(
            f"{where}: KME refused SAE {sae_id!r} (401): check that the KME serves this SAE "
            "(certificate CN) and that the peer SAE ID is the right one",
            status=401,
        )
    return Unavailable(shown)


class RetryPlan:
    """The attempts of one request: :meth:`next` takes each attempt's result and says what follows."""

    __slots__ = ("retry", "sae_id", "where")

    def __init__(self, where: str, sae_id: str, policy: RetryPolicy) -> None:
        self.where = where
        self.sae_id = sae_id
        self.retry = policy

    @property
    def attempt(self) -> int:
        """How many retries were decided so far."""
        return len(self.retry.history)

    def next(self, result: Answer | ConnectFailed) -> Any:
        """A :class:`Wait` before the next attempt, or the answer's JSON.

        Raises:
            KMEError: the typed error the answer stands for (never retried), or, when no attempt is
                left, :class:`KMEConnectionError` / :class:`KMEUnavailableError`.
        """
        # urllib3 is imported where a request failed, and by the clients (._retry_policy), never by a
        # KME process: its start-up is what a client waits for when the KME restarts.
        import urllib3  # noqa: PLC0415
        from urllib3.exceptions import MaxRetryError, NewConnectionError  # noqa: PLC0415

        attempts = self.attempt + 1
        response: urllib3.HTTPResponse | None = None
        if isinstance(result, ConnectFailed):
            error: Exception | None = NewConnectionError(None, str(result))  # type: ignore[arg-type]
        else:
            outcome = interpret(self.where, result, self.sae_id)
            if not isinstance(outcome, Unavailable):
                return outcome
            error = None
            # Built only on this path (a 503): the answers that end a request cost nothing here.
            response = urllib3.HTTPResponse(b"", headers=dict(result.headers), status=result.status,
                                            preload_content=False)
        try:
            self.retry = self.retry.increment(url=self.where, response=response, error=error)
        except MaxRetryError:
            if isinstance(result, ConnectFailed):
                raise KMEConnectionError(
                    f"{self.where}: cannot connect after {attempts} attempt(s) ({result}); is the KME running?"
                ) from None
            raise KMEUnavailableError(
                f"{self.where}: KME unavailable (503) after {attempts} attempt(s): {outcome.message}",
                status=503,
            ) from None
        delay = self.retry.get_retry_after(response) if response is not None else None
        if delay is None:
            delay = self.retry.get_backoff_time()
        log.info("%s: retrying in %.2f s (attempt %d of %d)", self.where, delay, attempts + 1,
                 attempts + 1 + (self.retry.total or 0))
        return Wait(delay)
