"""Authentication after bootstrap: keys recycled from earlier QKD-mixed handshake output."""

from .store import AuthKey, AuthKeyStore, PairSummary, SQLiteAuthKeyStore, StoreError

__all__ = ["AuthKey", "AuthKeyStore", "PairSummary", "SQLiteAuthKeyStore", "StoreError"]
