"""Shared helpers for the link driver tests: a short fast link, a frame-aware tampering proxy."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from hybridkex.qkdlink import model
from hybridkex.qkdlink import postprocess as pp
from hybridkex.qkdlink.session import LinkSettings

HEAD = struct.Struct(">IQ")
#: 1 km, 5*10^6 pulses: ~2500 key bits a block in ~0.2 s (the finite-size epsilons relaxed to 1e-4).
FAST = replace(model.GYS.at(1.0), p_signal=0.6, p_decoy=0.3)


def fast_settings(**kw: Any) -> LinkSettings:
    base: dict[str, Any] = {
        "link": FAST, "pulses_per_block": 5 * 10**6, "seed": 11, "bootstrap": bytes(range(256)) * 2,
        "config": pp.PostProcessConfig.calibrated(FAST, eps_pe=1e-4, eps_pa=1e-4)}
    return LinkSettings(**(base | kw))


#: (direction "b2a"/"a2b", block, frame) -> frame to forward, (new block number, frame), or None to drop it.
Hook = Callable[[str, int, bytes], bytes | tuple[int, bytes] | None]


class FrameProxy:
    """A small TCP proxy between Bob's and Alice's link ends that lets a test alter or drop frames."""

    def __init__(self, target: tuple[str, int], hook: Hook) -> None:
        self.target, self.hook = target, hook
        self.server: asyncio.Server | None = None
        self.address: tuple[str, int] = ("", 0)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = self.server.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _pump(self, direction: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readexactly(HEAD.size)
                length, block = HEAD.unpack(head)
                out = self.hook(direction, block, await r.readexactly(length))
                if isinstance(out, tuple):
                    block, out = out
                if out is not None:
                    w.write(HEAD.pack(len(out), block) + out)
                    await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(*self.target)
        await asyncio.gather(self._pump("b2a", r, uw), self._pump("a2b", ur, w))


def kind(frame: bytes) -> int:
    """The protocol message kind of a frame (seq 8 bytes, flag 1, then the kind byte)."""
    return frame[9]


async def wait_for(cond: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
