"""The asyncio driver of the setup machines (:mod:`hybridkex.io.setup`): the one loop where their
events become asyncio I/O, for every asyncio entry point (open_connection, start_server, the
tunnel's streams)."""

from __future__ import annotations

import asyncio

from .. import workers
from ..tls import AsyncTLSStream
from . import _stale
from ._bridge import BlockingBridge
from ._events import NEED_DATA, BlockingCall, Established, Failed, HandshakeDone
from ._plumbing import ServerState, is_async_source, peer_ip
from .keys import KeySourceArg
from .setup import ServerSetup
from .streams import DEFAULT_LIMIT, HybridStreamReader, HybridStreamWriter
from .sync import Machine

__all__ = ["accept", "bridged", "drive", "established_streams"]

_Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def bridged(source: KeySourceArg) -> KeySourceArg:
    """``source`` as the setup machines take it: an asyncio key source becomes a blocking view whose
    calls run its coroutines on the running loop."""
    return BlockingBridge(source, asyncio.get_running_loop()) if is_async_source(source) else source


async def drive(machine: Machine, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> Established | HandshakeDone:
    """Run ``machine`` over the stream pair until it is established; raise its error."""
    while True:
        event = machine.next_event()
        out = machine.data_to_send()
        if isinstance(event, Failed):
            if out and not writer.is_closing():
                writer.write(out)  # the Abort or alert, best effort (never waits for drain)
            if event.await_peer_close:
                await _stale.await_close_async(reader)
            raise event.error
        try:
            async with asyncio.timeout(max(machine.timeout(), 0.0)):
                if out:
                    writer.write(out)
                    await writer.drain()
                if event is NEED_DATA:
                    machine.receive_data(await reader.read(machine.read_size()))
                    continue
        except OSError as exc:  # TimeoutError included: the stage's deadline passed
            machine.fail(exc)
            continue
        if isinstance(event, BlockingCall):
            try:
                value = await workers.call_async(event.run, event.timeout, event.what)
            except Exception as exc:
                machine.call_failed(exc)
            else:
                machine.call_done(value)
        elif isinstance(event, Established | HandshakeDone):
            return event


def established_streams(event: Established | HandshakeDone, streams: _Streams,
             limit: int) -> tuple[HybridStreamReader, HybridStreamWriter]:
    assert isinstance(event, Established)
    reader, writer = streams
    stream = AsyncTLSStream(event.tls, reader, writer)
    return (HybridStreamReader(stream, limit),
            HybridStreamWriter(stream, writer, (event.info, event.tls_info, event.reconnect_index, event.steady),
                               event.ticket))


async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: ServerState,
                 limit: int = DEFAULT_LIMIT) -> tuple[HybridStreamReader, HybridStreamWriter]:
    """The server side of one connection's setup (what :func:`start_server` runs per connection)."""
    setup = ServerSetup(state, peer=peer_ip(writer.get_extra_info("peername")))
    return established_streams(await drive(setup, reader, writer), (reader, writer), limit)
