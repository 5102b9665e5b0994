"""Fixtures for the tunnel tests: the echo service and tunnel processes, all cleaned up afterwards."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tunnelhelpers, without a package __init__

from tunnelhelpers import EchoService, TunnelProcess, tunnel_toml

Starter = Callable[..., TunnelProcess]


class Tunnels:
    """Starts tunnel processes under one directory and stops them all at teardown."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.keys = directory / "keys"
        self.keys.mkdir(exist_ok=True)
        self.procs: list[TunnelProcess] = []
        self._params: dict[Path, dict[str, Any]] = {}

    def config(self, name: str, **kw: Any) -> Path:
        path = self.dir / f"{name}.toml"
        path.write_text(tunnel_toml(keydir=self.keys, **kw))
        self._params[path] = kw
        return path

    def rewrite(self, proc: TunnelProcess, **changes: Any) -> None:
        """Rewrite a running tunnel's configuration file with some parameters changed."""
        kw = {**self._params[proc.config], **changes}
        proc.config.write_text(tunnel_toml(keydir=self.keys, **kw))

    def start(self, role: str, name: str, *, args: tuple[str, ...] = (), env: dict[str, str] | None = None,
              **kw: Any) -> TunnelProcess:
        proc = TunnelProcess(role, self.config(name, **kw), args=args, env=env)
        self.procs.append(proc)
        return proc.started()

    def pair(self, echo_port: int, *, server_extra: str = "", client_extra: str = "",
             server_peers: tuple[str, ...] = ("client-a",), client_identity: str = "client-a",
             name: str = "") -> tuple[TunnelProcess, TunnelProcess]:
        """A tunnel server in front of the echo service and a tunnel client pointing at it."""
        server = self.start("server", f"server{name}", listen="127.0.0.1:0", target=f"127.0.0.1:{echo_port}",
                            identity="server", peers=server_peers, extra=server_extra)
        client = self.client(server, client_identity, client_extra, name=f"client{name}")
        return server, client

    def client(self, server: TunnelProcess, identity: str, extra: str = "", *, name: str = "") -> TunnelProcess:
        return self.start("client", name or f"client-{identity}", listen="127.0.0.1:0",
                          target=f"127.0.0.1:{server.port}", identity=identity, peers=("server",), extra=extra)

    def stop_all(self) -> None:
        for p in self.procs:
            p.stop()


@pytest.fixture
def echo() -> Iterator[EchoService]:
    service = EchoService()
    yield service
    service.close()


@pytest.fixture
def tunnels(tmp_path: Path) -> Iterator[Tunnels]:
    t = Tunnels(tmp_path)
    yield t
    t.stop_all()
