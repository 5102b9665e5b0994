"""A QKD key the slave's KME no longer knows: the master drops its pooled keys, HybridClient retries once.

Real loopback sockets and TLS; the QKD link is the in-memory stand-in, whose ``forget_pending()``
does what a KME restart without persistence does.  The server is the ETSI master with a KeyPool.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from iohelpers import CLIENT_SAE, SERVER_SAE, Setup, echo_handler, make_setup

import hybridkex
from hybridkex import KeyUnavailableError, QKDConfig, QKDKeyUnknownError
from hybridkex.api import HybridClient, HybridServer
from hybridkex.io.config import SteadyPolicy
from hybridkex.qkd import KeyPool, MemoryKeyLink


@pytest.fixture
def setup() -> Setup:
    """Full handshakes every time: these tests are about the server's pooled keys going stale
    (tests/qkd/test_qkd_kme_restart.py has the steady state's counterpart)."""
    return make_setup(steady=SteadyPolicy(enabled=False))


class SlowToDiscard(KeyPool):
    """A pool that takes a while to drop stale keys (a busy server)."""

    def discard_stale(self, *args: Any, **kwargs: Any) -> int:
        time.sleep(0.5)
        return super().discard_stale(*args, **kwargs)


@contextlib.contextmanager
def pooled_server(setup: Setup, pool_class: type[KeyPool] = KeyPool) -> Iterator[tuple[HybridServer, KeyPool]]:
    pool = pool_class(setup.server_keys, [CLIENT_SAE], low_watermark=2, high_watermark=8)
    assert pool.wait_ready(30)
    server = HybridServer(("127.0.0.1", 0), setup.server, echo_handler, key_source=pool).start(poll_interval=0.05)
    try:
        yield server, pool
    finally:
        server.close()
        pool.close()


def echo_once(client: HybridClient, address: Any) -> tuple[str, ...]:
    with client.connect(address) as conn:
        conn.sendall(b"ping")
        assert conn.recv(16) == b"ping"
        return conn.session.qkd_key_ids


def rejections(log: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in log.records if "rejected connection" in r.getMessage()]


def test_blocking_client_retries_a_stale_key_once_and_the_pool_refills(
    setup: Setup, server_log: pytest.LogCaptureFixture
) -> None:
    with pooled_server(setup) as (server, pool):
        client = HybridClient(setup.client, key_source=setup.client_keys)
        before = echo_once(client, server.server_address)
        setup.link.forget_pending()  # the KMEs restart: the server's 7 pooled keys are stale
        after = [echo_once(client, server.server_address) for _ in range(10)]
    assert client.stale_key_retries == 1 and client.full_handshakes == 11
    assert pool.stats().stale_discards == 1
    assert len(rejections(server_log)) == 1 and "QKDKeyUnknownError" in rejections(server_log)[0]
    ids = [i for ids in [before, *after] for i in ids]
    assert len(ids) == len(set(ids)) == 11  # never a key twice


def test_the_retry_waits_until_the_master_has_dropped_its_stale_keys(
    setup: Setup, server_log: pytest.LogCaptureFixture
) -> None:
    # The client (slave) sends its Abort and waits for the server to close the connection, which it
    # does only after dropping its stale keys: a retry sent at once would get the next stale key.
    with pooled_server(setup, SlowToDiscard) as (server, _pool):
        client = HybridClient(setup.client, key_source=setup.client_keys)
        echo_once(client, server.server_address)
        setup.link.forget_pending()
        echo_once(client, server.server_address)
    assert client.stale_key_retries == 1 and len(rejections(server_log)) == 1


def test_asyncio_client_retries_a_stale_key_once(setup: Setup, server_log: pytest.LogCaptureFixture) -> None:
    with pooled_server(setup) as (server, pool):
        client = HybridClient(setup.client, key_source=setup.client_keys)

        async def main() -> None:
            for i in range(4):
                if i == 1:
                    setup.link.forget_pending()
                reader, writer = await client.open_connection(*server.server_address[:2])
                writer.write(b"ping")
                await writer.drain()
                assert await reader.readexactly(4) == b"ping"
                await writer.aclose()

        asyncio.run(main())
    assert client.stale_key_retries == 1 and pool.stats().stale_discards == 1
    assert len(rejections(server_log)) == 1


def test_the_retry_happens_once_only(server_log: pytest.LogCaptureFixture) -> None:
    setup = make_setup(steady=SteadyPolicy(enabled=False))
    other = MemoryKeyLink(("kme-client", "kme-server"))  # the client's KME never knows the server's keys
    with pooled_server(setup) as (server, _pool):
        client = HybridClient(setup.client, key_source=other.source(CLIENT_SAE, 0))
        with pytest.raises(QKDKeyUnknownError):
            client.connect(server.server_address)
    assert client.stale_key_retries == 1
    assert len(rejections(server_log)) == 2  # the first handshake and its one retry


def test_other_key_failures_are_not_retried(setup: Setup, server_log: pytest.LogCaptureFixture) -> None:
    with pooled_server(setup) as (server, _pool):
        # The client's key source belongs to another SAE: its KME refuses the fetch (401), not "not found".
        client = HybridClient(setup.client, key_source=setup.link.source("sae-other", 0))
        with pytest.raises(KeyUnavailableError) as info:
            client.connect(server.server_address)
    assert not isinstance(info.value, QKDKeyUnknownError)
    assert client.stale_key_retries == 0 and len(rejections(server_log)) == 1


def test_plain_connect_reports_the_stale_key_without_retrying(setup: Setup) -> None:
    with pooled_server(setup) as (server, pool):
        setup.link.forget_pending()
        with pytest.raises(QKDKeyUnknownError, match="unavailable") as info:
            hybridkex.connect(server.server_address, setup.client, key_source=setup.client_keys)
        assert not info.value.reported_by_peer and len(info.value.key_ids) == 1
        # The server dropped its stale keys before closing: the next handshake gets a fresh key.
        with hybridkex.connect(server.server_address, setup.client, key_source=setup.client_keys) as conn:
            assert conn.session.qkd_key_ids != info.value.key_ids
        assert pool.stats().stale_discards == 1



def test_an_initiator_that_is_master_drops_its_pool_and_retries(server_log: pytest.LogCaptureFixture) -> None:
    setup = make_setup(steady=SteadyPolicy(enabled=False))
    ini, res = setup.client.handshake, setup.server.handshake
    client_cfg = replace(setup.client, handshake=replace(
        ini, qkd=QKDConfig(CLIENT_SAE, "kme-client", master="initiator", peer_sae_id=SERVER_SAE)))
    server_cfg = replace(setup.server, handshake=replace(res, qkd=QKDConfig(SERVER_SAE, "kme-server",
                                                                             master="initiator")))
    pool = KeyPool(setup.client_keys, [SERVER_SAE], low_watermark=2, high_watermark=8)
    assert pool.wait_ready(30)
    server = HybridServer(("127.0.0.1", 0), server_cfg, echo_handler, key_source=setup.server_keys)
    with server.start(poll_interval=0.05), pool:
        client = HybridClient(client_cfg, key_source=pool)
        first = echo_once(client, server.server_address)
        setup.link.forget_pending()  # the client's 7 pooled keys are stale now
        second = echo_once(client, server.server_address)
    # The server (slave) was told "not found" by its KME and said so in its Abort; the client (master)
    # dropped its pool and retried with a fresh key.
    assert client.stale_key_retries == 1 and pool.stats().stale_discards == 1
    assert first != second and len(rejections(server_log)) == 1
