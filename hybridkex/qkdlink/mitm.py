"""A man in the middle on the link's classical channel, for demonstrations (``hybridkex kme --mitm``).

:class:`TamperProxy` sits between KME B's link end and KME A's: it forwards the driver's frames
(``length | block | frame``) both ways and flips one random bit in a chosen fraction of them, or
drops them.  The authentication must catch every such change: the block is discarded and an
alarm is raised (docs/qkdlink.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from dataclasses import dataclass

from ..exceptions import ConfigurationError

__all__ = ["TamperProxy", "TamperSpec", "parse_mitm"]

_HEAD = struct.Struct(">IQ")


@dataclass(frozen=True)
class TamperSpec:
    """``action`` ("flip" or "drop") applied to each classical frame with probability ``fraction``."""

    action: str
    fraction: float
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.action not in ("flip", "drop"):
            raise ConfigurationError("action must be flip or drop", field="mitm")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigurationError("fraction must be in (0, 1]", field="mitm")


def parse_mitm(text: str) -> TamperSpec:
    """``flip:0.05`` or ``drop:0.01`` (the fraction of classical frames touched)."""
    action, _, value = text.partition(":")
    try:
        fraction = float(value)
    except ValueError:
        raise ConfigurationError(f"{text!r}: expected flip:FRACTION or drop:FRACTION, e.g. flip:0.05",
                                 field="--mitm") from None
    if action not in ("flip", "drop") or not 0.0 < fraction <= 1.0:
        raise ConfigurationError(f"{text!r}: expected flip:FRACTION or drop:FRACTION with 0 < FRACTION <= 1, "
                                 "e.g. flip:0.05", field="--mitm")
    return TamperSpec(action, fraction)


class TamperProxy:
    """Listen on ``host``; forward to ``target``, tampering as ``spec`` says. ``touched`` counts frames hit."""

    def __init__(self, target: tuple[str, int], spec: TamperSpec, *, host: str = "127.0.0.1") -> None:
        self.target, self.spec, self.host = target, spec, host
        self._rng = random.Random(spec.seed)  # noqa: S311 - a demo attacker, not a secret
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.address: tuple[str, int] = ("", 0)
        self.touched = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.address = self._server.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(_HEAD.size)
                frame = bytearray(await reader.readexactly(_HEAD.unpack(head)[0]))
                if frame and self._rng.random() < self.spec.fraction:
                    self.touched += 1
                    if self.spec.action == "drop":
                        continue
                    frame[self._rng.randrange(len(frame))] ^= 1 << self._rng.randrange(8)
                writer.write(head + bytes(frame))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_w}
        try:
            await asyncio.gather(self._pump(reader, up_w), self._pump(up_r, writer))
        except asyncio.CancelledError:
            pass
        finally:
            self._writers -= {writer, up_w}
