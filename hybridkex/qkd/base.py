"""The key-source interface the handshake drivers use to obtain QKD keys.

The sans-IO handshake never talks to a KME.  When it needs QKD keys it emits an event; the driver
calls a :class:`KeySource` (blocking) or :class:`AsyncKeySource` (asyncio) and feeds the answer back.
Roles follow ETSI GS QKD 014: the *master* SAE asks its KME for fresh keys for a named slave SAE and
receives key IDs with the keys; the *slave* SAE later fetches the same keys from its own KME by ID.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..exceptions import InvalidKeyMaterial

__all__ = ["AsyncKeySource", "KeySource", "KeySourceStatus", "QKDKey"]


#: 8-4-4-4-12 hex digits in either case: exactly the strings whose UUID is their lower-case form.
_CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True, slots=True)
class QKDKey:
    """One QKD key and its ETSI key ID. The key bytes never appear in ``repr`` or ``str``."""

    key_id: str
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        # The usual case is settled by the pattern, without building a UUID object.
        if not isinstance(self.key_id, str) or _CANONICAL_UUID.fullmatch(self.key_id) is None:
            self._check_key_id()
        if not isinstance(self.key, bytes) or not self.key:
            raise InvalidKeyMaterial("QKD key must be non-empty bytes")

    def _check_key_id(self) -> None:
        try:
            canonical = str(uuid.UUID(self.key_id))
        except (ValueError, TypeError, AttributeError) as exc:
            raise InvalidKeyMaterial(f"QKD key ID {self.key_id!r} is not a UUID") from exc
        if canonical != self.key_id.lower():
            raise InvalidKeyMaterial(f"QKD key ID {self.key_id!r} is not in canonical UUID form")

    def __repr__(self) -> str:
        return f"QKDKey(key_id={self.key_id!r}, size_bits={len(self.key) * 8}, key=<redacted>)"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class KeySourceStatus:
    """What a key source reports about its link to one peer SAE (ETSI 014 Status, abridged)."""

    source_kme_id: str
    target_kme_id: str
    master_sae_id: str
    slave_sae_id: str
    key_size: int
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int
    min_key_size: int


@runtime_checkable
class KeySource(Protocol):
    """Blocking access to QKD keys for one local SAE."""

    @property
    def sae_id(self) -> str:
        """This SAE's own ID."""
        ...

    @property
    def kme_id(self) -> str:
        """The ID of the KME that serves this SAE (bound into the handshake transcript)."""
        ...

    def get_keys(self, slave_sae_id: str, number: int = 1, size_bits: int = 256) -> list[QKDKey]:
        """Master role: take ``number`` fresh keys shared with ``slave_sae_id`` (ETSI 'Get key')."""
        ...

    def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QKDKey]:
        """Slave role: fetch the keys ``master_sae_id`` was given (ETSI 'Get key with key IDs')."""
        ...

    def status(self, slave_sae_id: str) -> KeySourceStatus:
        """Report the key stock for ``slave_sae_id`` (ETSI 'Get status')."""
        ...


@runtime_checkable
class AsyncKeySource(Protocol):
    """asyncio access to QKD keys for one local SAE; same semantics as :class:`KeySource`."""

    @property
    def sae_id(self) -> str: ...

    @property
    def kme_id(self) -> str: ...

    async def get_keys(self, slave_sae_id: str, number: int = 1, size_bits: int = 256) -> list[QKDKey]: ...

    async def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QKDKey]: ...

    async def status(self, slave_sae_id: str) -> KeySourceStatus: ...
