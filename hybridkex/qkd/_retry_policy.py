"""The clients' retry policy as a :class:`urllib3.util.Retry` (the plan that follows it: :mod:`._retry`).

A module of its own so that importing the KME (which never retries) does not import urllib3.
"""

from __future__ import annotations

import random

import urllib3
from urllib3.exceptions import InvalidHeader
from urllib3.util import Retry

__all__ = ["RetryPolicy"]


class RetryPolicy(Retry):
    """The documented retry policy as a :class:`urllib3.util.Retry`; build it with :meth:`for_kme`.

    Two waits differ from urllib3's defaults, on purpose (they are what the clients document): the
    first retry waits ``backoff`` (urllib3 waits 0), the jitter scales the wait by 0.5-1.0 within
    the cap (urllib3 adds it on top), and ``Retry-After`` is capped at ``max_backoff`` (a KME
    asking for minutes must not stall a handshake that long).
    """

    @classmethod
    def for_kme(cls, retries: int, backoff: float, max_backoff: float) -> RetryPolicy:
        """``retries`` extra attempts in all, after connect failures and 503s only; never after a read."""
        return cls(
            total=retries, connect=None, status=None,
            read=False,  # a failure after the request went out is raised, never retried: keys may be gone
            other=0, redirect=0, raise_on_redirect=True,
            allowed_methods=None,  # a 503 or a refused connection means nothing was served, POST included
            status_forcelist=frozenset({503}), raise_on_status=False, respect_retry_after_header=True,
            backoff_factor=backoff, backoff_max=max_backoff,
        )

    def get_backoff_time(self) -> float:
        made = max(len(self.history) - 1, 0)  # retries before the one about to happen
        base = min(self.backoff_max, self.backoff_factor * (2.0**made))
        return float(base * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not a secret

    def get_retry_after(self, response: urllib3.BaseHTTPResponse) -> float | None:
        try:
            after = super().get_retry_after(response)
        except InvalidHeader:  # neither seconds nor an HTTP date: our own backoff
            return None
        return None if after is None else min(after, self.backoff_max)
