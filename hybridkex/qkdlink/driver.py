"""The asyncio driver of a running link: it only moves the protocol ends' frames over a TCP socket.

Alice's end listens (:meth:`LinkPair.start`), Bob's connects (directly, or through whatever sits on
``connect_to``: tests put a tampering proxy there) and starts every block.  On the wire each frame
is ``length (4 bytes) | block number (8) | frame``; the block number outside the frame only tells
Alice which block's photons the frame is about, and Bob repeats it inside his authenticated
CLICKS header, which Alice checks.  The CPU work of a block (Cascade, hashing) runs in a worker
thread so the KMEs' HTTP servers stay responsive.

The pending-key rule (docs/qkdlink.md, "Limits"): Bob's key of block ``m`` is held until Alice's
authenticated SIFT of a later block names ``m`` as the last block she completed; if it names an
older one (she never saw Bob's CONFIRM), the key is discarded.  Alice holds hers until she has
sent that SIFT, so both KMEs deliver the same keys in the same order.  At that point both ends
also move the block's reserved slice into their authentication stream
(:class:`~.session.AuthStream`).  A frame that fails authentication, or a QBER abort, is an
*alarm*: logged at ERROR/WARNING with the prefix ``ALARM`` and counted in :class:`~.session.LinkStats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ..exceptions import (
    BootstrapExhausted,
    ConfigurationError,
    HybridKEXError,
    LinkAbort,
    LinkAuthenticationError,
    QBERAbort,
)
from .auth import ChannelAuthenticator
from .mitm import TamperProxy
from .protocol import AliceEnd, BobEnd
from .session import AuthStream, LinkSettings, LinkStats, QuantumChannel, abort_reason

__all__ = ["MAX_FRAME_BYTES", "LinkPair"]

log = logging.getLogger("hybridkex.qkdlink")

#: Largest frame accepted (a SIFT of 10^9 pulses at 1 km is ~30 MB); larger ones end the connection.
MAX_FRAME_BYTES = 256 * 1024 * 1024
_HEAD = struct.Struct(">IQ")
_READ_TIMEOUT = 60.0

Deliver = Callable[[bytes], None]


async def _read(reader: asyncio.StreamReader, timeout: float) -> tuple[int, bytes] | None:
    """One wire frame, or ``None`` when the connection ended (EOF, reset, silence, oversize)."""
    try:
        async with asyncio.timeout(timeout):
            head = await reader.readexactly(_HEAD.size)
            length, block = _HEAD.unpack(head)
            if length > MAX_FRAME_BYTES:
                log.warning("link frame of %d bytes refused (limit %d)", length, MAX_FRAME_BYTES)
                return None
            return block, await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        return None


def _write(writer: asyncio.StreamWriter, block: int, frame: bytes) -> None:
    writer.write(_HEAD.pack(len(frame), block) + frame)


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.close()


class _Side:
    """What one end keeps between blocks: its auth stream, its pending key, its counters."""

    def __init__(self, name: str, settings: LinkSettings, deliver: Deliver) -> None:
        self.name = name
        self.settings = settings
        self.deliver = deliver
        self.auth = AuthStream(settings.bootstrap, settings.auth_target_bits)
        self.stats = LinkStats(name, auth=self.auth)
        self.pending: tuple[int, bytes] | None = None
        self.last_completed = 0

    def settle(self, confirmed: int) -> None:
        """Alice's authenticated word: ``confirmed`` is the last block she completed."""
        if self.pending is None:
            return
        n, key = self.pending
        self.pending = None
        if n != confirmed:
            self.stats.pending_discarded += 1
            log.warning("link %s: block %d discarded: Alice did not complete it (no CONFIRM reached her)",
                        self.name, n)
            return
        reserve = self.auth.reserve_for(n, len(key))
        self.auth.add(key[:reserve])
        rest = key[reserve:]
        self.stats.key_bits_delivered += 8 * len(rest)
        if rest:
            self.deliver(rest)

    def outcome(self, n: int, end: AliceEnd | BobEnd, error: HybridKEXError | None = None) -> None:
        s = self.stats
        s.pulses += self.settings.pulses_per_block
        err = error or end.error
        if end.result is not None and err is None:
            s.blocks_ok += 1
            s.measured(end.result.qber)
            s.final_bits += end.result.final_bits
            s.leaked_ec_bits += end.result.leaked_ec_bits
            self.pending = (n, end.result.key)
            self.last_completed = n
            return
        s.aborted(abort_reason(err))
        s.last_error = str(err) if err is not None else "block did not finish"
        if isinstance(err, QBERAbort):
            s.aborted_qber += 1
            s.alarm("qber")
            s.measured(err.qber)
            log.warning("ALARM link %s: block %d aborted: %s (an eavesdropper, or a degraded link)", self.name, n, err)
        elif isinstance(err, LinkAuthenticationError):
            s.aborted_auth += 1
            s.alarm("authentication")
            detail = getattr(err, "detail", "")
            log.error("ALARM link %s: block %d discarded: classical channel authentication failed (%s%s); "
                      "someone may be tampering with the link", self.name, n, err, f": {detail}" if detail else "")
        else:
            s.aborted_other += 1
            log.info("link %s: block %d gave no key: %s", self.name, n, s.last_error)

    def fail(self, err: BootstrapExhausted | ConfigurationError) -> None:
        why = str(err)
        if self.stats.alarms:
            why += (f" (after {self.stats.alarms} alarm(s): blocks aborted on QBER or failed authentication used "
                    "the key up; the link is under attack or degraded)")
        self.stats.fatal = why
        self.stats.alarm("stopped")
        log.error("ALARM link %s stopped: %s", self.name, why)


class LinkPair:
    """Both ends of one link in the running event loop; keys go to ``deliver_a`` / ``deliver_b``.

    ``await start()`` listens for Bob on ``host`` (a free port) and starts Bob's loop, which
    connects to ``connect_to`` (default: Alice's address); ``await stop()`` ends both.
    ``can_accept()`` (optional) tells Bob whether the KMEs have room for more key; while it says
    no, no new block starts.
    """

    def __init__(self, settings: LinkSettings, deliver_a: Deliver, deliver_b: Deliver, *,
                 host: str = "127.0.0.1", connect_to: tuple[str, int] | None = None,
                 can_accept: Callable[[], bool] | None = None, read_timeout: float = _READ_TIMEOUT) -> None:
        self.settings = settings
        self.channel = QuantumChannel(settings)
        self.alice = _Side("alice", settings, deliver_a)
        self.bob = _Side("bob", settings, deliver_b)
        self.host = host
        self.connect_to = connect_to
        self.read_timeout = read_timeout
        self._can_accept = can_accept or (lambda: True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address: tuple[str, int] = ("", 0)
        self.stopped = asyncio.Event()
        self._proxy: TamperProxy | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._alice_connection, self.host, 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = (host, port)
        if self.settings.mitm is not None:
            self._proxy = TamperProxy(self.address, self.settings.mitm, host=self.host)
            await self._proxy.start()
            self.connect_to = self._proxy.address
            log.warning("link: a man in the middle (%s on %.1f %% of classical frames) sits at tcp %s:%d",
                        self.settings.mitm.action, 100 * self.settings.mitm.fraction, *self._proxy.address)
        self._spawn(self._bob_loop())
        log.info("QKD link (decoy BB84, %.1f km, %d pulses/block) between the KMEs over tcp %s:%d",
                 self.settings.link.distance_km, self.settings.pulses_per_block, host, port)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        if self._proxy is not None:
            await self._proxy.stop()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        self.stopped.set()

    # -- Alice -------------------------------------------------------------------------------------

    async def _alice_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t = asyncio.current_task()
        if t is not None:
            self._tasks.add(t)
        side, s = self.alice, self.settings
        end: AliceEnd | None = None
        n = 0
        try:
            while True:
                got = await _read(reader, self.read_timeout)
                if got is None:
                    break
                block, frame = got
                if end is not None and not end.done and block != n:
                    # Bob moved on: he never got our last frame, or we never got his CONFIRM.
                    end.abandon("Bob started a new block before this one finished")
                    side.outcome(n, end)
                    end = None
                if end is None or end.done:
                    try:
                        pool = side.auth.pool_for(block)
                    except BootstrapExhausted as err:
                        side.fail(err)
                        break
                    except ConfigurationError as err:
                        # An old block number (its key already used): a replay, never a second use of a pad.
                        side.stats.alarm("replay")
                        side.stats.last_error = str(err)
                        log.error("ALARM link alice: frame for block %d refused: %s", block, err)
                        break
                    n = block
                    side.stats.blocks_started += 1
                    photons, rng = await asyncio.to_thread(self.channel.half, "alice", n)
                    end = AliceEnd(photons.alice, photons.sent, s.link, s.postprocess,
                                   ChannelAuthenticator(pool, initiator=False), rng=rng, auth_reserve_bits=0,
                                   header=struct.pack(">Q", side.last_completed))
                    first = True
                else:
                    first = False
                reply = await asyncio.to_thread(end.receive, frame)
                if first and end.error is None and end.peer_header != struct.pack(">Q", n):
                    # The number outside the frame was altered: we used the wrong photons.  Fail closed.
                    end.abandon("block number altered in flight")
                    side.outcome(n, end, LinkAuthenticationError("block number in the authenticated header "
                                                                 "does not match the frame's"))
                    break
                if reply is not None:
                    _write(writer, n, reply)
                    await writer.drain()
                if first and reply is not None and end.error is None:
                    side.settle(side.last_completed)  # our SIFT names it: Bob will settle the same way
                if end.done:
                    side.outcome(n, end)
                    if end.error is not None and not isinstance(end.error, LinkAbort):
                        break  # close: Bob may be waiting for a frame we will not send
            if end is not None and not end.done:
                end.abandon()
                side.outcome(n, end)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # stop(): end quietly (asyncio's stream callback logs a cancelled handler as an error).
            pass
        except Exception as exc:  # a bug: stop this connection loudly, never deliver from it
            log.exception("link alice: driver failed")
            side.stats.last_error = f"link driver failed: {exc}"
        finally:
            _close(writer)
            if t is not None:
                self._tasks.discard(t)

    # -- Bob ---------------------------------------------------------------------------------------

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        delay = 0.02
        while True:
            try:
                return await asyncio.open_connection(*(self.connect_to or self.address))
            except OSError:
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    async def _bob_loop(self) -> None:
        side, s = self.bob, self.settings
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        n = 0
        next_start = time.monotonic()
        try:
            while True:
                while not self._can_accept():
                    await asyncio.sleep(0.05)
                if s.speedup:
                    await asyncio.sleep(max(0.0, next_start - time.monotonic()))
                    next_start = max(next_start, time.monotonic() - s.block_seconds / s.speedup)
                    next_start += s.block_seconds / s.speedup
                n += 1
                try:
                    pool = side.auth.pool_for(n)
                except (BootstrapExhausted, ConfigurationError) as err:
                    side.fail(err)
                    return
                side.stats.blocks_started += 1
                photons, _ = await asyncio.to_thread(self.channel.half, "bob", n)
                end = BobEnd(photons.bob, s.link, s.postprocess, ChannelAuthenticator(pool, initiator=True),
                             auth_reserve_bits=0, header=struct.pack(">Q", n))
                try:
                    if writer is None or reader is None:
                        reader, writer = await self._connect()
                    await self._bob_block(n, end, reader, writer)
                except (ConnectionError, OSError):
                    end.abandon("the link connection failed")
                side.outcome(n, end)
                failed = end.error
                if failed is not None and (not isinstance(failed, LinkAbort) or failed.reason == "abandoned"):
                    # Anything but an announced abort: the peer may still be waiting, start afresh.
                    _close(writer)
                    reader = writer = None
        except Exception as exc:  # a bug: the link stops (fail closed) and says why
            log.exception("link bob: driver failed")
            side.stats.fatal = f"link driver failed: {exc}"
        finally:
            _close(writer)

    async def _bob_block(self, n: int, end: BobEnd, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        frame: bytes | None = end.start()
        settled = False
        while True:
            if frame is not None:
                _write(writer, n, frame)
                await writer.drain()
            if end.done:
                return
            got = await _read(reader, self.read_timeout)
            if got is None or got[0] != n:
                end.abandon("the link connection ended" if got is None else "frame of another block")
                return
            frame = await asyncio.to_thread(end.receive, got[1])
            if not settled and end.peer_header is not None:
                settled = True
                confirmed = struct.unpack(">Q", end.peer_header)[0] if len(end.peer_header) == 8 else -1
                self.bob.settle(confirmed)
