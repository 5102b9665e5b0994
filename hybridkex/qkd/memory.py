"""An in-process QKD link for tests and examples: two key sources that share keys, no HTTP.

It follows the ETSI GS QKD 014 semantics the real client gets from a KME: keys taken by the master
are removed from the master's pool, each can be fetched exactly once by the named slave, and any
other caller is refused.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Sequence

from ..exceptions import KeyReuseError, KeyUnavailableError, KMEError, QKDKeyUnknownError
from .base import KeySourceStatus, QKDKey

__all__ = ["MemoryKeyLink", "MemoryKeySource"]


class MemoryKeyLink:
    """A simulated QKD link between two KMEs with a bounded stock of key material."""

    def __init__(
        self,
        kme_ids: tuple[str, str] = ("kme-a", "kme-b"),
        *,
        max_keys: int = 100_000,
        max_key_per_request: int = 128,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._kme_ids = kme_ids
        self._lock = threading.Lock()
        self._max_keys = max_keys
        self._issued_keys = 0
        self.max_key_per_request = max_key_per_request
        self._randbytes = randbytes
        # key_id -> (master SAE, slave SAE, key); present until the slave fetched it.
        self._pending: dict[str, tuple[str, str, bytes]] = {}
        self._spent: set[str] = set()

    def source(self, sae_id: str, kme_index: int) -> MemoryKeySource:
        """A key source for ``sae_id`` attached to KME number ``kme_index`` (0 or 1)."""
        return MemoryKeySource(self, sae_id, self._kme_ids[kme_index], self._kme_ids[1 - kme_index])

    def _take(self, master: str, slave: str, number: int, size_bits: int) -> list[QKDKey]:
        if number < 1 or number > self.max_key_per_request:
            raise KMEError(f"number must be 1..{self.max_key_per_request}, got {number}", status=400)
        if size_bits <= 0 or size_bits % 8:
            raise KMEError("size shall be a multiple of 8", status=400)
        with self._lock:
            if self._issued_keys + number > self._max_keys:
                raise KeyUnavailableError("simulated QKD link has no key material left")
            self._issued_keys += number
            keys = [QKDKey(str(uuid.uuid4()), self._randbytes(size_bits // 8)) for _ in range(number)]
            for k in keys:
                self._pending[k.key_id] = (master, slave, k.key)
            return keys

    def _fetch(self, caller: str, master: str, key_ids: Sequence[str]) -> list[QKDKey]:
        with self._lock:
            out = []
            for key_id in key_ids:
                if key_id in self._spent:
                    raise KeyReuseError(f"QKD key {key_id} was already delivered once")
                entry = self._pending.get(key_id)
                if entry is None:
                    raise QKDKeyUnknownError("one or more keys specified are not found on KME", key_ids=(key_id,))
                if entry[0] != master or entry[1] != caller:
                    raise KMEError("Unauthorized.", status=401)
            for key_id in key_ids:
                _, _, key = self._pending.pop(key_id)
                self._spent.add(key_id)
                out.append(QKDKey(key_id, key))
            return out

    def forget_pending(self) -> int:
        """Forget every key not yet fetched by its slave, as a KME restarted without persistence does.

        Returns how many were forgotten; fetching one of them then fails with
        :class:`~hybridkex.exceptions.QKDKeyUnknownError` ("not found on KME").
        """
        with self._lock:
            forgotten = len(self._pending)
            self._pending.clear()
            return forgotten

    def stock(self) -> int:
        with self._lock:
            return self._max_keys - self._issued_keys


class MemoryKeySource:
    """One SAE's view of a :class:`MemoryKeyLink`; implements :class:`~hybridkex.qkd.KeySource`."""

    def __init__(self, link: MemoryKeyLink, sae_id: str, kme_id: str, peer_kme_id: str) -> None:
        self._link = link
        self._sae_id = sae_id
        self._kme_id = kme_id
        self._peer_kme_id = peer_kme_id

    def __repr__(self) -> str:
        return f"MemoryKeySource(sae_id={self._sae_id!r}, kme_id={self._kme_id!r})"

    @property
    def sae_id(self) -> str:
        return self._sae_id

    @property
    def kme_id(self) -> str:
        return self._kme_id

    def get_keys(self, slave_sae_id: str, number: int = 1, size_bits: int = 256) -> list[QKDKey]:
        return self._link._take(self._sae_id, slave_sae_id, number, size_bits)

    def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QKDKey]:
        return self._link._fetch(self._sae_id, master_sae_id, key_ids)

    def status(self, slave_sae_id: str) -> KeySourceStatus:
        stock = self._link.stock()
        return KeySourceStatus(
            source_kme_id=self._kme_id,
            target_kme_id=self._peer_kme_id,
            master_sae_id=self._sae_id,
            slave_sae_id=slave_sae_id,
            key_size=256,
            stored_key_count=stock,
            max_key_count=self._link._max_keys,
            max_key_per_request=self._link.max_key_per_request,
            max_key_size=8192,
            min_key_size=8,
        )
