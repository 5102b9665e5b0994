"""A blocking view of an asyncio key source, for the key manager's worker threads."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from ..qkd.base import AsyncKeySource, KeySourceStatus, QKDKey

__all__ = ["BlockingBridge"]

T = TypeVar("T")


class BlockingBridge:
    """A blocking :class:`~hybridkex.qkd.KeySource` view of an :class:`~hybridkex.qkd.AsyncKeySource`,
    for the key manager's worker threads: each call runs the coroutine on ``loop`` and waits."""

    def __init__(self, source: AsyncKeySource, loop: asyncio.AbstractEventLoop) -> None:
        self._source = source
        self._loop = loop

    def __repr__(self) -> str:
        return f"<blocking view of {self._source!r}>"

    @property
    def sae_id(self) -> str:
        return str(self._source.sae_id)

    @property
    def kme_id(self) -> str:
        return str(self._source.kme_id)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            coro.close()
            raise RuntimeError("the blocking view of an asyncio key source was called on its own event loop")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def get_keys(self, slave_sae_id: str, number: int = 1, size_bits: int = 256) -> list[QKDKey]:
        return list(self._run(self._source.get_keys(slave_sae_id, number, size_bits)))

    def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QKDKey]:
        return list(self._run(self._source.get_keys_by_id(master_sae_id, key_ids)))

    def status(self, slave_sae_id: str) -> KeySourceStatus:
        result: KeySourceStatus = self._run(self._source.status(slave_sae_id))
        return result

    def discard_stale(self, slave_sae_id: str, key_ids: Sequence[str] = (), *, reported_by_peer: bool = True) -> int:
        discard = getattr(self._source, "discard_stale", None)  # a plain method on AsyncKeyPool
        return int(discard(slave_sae_id, key_ids, reported_by_peer=reported_by_peer)) if callable(discard) else 0
