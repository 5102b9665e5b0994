"""Counting what crosses the wire: bytes per direction, flights and round trips.

A :class:`WireLog` is fed every transfer, in order, by the in-memory pump (or by the counting proxy
over loopback).  A *flight* is a maximal run of transfers in one direction.  *Round trips* are what a
client waits for: the number of server flights it must receive before its handshake is complete
(TLS 1.3 with a certificate: 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Direction", "WireLog", "WireSummary"]

Direction = Literal["c2s", "s2c"]


@dataclass(frozen=True, slots=True)
class WireSummary:
    """What one handshake put on the wire."""

    #: Bytes client to server.
    client_bytes: int
    #: Bytes server to client (including post-handshake messages such as a session ticket).
    server_bytes: int
    #: Number of flights (maximal same-direction runs).
    flights: int
    #: Server flights the client waited for before its handshake was complete.
    round_trips: int

    @property
    def total(self) -> int:
        return self.client_bytes + self.server_bytes

    def as_dict(self) -> dict[str, int]:
        return {"bytes_on_wire": self.total, "client_bytes": self.client_bytes, "server_bytes": self.server_bytes,
                "flights": self.flights, "round_trips": self.round_trips}


@dataclass
class WireLog:
    """Transfers in the order they happened."""

    transfers: list[tuple[Direction, int]] = field(default_factory=list)
    #: Number of transfers recorded when the client reported its handshake complete (None: not yet).
    client_done_at: int | None = None

    def record(self, direction: Direction, nbytes: int) -> None:
        if nbytes:
            self.transfers.append((direction, nbytes))

    def client_done(self) -> None:
        """Mark the point where the client finished (its last flight may still follow)."""
        if self.client_done_at is None:
            self.client_done_at = len(self.transfers)

    def summary(self) -> WireSummary:
        flights = 0
        waited = 0
        last: Direction | None = None
        done_at = len(self.transfers) if self.client_done_at is None else self.client_done_at
        for i, (direction, _) in enumerate(self.transfers):
            if direction != last:
                flights += 1
                if direction == "s2c" and i < done_at:
                    waited += 1
                last = direction
        return WireSummary(
            client_bytes=sum(n for d, n in self.transfers if d == "c2s"),
            server_bytes=sum(n for d, n in self.transfers if d == "s2c"),
            flights=flights,
            round_trips=waited,
        )
