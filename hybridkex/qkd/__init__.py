"""QKD key delivery: the key-source interface, an in-memory link, and (ETSI GS QKD 014) KME access.

The errors a key source raises are importable from here too (docs/qkd.md); the ones that are not
KME-specific are the same classes as in :mod:`hybridkex.exceptions`.
"""

import importlib
from typing import TYPE_CHECKING, Any

from ..exceptions import (
    ConfigurationError,
    InvalidKeyMaterial,
    KeyReuseError,
    KeySourceError,
    KeyUnavailableError,
    KMEError,
    QKDKeyUnknownError,
)
from .base import AsyncKeySource, KeySource, KeySourceStatus, QKDKey
from .errors import (
    KMEBadRequestError,
    KMEConnectionError,
    KMEKeyNotFoundError,
    KMEResponseError,
    KMETimeoutError,
    KMEUnauthorizedError,
    KMEUnavailableError,
)
from .memory import MemoryKeyLink, MemoryKeySource

if TYPE_CHECKING:
    from .aclient import AsyncETSI014Client
    from .client import ETSI014Client, SecureSiteWarning, certificate_common_name
    from .etsi014 import KMEStatus
    from .kme import KMEPairSettings, SimulatedKMEPair
    from .pki import DemoPKI, create_demo_pki
    from .pool import AsyncKeyPool, KeyPool, PoolStats, ThreadedAsyncKeySource

# The ETSI 014 client, pool and simulator pull in aiohttp and X.509 code; load them on first use so
# that importing the key-source interface (and its errors) stays cheap.
_LAZY = {
    "AsyncETSI014Client": "aclient",
    "ETSI014Client": "client",
    "SecureSiteWarning": "client",
    "certificate_common_name": "client",
    "KMEStatus": "etsi014",
    "KMEPairSettings": "kme",
    "SimulatedKMEPair": "kme",
    "DemoPKI": "pki",
    "create_demo_pki": "pki",
    "AsyncKeyPool": "pool",
    "KeyPool": "pool",
    "PoolStats": "pool",
    "ThreadedAsyncKeySource": "pool",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "AsyncETSI014Client",
    "AsyncKeyPool",
    "AsyncKeySource",
    "ConfigurationError",
    "DemoPKI",
    "ETSI014Client",
    "InvalidKeyMaterial",
    "KMEBadRequestError",
    "KMEConnectionError",
    "KMEError",
    "KMEKeyNotFoundError",
    "KMEPairSettings",
    "KMEResponseError",
    "KMEStatus",
    "KMETimeoutError",
    "KMEUnauthorizedError",
    "KMEUnavailableError",
    "KeyPool",
    "KeyReuseError",
    "KeySource",
    "KeySourceError",
    "KeySourceStatus",
    "KeyUnavailableError",
    "MemoryKeyLink",
    "MemoryKeySource",
    "PoolStats",
    "QKDKey",
    "QKDKeyUnknownError",
    "SecureSiteWarning",
    "SimulatedKMEPair",
    "ThreadedAsyncKeySource",
    "certificate_common_name",
    "create_demo_pki",
]
