"""Typed errors of the ETSI GS QKD 014 client: one class per way a KME request can fail.

They all extend classes of the one exception tree in :mod:`hybridkex.exceptions` (root
:class:`~hybridkex.exceptions.HybridKEXError`), so ``except KMEError`` or ``except KeySourceError``
still catches every one of them.  Messages name the KME URL, the SAE IDs and key IDs involved, and
never any key material.
"""

from __future__ import annotations

from ..exceptions import HandshakeTimeout, KeyUnavailableError, KMEError, QKDKeyUnknownError

__all__ = [
    "KMEBadRequestError",
    "KMEConnectionError",
    "KMEKeyNotFoundError",
    "KMEResponseError",
    "KMETimeoutError",
    "KMEUnauthorizedError",
    "KMEUnavailableError",
]


class KMEConnectionError(KMEError):
    """The KME could not be reached, or its TLS certificate did not verify (after the retries)."""


class KMETimeoutError(KMEError, HandshakeTimeout):
    """The KME accepted the request but did not answer within the timeout.

    Not retried: the KME may have served the request already, and the keys it removed from its
    pool cannot be asked for again.
    """


class KMEResponseError(KMEError):
    """The KME's answer violates ETSI GS QKD 014 (bad JSON, UUID, base64, size, count, duplicates...)."""


class KMEBadRequestError(KMEError):
    """The KME refused the request as malformed or unsupported (HTTP 400); the message is the KME's."""


class KMEKeyNotFoundError(KMEBadRequestError, QKDKeyUnknownError):
    """A requested key ID is unknown to the KME, or was already delivered (HTTP 400, spec wording)."""


class KMEUnauthorizedError(KMEError):
    """The KME did not accept this SAE for the request (HTTP 401): wrong certificate or wrong peer SAE."""


class KMEUnavailableError(KMEError, KeyUnavailableError):
    """The KME answered 503 on every attempt (typically: not enough key material on the QKD link yet)."""
