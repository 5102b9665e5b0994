"""Key supply from a simulated BB84 link: each KME's own key buffer, filled by its end of the link.

:class:`LinkKeySupply` replaces :class:`~.store.QKDLinkModel` when the pair runs with ``--link bb84``.
Each KME has a buffer its link end appends to (:meth:`deposit`); both ends deposit the same keys in
the same order (:mod:`hybridkex.qkdlink.driver`), so the two buffers are one stream, read at the
same offsets.  When a master SAE takes key at one KME, the same bytes are taken from the other
KME's buffer and compared: the shared :class:`~.store.KeyStore` then plays only the KME-to-KME
channel for key IDs, as before, and a mismatch (which would mean the link is broken) fails closed.
"""

from __future__ import annotations

import hmac
import logging
import threading
from typing import Any

from ...exceptions import ConfigurationError, HybridKEXError
from ...qkdlink.driver import LinkPair
from ...qkdlink.session import LinkSettings, LinkStats

__all__ = ["LinkKeySupply"]

log = logging.getLogger("hybridkex.qkd.kme")


class LinkKeySupply:
    """Two KME buffers fed by one link (thread-safe); the interface :class:`~.store.KeyStore` draws from."""

    def __init__(self, settings: LinkSettings, capacity_bits: int, kme_a: str, kme_b: str, *,
                 host: str = "127.0.0.1", connect_to: tuple[str, int] | None = None,
                 read_timeout: float = 60.0) -> None:
        if capacity_bits <= 0:
            raise ConfigurationError("must be > 0", field="capacity_bits")
        self.settings = settings
        self.capacity_bits = int(capacity_bits)
        self.kme_a, self.kme_b = kme_a, kme_b
        self._lock = threading.Lock()
        self._buf = {"a": bytearray(), "b": bytearray()}
        self.pair = LinkPair(settings, lambda k: self.deposit("a", k), lambda k: self.deposit("b", k),
                             host=host, connect_to=connect_to, can_accept=self._has_room,
                             read_timeout=read_timeout)

    def __repr__(self) -> str:
        return f"LinkKeySupply(available={self.available_bits()} bits, capacity={self.capacity_bits} bits)"

    @property
    def rate_bps(self) -> float:
        """Measured rate the KMEs receive key (wall clock), for Retry-After estimates."""
        s = self.pair.bob.stats.snapshot(self.settings.link.pulse_rate_hz)
        return float(s["delivered_rate_bps_wall"])

    def _has_room(self) -> bool:
        with self._lock:
            return 8 * max(len(b) for b in self._buf.values()) < self.capacity_bits

    def deposit(self, side: str, key: bytes) -> None:
        """Append a confirmed block's key to KME ``side``'s buffer (called by that KME's link end)."""
        with self._lock:
            self._buf[side] += key

    def available_bits(self) -> int:
        """Key both KMEs hold (a key is usable once it has landed at both)."""
        with self._lock:
            return 8 * min(len(b) for b in self._buf.values())

    def seconds_until(self, bits: int) -> float | None:
        missing = bits - self.available_bits()
        if missing <= 0:
            return 0.0
        rate = self.rate_bps
        if bits > self.capacity_bits or self.pair.bob.stats.fatal or rate <= 0:
            return None if bits > self.capacity_bits or self.pair.bob.stats.fatal else 1.0
        return missing / rate

    def draw(self, bits: int, randbytes: Any = None) -> bytes | None:
        """``bits`` of link key, taken from both buffers at the same offset; ``None`` if not there yet."""
        del randbytes  # the link's key is the key
        n = bits // 8
        with self._lock:
            a, b = self._buf["a"], self._buf["b"]
            if len(a) < n or len(b) < n:
                return None
            ka, kb = bytes(a[:n]), bytes(b[:n])
            del a[:n], b[:n]
        if not hmac.compare_digest(ka, kb):
            log.error("ALARM the two KMEs' link keys differ: key withheld")
            raise HybridKEXError("the two KMEs' link keys differ; the link is broken, no key is issued")
        return ka

    def side_stats(self, kme_id: str) -> LinkStats:
        """The counters of ``kme_id``'s end of the link (KME A runs Alice's end, KME B Bob's)."""
        return (self.pair.alice if kme_id == self.kme_a else self.pair.bob).stats

    def status_extension(self, kme_id: str) -> dict[str, Any]:
        """The link figures for ETSI ``status_extension`` at ``kme_id`` (its own end's view)."""
        s = self.settings
        ext = self.side_stats(kme_id).snapshot(s.link.pulse_rate_hz)
        ext |= {"link": "bb84-decoy", "distance_km": s.link.distance_km, "pulses_per_block": s.pulses_per_block,
                "pulse_rate_hz": s.link.pulse_rate_hz, "eavesdrop_fraction": s.eavesdrop_fraction,
                "qber_threshold": s.postprocess.qber_threshold, "speedup": s.speedup}
        stopped = self.pair.bob.stats.fatal or self.pair.alice.stats.fatal  # Bob drives: his stop is the link's
        if stopped:
            ext["link_stopped"] = stopped
        return ext

    async def start(self) -> None:
        await self.pair.start()

    async def stop(self) -> None:
        await self.pair.stop()
