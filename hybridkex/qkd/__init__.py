"""QKD key delivery: the key-source interface, an in-memory link, and (ETSI GS QKD 014) KME access."""

from .base import AsyncKeySource, KeySource, KeySourceStatus, QKDKey
from .memory import MemoryKeyLink, MemoryKeySource

__all__ = [
    "AsyncKeySource",
    "KeySource",
    "KeySourceStatus",
    "MemoryKeyLink",
    "MemoryKeySource",
    "QKDKey",
]
