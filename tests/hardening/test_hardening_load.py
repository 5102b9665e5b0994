"""Load and resource exhaustion against the asyncio server (hybridkex.start_server) on loopback.

* 1,000 connections from concurrent clients (250 in flight at once), each a full hybrid handshake
  (ML-KEM-768 + X25519 + a fresh QKD key) and TLS 1.3, echoing data: zero failures; file
  descriptors back to the baseline; RSS growth bounded; no session object left alive; one distinct
  QKD key per connection.
* A configured limit (max_connections) refuses the excess with a log line and a typed error at the
  client, and nothing else fails.
* Exhaustion attempts: 4 GiB length fields, hundreds of half-open connections, slowloris (one
  byte at a time): memory stays bounded, every such connection is closed by the server's deadline,
  and legitimate clients are served meanwhile.

Numbers are printed (pytest -s) for docs/security.md; the assertions are bounds, not timings.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from typing import Any

import pytest
from hardeninghelpers import fd_count, rss_bytes
from iohelpers import make_setup

import hybridkex
from hybridkex.api import HybridStreamWriter
from hybridkex.exceptions import HybridKEXError
from hybridkex.protocol import Session

RESULTS: dict[str, Any] = {}


async def _echo(reader: Any, writer: Any) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (HybridKEXError, ConnectionError):
        pass
    finally:
        writer.close()


async def _one_client(setup: Any, port: int, size: int = 512) -> tuple[str, tuple[str, ...]]:
    payload = os.urandom(size)
    try:
        reader, writer = await hybridkex.open_connection("127.0.0.1", port, setup.client,
                                                         key_source=setup.client_keys)
    except HybridKEXError as exc:
        return type(exc).__name__, ()
    try:
        writer.write(payload)
        writer.write_eof()
        got = await reader.read()
        return ("ok" if got == payload else "WRONG-DATA"), writer.session.info.qkd_key_ids
    except HybridKEXError as exc:
        return type(exc).__name__, ()
    finally:
        await writer.aclose()


def _live(cls: type) -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, cls))


def _settle_fds(baseline: int) -> int:
    """File descriptors of this process once closed sockets are gone (bounded wait)."""
    import time

    for _ in range(100):
        gc.collect()
        n = fd_count()
        if n <= baseline:
            return n
        time.sleep(0.05)
    return fd_count()


def test_1000_concurrent_connections() -> None:
    """1,000 connections (then 500 more, to tell a leak from the allocator's high-water mark)."""
    setup = make_setup(max_connections=1024, server_timeout=60, client_timeout=60)
    n_clients, in_flight = 1000, 250

    async def main() -> dict[str, Any]:
        server = await hybridkex.start_server(_echo, "127.0.0.1", 0, setup.server, key_source=setup.server_keys,
                                              backlog=1024)
        port = int(server.sockets[0].getsockname()[1])
        try:
            warm = await asyncio.gather(*(_one_client(setup, port) for _ in range(20)))
            assert all(r == "ok" for r, _ in warm)
            gc.collect()
            fds0, rss0 = fd_count(), rss_bytes()
            stock0 = setup.link.stock()
            sem = asyncio.Semaphore(in_flight)

            async def bounded() -> tuple[str, tuple[str, ...]]:
                async with sem:
                    return await _one_client(setup, port)

            results = await asyncio.gather(*(bounded() for _ in range(n_clients)))
            # A second round: memory that a leak would add per connection shows up here; the first
            # round's growth is the allocator keeping the peak of 250 connections in flight.
            gc.collect()
            rss1 = rss_bytes()
            again = await asyncio.gather(*(bounded() for _ in range(n_clients // 2)))
            gc.collect()
            rss2 = rss_bytes()
        finally:
            server.close()
            await server.wait_closed()
        return {"results": results + again, "fds0": fds0, "rss0": rss0, "rss1": rss1, "rss2": rss2,
                "stock_used": stock0 - setup.link.stock()}

    fds_start = fd_count()
    out = asyncio.run(main())
    outcomes = [r for r, _ in out["results"]]
    failures = [r for r in outcomes if r != "ok"]
    ids = [k for _, ks in out["results"] for k in ks]
    fds_end = _settle_fds(fds_start)
    gc.collect()
    rss_growth = out["rss1"] - out["rss0"]
    second = out["rss2"] - out["rss1"]
    RESULTS["load"] = {"connections": len(outcomes), "failures": len(failures), "fd_before": fds_start,
                       "fd_after": fds_end,
                       "rss_growth_round1_mib": round(rss_growth / 2**20, 1),
                       "rss_growth_round2_mib": round(second / 2**20, 1), "qkd_keys_used": out["stock_used"]}
    print("load:", RESULTS["load"])
    assert not failures, failures[:10]
    total = n_clients + n_clients // 2
    assert len(ids) == total and len(set(ids)) == total, "QKD key IDs not one per connection"
    assert out["stock_used"] == total
    assert fds_end <= fds_start, f"file descriptors leaked: {fds_start} before, {fds_end} after"
    assert rss_growth < 96 * 2**20, f"RSS grew by {rss_growth / 2**20:.0f} MiB over 1000 connections"
    assert second < 16 * 2**20, f"RSS grew by {second / 2**20:.0f} MiB more over 500 further connections"
    assert _live(HybridStreamWriter) == 0 and _live(Session) == 0, "sessions left alive after close"


def test_configured_limit_refuses_the_excess(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hybridkex.server")
    limit, clients = 16, 48
    setup = make_setup(max_connections=limit)

    async def main() -> tuple[list[str], int, str]:
        release = asyncio.Event()
        inside = 0

        async def hold(reader: Any, writer: Any) -> None:
            nonlocal inside
            inside += 1
            await release.wait()
            await _echo(reader, writer)

        server = await hybridkex.start_server(hold, "127.0.0.1", 0, setup.server, key_source=setup.server_keys)
        port = int(server.sockets[0].getsockname()[1])
        try:
            tasks = [asyncio.create_task(_one_client(setup, port)) for _ in range(clients)]
            for _ in range(400):  # until every client has either got in or been refused (bounded)
                if inside + sum(t.done() for t in tasks) >= clients:
                    break
                await asyncio.sleep(0.05)
            got_in = inside
            release.set()
            results = [r for r, _ in await asyncio.gather(*tasks)]
            after, _ = await _one_client(setup, port)
        finally:
            server.close()
            await server.wait_closed()
        return results, got_in, after

    results, inside, after = asyncio.run(main())
    refused_logs = [r for r in caplog.records if "already being served" in r.getMessage()]
    ok = results.count("ok")
    RESULTS["limit"] = {"clients": clients, "limit": limit, "served": ok, "refused": len(results) - ok}
    assert ok == inside == limit, (ok, inside)
    assert all(r in ("ok", "RemoteProtocolError", "TLSError") for r in results), set(results)
    assert len(refused_logs) == clients - limit
    assert after == "ok"


@pytest.mark.parametrize("attack", ["huge-length", "half-open", "slowloris", "huge-then-stall"])
def test_exhaustion_attempts(attack: str) -> None:
    """Many hostile connections at once; legitimate clients served meanwhile; all closed by the
    server's deadline; memory and file descriptors bounded."""
    setup = make_setup(max_connections=1024, server_timeout=3.0, client_timeout=30)
    hostile = 300

    async def main() -> dict[str, Any]:
        server = await hybridkex.start_server(_echo, "127.0.0.1", 0, setup.server, key_source=setup.server_keys,
                                              backlog=1024)
        port = int(server.sockets[0].getsockname()[1])
        closed_by_server = 0

        async def evil(i: int) -> None:
            nonlocal closed_by_server
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                if attack == "huge-length":  # a Hello frame announcing a 4 GiB body
                    writer.write(b"HK\x01\x01\xff\xff\xff\xff" + b"\x00" * 64)
                elif attack == "huge-then-stall":  # a maximal legal Hello, never sent
                    writer.write(b"HK\x01\x01\x00\x01\x00\x00" + b"\x00" * 1000)
                elif attack == "slowloris":
                    for b in b"HK\x01\x01\x00\x00\x05\x00":
                        writer.write(bytes([b]))
                        await asyncio.sleep(0.4)
                        if reader.at_eof():
                            break
                async with asyncio.timeout(15):
                    while await reader.read(65536):
                        pass
                closed_by_server += 1
            except ConnectionError:  # reset while writing: only the server closes these
                closed_by_server += 1
            except TimeoutError:
                pass
            finally:
                writer.close()

        try:
            gc.collect()
            rss0 = rss_bytes()
            evil_tasks = [asyncio.create_task(evil(i)) for i in range(hostile)]
            await asyncio.sleep(0.3)
            legit = await asyncio.gather(*(_one_client(setup, port) for _ in range(20)))
            await asyncio.gather(*evil_tasks)
            for _ in range(100):
                if server.active_connections == 0:
                    break
                await asyncio.sleep(0.05)
            active = server.active_connections
            rss_growth = rss_bytes() - rss0
        finally:
            server.close()
            await server.wait_closed()
        return {"legit": [r for r, _ in legit], "closed": closed_by_server, "active_after": active,
                "rss_growth": rss_growth}

    fds0 = fd_count()
    out = asyncio.run(main())
    fds1 = _settle_fds(fds0)
    RESULTS[attack] = {"hostile": hostile, "closed_by_server": out["closed"],
                       "rss_growth_mib": round(out["rss_growth"] / 2**20, 1), "fd_before": fds0, "fd_after": fds1}
    print(attack, RESULTS[attack])
    assert out["legit"] == ["ok"] * 20, out["legit"]
    assert out["closed"] == hostile, f"only {out['closed']} of {hostile} hostile connections were closed"
    assert out["active_after"] == 0
    assert out["rss_growth"] < 48 * 2**20, f"RSS grew by {out['rss_growth'] / 2**20:.0f} MiB"
    assert fds1 <= fds0
