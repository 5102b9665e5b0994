"""Recycled authentication in the tunnel, end to end over the REAL secure channel: two ``hybridkex
tunnel`` processes and a real ``hybridkex kme`` (QKD required).  The first connection is
authenticated by the bootstrap PSK, later ones by recycled keys; a reload and restarting either side
(SIGTERM, or SIGKILL with a rotation possibly still queued) keep working, and the retired PSK is
refused."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kmehelpers import SECURE_ENV, KMEProcess, make_psk, secure_toml
from tunnelhelpers import (
    EchoService,
    TunnelProcess,
    echo_exchange,
    expected_echo,
    refused_or_closed_without_data,
    stop_all,
)

from hybridkex.recycle import SQLiteAuthKeyStore

pytestmark = pytest.mark.timeout(180)

SERVER, CLIENT = "server.example", "client-a"
NO_RATE_LIMIT = "\n[limits]\nhandshake_rate = 0\n"


def recycled_toml(text: str, store: Path, *, steady: bool = False) -> str:
    """A one-peer PSK configuration turned into a recycled one with that PSK as its bootstrap.

    The steady state is off unless ``steady``: then only the first connection and the first after
    each restart are full handshakes (the ones that use the store)."""
    assert text.count('mode = "psk"') == 1
    return text.replace('mode = "psk"', 'mode = "recycled"\nbootstrap = "psk"') + (
        f'\n[recycle]\nstore = "{store}"\n\n[policy]\nsteady = {str(steady).lower()}\n')


class Pair:
    def __init__(self, tmp: Path, kme: KMEProcess, pki: Path, echo: EchoService, *, steady: bool = False) -> None:
        self.tmp, self.procs, self.steady = tmp, [], steady
        psk = make_psk(tmp / "bootstrap.psk")
        self.server_store, self.client_store = tmp / "server-keys.sqlite3", tmp / "client-keys.sqlite3"
        self.server_text = recycled_toml(secure_toml(
            listen="127.0.0.1:0", target=f"127.0.0.1:{echo.port}", identity=SERVER, peer=CLIENT, peer_sae="sae-a",
            psk=psk, kme_url=kme.url_b, sae="sae-b", pki=pki, extra=NO_RATE_LIMIT), self.server_store, steady=steady)
        self.psk_client_text = ""
        self.server = self.start("server", "server", self.server_text)
        self.psk_client_text = secure_toml(
            listen="127.0.0.1:0", target=f"127.0.0.1:{self.server.port}", identity=CLIENT, peer=SERVER,
            peer_sae="sae-b", psk=psk, kme_url=kme.url_a, sae="sae-a", pki=pki)
        self.client = self.start("client", "client", recycled_toml(self.psk_client_text, self.client_store,
                                                                   steady=steady))

    def start(self, role: str, name: str, text: str) -> TunnelProcess:
        path = self.tmp / f"{name}.toml"
        path.write_text(text)
        log_dir = self.tmp / f"{name}-{len(self.procs)}"  # each process its own log
        log_dir.mkdir()
        proc = TunnelProcess(role, path, env=SECURE_ENV, log_dir=log_dir)
        self.procs.append(proc)
        return proc.started()

    def restart(self, role: str, sig: int) -> None:
        old = self.server if role == "server" else self.client
        old.send_signal(sig)
        old.wait_exit()
        old.stop()
        if role == "server":
            self.server = self.start("server", "server", self.server_text)
            # the client's target port changes with the server's restart
            self.client.stop()
            self.psk_client_text = self.psk_client_text.replace(f":{old.port}\"", f":{self.server.port}\"")
        self.client = self.start("client", "client", recycled_toml(self.psk_client_text, self.client_store,
                                                                   steady=self.steady))

    def stop(self) -> None:
        stop_all(self.procs)


@pytest.fixture
def pair(tmp_path: Path, kme: KMEProcess, pki: Path, echo: EchoService) -> Iterator[Pair]:
    p = Pair(tmp_path, kme, pki, echo)
    yield p
    p.stop()


def sessions(proc: TunnelProcess) -> list[dict[str, Any]]:
    return [r["session"] for r in proc.events("handshake_ok")]


def connect_once(pair: Pair) -> tuple[dict[str, Any], dict[str, Any]]:
    """One connection through the tunnel; the (client, server) session facts it logged."""
    n_client, n_server = len(sessions(pair.client)), len(sessions(pair.server))
    payload = os.urandom(2000)
    assert echo_exchange(pair.client.port, payload) == expected_echo(payload)
    pair.server.wait_for(lambda r: len(sessions(pair.server)) > n_server, "the server's handshake_ok")
    pair.client.wait_for(lambda r: len(sessions(pair.client)) > n_client, "the client's handshake_ok")
    return sessions(pair.client)[n_client], sessions(pair.server)[n_server]


@pytest.mark.exclusive  # timing-sensitive under load: runs alone (tests/conftest.py)
def test_bootstrap_once_then_recycled_keys_across_restarts(pair: Pair) -> None:
    used: list[str] = []
    first_c, first_s = connect_once(pair)
    assert first_c["auth"] == first_s["auth"] == "psk" and first_s["auth_key_id"] is None
    assert first_s["qkd"] == "fresh" and "QKD:256" in first_s["components"]  # recycled keys come from QKD
    for _ in range(3):
        c, s = connect_once(pair)
        assert c["auth"] == s["auth"] == "recycled", (c, s)
        assert c["auth_key_id"] == s["auth_key_id"]  # both sides agree on the key
        used.append(s["auth_key_id"])
    assert len(set(used)) == 3  # a new key every connection

    # A reload (SIGHUP) keeps the store open for handshakes in flight and goes on with the same keys.
    mark = len(pair.server.records())
    pair.server.send_signal(signal.SIGHUP)
    pair.server.wait_event("config_reloaded", start=mark)
    c, s = connect_once(pair)
    assert c["auth"] == s["auth"] == "recycled" and c["auth_key_id"] == s["auth_key_id"]
    used.append(s["auth_key_id"])

    # Restarts: orderly (SIGTERM writes what is queued) and abrupt (SIGKILL right after a connection,
    # its rotation possibly not written): never a lockout, never back to the bootstrap.
    for role, sig in (("client", signal.SIGTERM), ("server", signal.SIGTERM), ("client", signal.SIGKILL),
                      ("server", signal.SIGKILL)):
        connect_once(pair)
        pair.restart(role, sig)
        c, s = connect_once(pair)
        assert c["auth"] == s["auth"] == "recycled", (role, sig, c, s)
        assert c["auth_key_id"] == s["auth_key_id"]
        used.append(s["auth_key_id"])

    # The bootstrap PSK was retired at the first recycled success: a client with only the PSK is refused.
    psk_only = pair.start("client", "client-psk-only", pair.psk_client_text)
    assert refused_or_closed_without_data(psk_only.port)
    pair.server.wait_event("handshake_failed", outcome="auth_failed")
    pair.stop()
    for path, local, peer in ((pair.server_store, SERVER, CLIENT), (pair.client_store, CLIENT, SERVER)):
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        with SQLiteAuthKeyStore(path, read_only=True) as store:
            [summary] = store.summaries()
            # 13 connections, less at most the one each SIGKILL may have cut off before its write
            assert summary.bootstrap_retired and summary.rotations >= 13 - 2 and summary.keys <= 8
            assert store.is_spent(local, peer, bytes.fromhex(used[0]))


def test_with_the_steady_state_only_full_handshakes_use_the_store(tmp_path: Path, kme: KMEProcess, pki: Path,
                                                                   echo: EchoService) -> None:
    """Steady state on (the default): first contact bootstraps, the next connections are one TLS
    round trip each under the parent's authentication key; after a restart the full handshake is
    authenticated by a recycled key from the store, never the bootstrap again."""
    pair = Pair(tmp_path, kme, pki, echo, steady=True)
    try:
        first_c, first_s = connect_once(pair)
        assert first_c["auth"] == first_s["auth"] == "psk" and first_s["steady"] is None
        for i in range(1, 4):
            c, s = connect_once(pair)
            assert s["steady"] is not None and s["steady"]["index"] == i and s["auth"] == "psk", s
            assert c["qkd_key_ids"] == s["qkd_key_ids"] != first_s["qkd_key_ids"]
        for role, sig in (("client", signal.SIGKILL), ("server", signal.SIGKILL)):
            pair.restart(role, sig)
            c, s = connect_once(pair)
            assert s["steady"] is None and c["auth"] == s["auth"] == "recycled", (role, c, s)
            c, s = connect_once(pair)
            assert s["steady"] is not None and s["auth"] == "recycled", (role, s)
        ids = [i for r in sessions(pair.server) for i in r["qkd_key_ids"]]
        assert len(ids) == len(set(ids))
    finally:
        pair.stop()
