"""Shared pieces of the hardening tests (imported as ``hardeninghelpers``, never through conftest).

Reuses the other test folders' helper modules and the fuzz targets (fuzz/fuzz_targets.py) by import
(pyproject.toml's pytest ``pythonpath`` puts their folders on the path), and adds what only these
tests need: fuzz input strategies, resource counters (file descriptors, RSS) and secret scanning.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fuzz_targets
from hypothesis import strategies as st

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent


__all__ = ["ROOT", "TESTS", "fd_count", "fuzz_inputs", "fuzz_targets", "mutate", "rss_bytes", "secret_forms"]

#: Values a length field is set to by the mutator: empty, off by one, the largest u16 and u32.
_EXTREMES = (0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)


def mutate(seed: bytes, ops: Iterable[tuple[int, int, bytes]]) -> bytes:
    """Apply structure-blind mutations to ``seed``: byte flips, insertions, deletions, truncation,
    extreme big-endian length values, duplication.  Each op is (kind, position, payload)."""
    data = bytearray(seed)
    for kind, pos, payload in ops:
        at = pos % (len(data) + 1)
        k = kind % 6
        if k == 0 and data:
            i = pos % len(data)
            data[i] ^= (payload[0] if payload else 0) or 0x01
        elif k == 1:
            data[at:at] = payload or b"\x00"
        elif k == 2:
            del data[at:at + 1 + len(payload)]
        elif k == 3:
            del data[at:]
        elif k == 4:
            value = _EXTREMES[(payload[0] if payload else 0) % len(_EXTREMES)]
            width = 2 if (payload[1:2] or b"\x00")[0] & 1 else 4
            data[at:at + width] = value.to_bytes(4, "big")[-width:]
        else:
            data[at:at] = data[at:at + 1 + (payload[0] if payload else 0)]
    return bytes(data)


def fuzz_inputs(name: str) -> st.SearchStrategy[bytes]:
    """Inputs for fuzz target ``name``: raw bytes, its real seeds, and mutations of them."""
    seeds = fuzz_targets.seeds(name)
    ops = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 1 << 20), st.binary(max_size=8)),
                   min_size=1, max_size=4)
    return st.one_of(
        st.binary(max_size=1024),
        st.sampled_from(seeds),
        st.builds(mutate, st.sampled_from(seeds), ops),
    )


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def secret_forms(secret: bytes) -> dict[str, bytes]:
    """The spellings a secret could leak in: raw, hex (lower, upper), base64 (standard, URL-safe,
    unpadded).  Only the forms at least 8 bytes long (so a match is not a coincidence)."""
    forms = {
        "raw": secret,
        "hex": secret.hex().encode(),
        "HEX": secret.hex().upper().encode(),
        "base64": base64.b64encode(secret),
        "base64url": base64.urlsafe_b64encode(secret),
        "base64-nopad": base64.b64encode(secret).rstrip(b"="),
        "repr": repr(secret).encode(),
    }
    return {k: v for k, v in forms.items() if len(v) >= 8}


# --- an active attacker on 127.0.0.1 -----------------------------------------------------------------


C2S, S2C = "c2s", "s2c"
#: What "inject" puts before a message: a well-framed Finished / TLS application record of garbage.
JUNK_HK = b"HK\x01\x04\x00\x00\x00\x03abc"
JUNK_TLS = b"\x17\x03\x03\x00\x05hello"


def split_message(buf: bytes | bytearray) -> int:
    """Length of the first complete message in ``buf`` (0 if incomplete): a hybridkex frame
    ("HK" || ver || type || u32 len || body) or a TLS record (type || 0x03 ver || u16 len || body).
    Anything else is taken whole (the proxy never stalls on bytes it cannot frame)."""
    if len(buf) >= 2 and bytes(buf[:2]) == b"HK":
        if len(buf) < 8:
            return 0
        n = 8 + int.from_bytes(buf[4:8], "big")
    elif len(buf) >= 2 and buf[0] in (20, 21, 22, 23) and buf[1] == 3:
        if len(buf) < 5:
            return 0
        n = 5 + int.from_bytes(buf[3:5], "big")
    else:
        return len(buf)
    return n if len(buf) >= n else 0


def message_kind(msg: bytes) -> str:
    if msg[:2] == b"HK":
        return {1: "Hello", 2: "Response", 3: "Certificate", 4: "Finished", 0x7F: "Abort"}.get(msg[3], "hk?")
    return {20: "tls-ccs", 21: "tls-alert", 22: "tls-handshake", 23: "tls-encrypted"}.get(msg[0], "raw")


@dataclass
class Attack:
    """What the proxy does to message ``index`` of ``direction``.

    ``action``: pass, drop, delay, reorder (swap with the next message of that direction),
    duplicate, replay (send ``replacement`` instead: the same message of an earlier session),
    truncate (half the message, then close both ways), truncate_fix (half the body with the
    length field recomputed so it parses), inject (garbage message before it), modify (xor the
    byte at ``position`` with ``xor``), rewrite (send ``rewrite(message)``)."""

    direction: str = C2S
    index: int = -1
    action: str = "pass"
    position: int = 0
    xor: int = 0x01
    delay: float = 0.0
    replacement: bytes = b""
    rewrite: Any = None

    @property
    def label(self) -> str:
        extra = {"modify": f"@{self.position}", "delay": f"{self.delay:g}s"}.get(self.action, "")
        return f"{self.direction}[{self.index}]-{self.action}{extra}"


@dataclass
class ProxyRecord:
    messages: dict[str, list[bytes]] = field(default_factory=lambda: {C2S: [], S2C: []})


def truncate_fixed(msg: bytes) -> bytes:
    if msg[:2] == b"HK":
        body = msg[8:][: max(0, (len(msg) - 8) // 2)]
        return msg[:4] + len(body).to_bytes(4, "big") + body
    if len(msg) >= 5:
        body = msg[5:][: max(0, (len(msg) - 5) // 2)]
        return msg[:3] + len(body).to_bytes(2, "big") + body
    return msg[: len(msg) // 2]


class AttackProxy:
    """A man in the middle on 127.0.0.1 (asyncio): forwards each connection to ``target`` message
    by message, applying ``attack`` to one message, and records every message it saw."""

    def __init__(self, target: tuple[str, int], attack: Attack | None = None) -> None:
        self.target = target
        self.attack = attack or Attack()
        self.record = ProxyRecord()
        self.applied = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> AttackProxy:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        if self._server is not None:
            await self._server.wait_closed()

    async def _on_client(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        try:
            sreader, swriter = await asyncio.open_connection(*self.target)
        except OSError:
            cwriter.close()
            return
        self._writers += [cwriter, swriter]
        stop = asyncio.Event()
        for d, r, w in ((C2S, creader, swriter), (S2C, sreader, cwriter)):
            task = asyncio.create_task(self._pump(d, r, w, stop, (cwriter, swriter)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    stop: asyncio.Event, both: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        buf = bytearray()
        held: bytes | None = None
        index = 0
        a = self.attack
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                buf += data
                while (n := split_message(buf)) > 0:
                    msg = bytes(buf[:n])
                    del buf[:n]
                    self.record.messages[direction].append(msg)
                    out: list[bytes] = [msg]
                    if held is not None:
                        out, held = [msg, held], None
                    elif direction == a.direction and index == a.index:
                        self.applied = True
                        act = a.action
                        if act == "drop":
                            out = []
                        elif act == "delay":
                            await asyncio.sleep(a.delay)
                        elif act == "reorder":
                            held, out = msg, []
                        elif act == "duplicate":
                            out = [msg, msg]
                        elif act == "replay":
                            out = [a.replacement]
                        elif act == "truncate":
                            writer.write(msg[: len(msg) // 2])
                            with contextlib.suppress(Exception):
                                await writer.drain()
                            for w in both:
                                w.close()
                            return
                        elif act == "truncate_fix":
                            out = [truncate_fixed(msg)]
                        elif act == "inject":
                            out = [JUNK_HK if msg[:2] == b"HK" else JUNK_TLS, msg]
                        elif act == "modify":
                            m = bytearray(msg)
                            m[a.position % len(m)] ^= a.xor
                            out = [bytes(m)]
                        elif act == "rewrite":
                            out = [a.rewrite(msg)]
                    index += 1
                    for chunk in out:
                        writer.write(chunk)
                    await writer.drain()
            if buf:
                writer.write(bytes(buf))
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if stop.is_set():
                for w in both:
                    w.close()
            stop.set()
