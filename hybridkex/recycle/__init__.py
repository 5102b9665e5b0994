"""Authentication after bootstrap: keys recycled from earlier QKD-mixed handshake output.

See docs/recycle.md and docs/spec.md ("Recycled authentication").
"""

from .authenticator import BootstrapPolicy, RecycledAuthenticator, RecycledKey, RecyclePolicy
from .store import (
    AuthKey,
    AuthKeyStore,
    BootstrapState,
    PairSummary,
    SQLiteAuthKeyStore,
    StoreError,
    WriteBehindStore,
)

__all__ = [
    "AuthKey",
    "AuthKeyStore",
    "BootstrapPolicy",
    "BootstrapState",
    "PairSummary",
    "RecyclePolicy",
    "RecycledAuthenticator",
    "RecycledKey",
    "SQLiteAuthKeyStore",
    "StoreError",
    "WriteBehindStore",
]
