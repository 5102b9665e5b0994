"""Two tunnel servers sharing one PostgreSQL (``[state]``), end to end over the REAL secure channel with
a real KME: a recycled client authenticated by its bootstrap PSK at one server is authenticated by a
recycled key at the other, whichever it reaches next; the PSK, retired at one, is refused by both."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kmehelpers import SECURE_ENV, KMEProcess, make_psk, secure_toml
from statehelpers import PG, SEAL_KEY, pg_session
from tunnelhelpers import (
    EchoService,
    TunnelProcess,
    echo_exchange,
    expected_echo,
    refused_or_closed_without_data,
    stop_all,
)

from hybridkex.state import open_state

pytestmark = pytest.mark.timeout(240)

SERVER, CLIENT = "server.example", "client-a"


@pytest.fixture(scope="module")
def pg() -> Iterator[PG]:
    yield from pg_session()


def _recycled(text: str, tail: str) -> str:
    return text.replace('mode = "psk"', 'mode = "recycled"\nbootstrap = "psk"') + tail + (
        '\n[policy]\nsteady = false\n\n[limits]\nhandshake_rate = 0\n')  # every connection a full handshake


def _sessions(proc: TunnelProcess) -> list[dict[str, Any]]:
    return [r["session"] for r in proc.events("handshake_ok")]


def _connect(client: TunnelProcess, server: TunnelProcess) -> tuple[dict[str, Any], dict[str, Any]]:
    n_client, n_server = len(_sessions(client)), len(_sessions(server))
    payload = os.urandom(1000)
    assert echo_exchange(client.port, payload) == expected_echo(payload)
    server.wait_for(lambda r: len(_sessions(server)) > n_server, "the server's handshake_ok")
    client.wait_for(lambda r: len(_sessions(client)) > n_client, "the client's handshake_ok")
    return _sessions(client)[n_client], _sessions(server)[n_server]


def test_two_servers_share_the_recycled_keys_in_postgresql(tmp_path: Path, kme: KMEProcess, pki: Path,
                                                          echo: EchoService, pg: PG) -> None:
    url = pg.new_url()
    key_file = tmp_path / "state.key"
    key_file.write_text(SEAL_KEY.hex())
    key_file.chmod(0o600)
    psk = make_psk(tmp_path / "bootstrap.psk")
    procs: list[TunnelProcess] = []

    def start(role: str, name: str, text: str) -> TunnelProcess:
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        log_dir = tmp_path / f"{name}-{len(procs)}"
        log_dir.mkdir()
        proc = TunnelProcess(role, path, env=SECURE_ENV, log_dir=log_dir)
        procs.append(proc)
        return proc.started()

    def client_for(server: TunnelProcess, name: str, *, recycled: bool = True) -> TunnelProcess:
        text = secure_toml(listen="127.0.0.1:0", target=f"127.0.0.1:{server.port}", identity=CLIENT, peer=SERVER,
                           peer_sae="sae-b", psk=psk, kme_url=kme.url_a, sae="sae-a", pki=pki)
        if recycled:
            text = _recycled(text, f'\n[recycle]\nstore = "{tmp_path / "client-keys.sqlite3"}"\n')
        return start("client", name, text)

    try:
        servers = []
        for name in ("server-1", "server-2"):  # two replicas: one identity, one SAE, one shared state
            text = secure_toml(listen="127.0.0.1:0", target=f"127.0.0.1:{echo.port}", identity=SERVER, peer=CLIENT,
                               peer_sae="sae-a", psk=psk, kme_url=kme.url_b, sae="sae-b", pki=pki)
            shared = f'\n[state]\nurl = "{url}"\nkey_file = "{key_file}"\n'
            servers.append(start("server", name, _recycled(text, shared)))
        modes, used = [], []
        for n, target in enumerate([0, 0, 1, 1, 0, 1]):
            client = client_for(servers[target], f"client-{n}")
            c, s = _connect(client, servers[target])
            assert c["auth"] == s["auth"], (c, s)
            assert c["auth_key_id"] == s["auth_key_id"]
            modes.append(s["auth"])
            used.append(s["auth_key_id"])
            client.stop()
        assert modes == ["psk"] + ["recycled"] * 5  # the second server knew the keys the first rotated
        assert len(set(used[1:])) == 5  # a new key every connection, whichever server rotated it
        # The bootstrap was retired at server 1 (first recycled success); server 2 refuses it too.
        psk_only = client_for(servers[1], "client-psk-only", recycled=False)
        assert refused_or_closed_without_data(psk_only.port)
        servers[1].wait_event("handshake_failed", outcome="auth_failed")
    finally:
        stop_all(procs)
    with open_state(url, seal_key=SEAL_KEY) as state:
        [summary] = state.auth_keys().summaries()
        assert summary.rotations == 6 and summary.bootstrap_retired
