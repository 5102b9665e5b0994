"""``hybridkex demo``: protect a TCP service with the tunnel, on this machine, with no setup.

It creates a temporary PKI, starts the simulated ETSI GS QKD 014 KME pair (two mutual-TLS HTTPS
endpoints sharing a simulated QKD link), a small echo service, a tunnel server in front of it and a
tunnel client, sends data through, and explains what was established.  Everything runs on
127.0.0.1 and is removed on exit (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..suites import DEFAULT_SUITE, get_suite
from .linkopts import add_link_options, link_settings

HELP = "run the quantum-safe tunnel end to end on this machine (simulated QKD, no setup) and explain it"

PAYLOAD_BYTES = 64 * 1024
OK, CORRUPTED = "intact", "CORRUPTED"


def _why(exc: BaseException) -> str:
    """One line, no secrets: the typed error and its message (hybridkex errors carry no key material)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default=DEFAULT_SUITE.name, help="hybrid suite to use (default: %(default)s)")
    parser.add_argument("--connections", type=int, default=2, metavar="N",
                        help="connections to open through the tunnel (default: %(default)s; 1..20)")
    parser.add_argument("--verbose", action="store_true", help="show the tunnels' log lines")
    add_link_options(parser, default_speedup=0.0)


class _Stages:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.rows.append((name, (time.perf_counter() - t0) * 1000))


def _tunnel_toml(path: Path, *, listen: str, target: str, identity: str, peer: str, peer_sae: str,
                 psk: Path, kme_url: str, sae: str, pki: Path, suite: str) -> Path:
    path.write_text("\n".join([
        f'listen = "{listen}"', f'target = "{target}"', f'identity = "{identity}"', "",
        "[[peers]]", f'identity = "{peer}"', 'mode = "psk"', f'psk_file = "{psk}"', f'sae_id = "{peer_sae}"', "",
        "[policy]", f'suites = ["{suite}"]', 'qkd = "required"', "",
        "[kme]", f'url = "{kme_url}"', f'sae_id = "{sae}"', f'cert = "{pki / (sae + ".crt")}"',
        f'key = "{pki / (sae + ".key")}"', f'ca = "{pki / "ca.crt"}"', "",
    ]) + "\n")
    return path


async def _echo_service() -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _exchange(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()  # half-close: the service echoes everything, then closes
        return await asyncio.wait_for(reader.read(-1), 30)
    finally:
        writer.close()


async def _run(args: argparse.Namespace, workdir: Path, stages: _Stages) -> dict[str, Any]:
    from ..qkd import DemoPKI, SimulatedKMEPair  # noqa: PLC0415 - heavy imports only when the demo runs
    from ..qkd.kme import KMEPairSettings  # noqa: PLC0415
    from ..tunnel import load_config, make_runtime  # noqa: PLC0415
    from ..tunnel.secure import HybridChannelFactory, HybridStream  # noqa: PLC0415

    suite = get_suite(args.suite)
    captured: list[HybridStream] = []
    # Handshake outcomes as each side saw them, so a connection whose handshake failed is reported as
    # failed (with why) rather than as data that did not come back.
    connected: list[bool] = []
    failures: list[str] = []

    class RecordingFactory(HybridChannelFactory):
        """The production factory; it only remembers sessions and handshake failures for the report."""

        async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                         peer_addr: str) -> HybridStream:
            try:
                stream = await super().accept(reader, writer, peer_addr=peer_addr)
            except Exception as exc:
                failures.append(f"server: {_why(exc)}")
                raise
            captured.append(stream)
            return stream

        async def connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> HybridStream:
            try:
                stream = await super().connect(reader, writer)
            except Exception as exc:
                failures.append(f"client: {_why(exc)}")
                raise
            connected.append(True)
            return stream

    async def provider(config: Any, metrics: Any) -> HybridChannelFactory:
        return await asyncio.to_thread(RecordingFactory, config, metrics)

    with stages("temporary PKI (CA; KME, SAE certificates)"):
        pki = await asyncio.to_thread(DemoPKI.create, workdir / "pki")
    link = link_settings(args)
    what = "" if link is None else f", fed by a {link.link.distance_km:g} km decoy BB84 link"
    with stages(f"simulated KME pair (2 HTTPS endpoints, mutual TLS{what})"):
        kmes = await asyncio.to_thread(SimulatedKMEPair.start, pki, settings=KMEPairSettings(link=link))
    runtimes: list[Any] = []
    echo = None
    try:
        with stages("echo service (the TCP service to protect)"):
            echo = await _echo_service()
        echo_port = echo.sockets[0].getsockname()[1]
        psk = workdir / "client.psk"
        fd = os.open(psk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        with stages("tunnel server + client (config, KME client, key pool)"):
            server_cfg = load_config("server", _tunnel_toml(
                workdir / "server.toml", listen="127.0.0.1:0", target=f"127.0.0.1:{echo_port}",
                identity="server.demo", peer="client.demo", peer_sae="sae-a", psk=psk, kme_url=kmes.url_b,
                sae="sae-b", pki=pki.directory, suite=suite.name))
            server = make_runtime(server_cfg, provider)
            await server.start()
            runtimes.append(server)
            client_cfg = load_config("client", _tunnel_toml(
                workdir / "client.toml", listen="127.0.0.1:0",
                target=f"127.0.0.1:{server.address.port}", identity="client.demo", peer="server.demo",
                peer_sae="sae-b", psk=psk, kme_url=kmes.url_a, sae="sae-a", pki=pki.directory, suite=suite.name))
            client = make_runtime(client_cfg, provider)
            await client.start()
            runtimes.append(client)
        results: list[str] = []
        for i in range(args.connections):
            payload = os.urandom(PAYLOAD_BYTES)
            label = ("first connection: hybrid handshake + TLS 1.3" if i == 0 else
                     f"connection {i + 1}: steady state, one TLS 1.3 round trip")
            seen_connects, seen_failures = len(connected), len(failures)
            with stages(f"{label} + {PAYLOAD_BYTES // 1024} KiB echoed"):
                echoed = await _exchange(client.address.port, payload)
            if len(connected) == seen_connects:  # the tunnel client never got a secure channel
                why = failures[seen_failures:] or ["the tunnel closed the connection"]
                results.append("handshake failed (" + "; ".join(dict.fromkeys(why)) + ")")
            else:
                results.append(OK if echoed == payload else CORRUPTED)
        link_status = None if kmes.link is None else kmes.link.status_extension(kmes.kme_id_b)
        return {"link": link_status, "suite": suite, "ok": results, "sessions": [s.session for s in captured],
                "server": f"127.0.0.1:{server.address.port}", "service": f"127.0.0.1:{echo_port}",
                "client": f"127.0.0.1:{client.address.port}", "kmes": (kmes.url_a, kmes.url_b)}
    finally:
        for rt in reversed(runtimes):
            rt.request_stop()
            rt.request_stop()  # no open connections to drain: stop now
            await rt.shutdown()
        if echo is not None:
            echo.close()
            await echo.wait_closed()
        await asyncio.to_thread(kmes.stop)


def _report(facts: dict[str, Any], stages: _Stages) -> None:
    suite = facts["suite"]
    print("hybridkex demo: a TCP service protected by the quantum-safe tunnel, on this machine")
    print()
    print(f"  client -> tunnel client {facts['client']} == hybridkex ==> tunnel server {facts['server']} "
          f"-> echo service {facts['service']}")
    print(f"  QKD keys from the simulated ETSI GS QKD 014 KME pair: KME A {facts['kmes'][0]} (sae-a, client side), "
          f"KME B {facts['kmes'][1]} (sae-b, server side)")
    if facts.get("link"):
        ln = facts["link"]
        qber = "-" if ln["qber"] is None else f"{ln['qber']:.2%}"
        print(f"  QKD link         decoy BB84 over {ln['distance_km']:g} km: {ln['blocks_ok']} block(s) ok, "
              f"{ln['blocks_aborted']} aborted, QBER {qber}, {ln['secret_key_rate_bps']:.0f} bit/s at the real "
              f"pulse rate; authentication used {ln['auth_consumed_bits']} bits (bootstrap "
              f"{ln['auth_bootstrap_bits']}, then {ln['auth_reserved_bits']} reserved from blocks); "
              f"{ln['alarms']} alarm(s)")
    print()
    sessions = facts["sessions"]
    if sessions and facts["ok"][0] in (OK, CORRUPTED):  # the first connection was established
        s = sessions[0]
        info = s.info
        print("What was established (first connection):")
        print(f"  suite            {info.suite}")
        for c in info.components:
            print(f"  component        {c.name:16} {c.secret_bytes * 8}-bit secret")
        print(f"  QKD key IDs      {', '.join(info.qkd_key_ids) or '-'} ({info.qkd_usage}; "
              f"{info.master_sae_id} master, {info.slave_sae_id} slave)")
        print(f"  combiner         ETSI TS 103 744 CatKDF ({suite.kdf}); every public value and the QKD key IDs bound")
        print(f"  authentication   {info.auth_mode}, both directions, with key confirmation")
        print(f"  TLS 1.3          {s.cipher} over {s.group}, external PSK (psk_dhe_ke), no certificate")
        print(f"  peer             {info.peer_identity!r} authenticated")
        ids = [k for later in sessions for k in later.qkd_key_ids]
        steady = [later.steady for later in sessions[1:] if later.steady is not None]
        if steady:
            ahead = sum(f.prefetched for f in steady)
            print(f"  later            {len(steady)} steady-state connection(s): one TLS 1.3 round trip each, a fresh "
                  f"QKD key announced ahead ({ahead} fetched before use), authenticated by a key from the first "
                  "connection's QKD-mixed output")
        print(f"  QKD keys used    {len(ids)} across {len(sessions)} connections, {len(set(ids))} distinct: "
              "each key used once")
    ok = facts["ok"]
    if all(r == OK for r in ok):
        print(f"  data             {len(ok)} x {PAYLOAD_BYTES} bytes echoed intact")
    else:
        for i, r in enumerate(ok):
            what = f"established, {PAYLOAD_BYTES} bytes echoed {r}" if r in (OK, CORRUPTED) else f"FAILED: {r}"
            print(f"  connection {i + 1:<5} {what}")
    print()
    print("Time per stage:")
    for name, ms in stages.rows:
        print(f"  {ms:9.1f} ms  {name}")
    if not _succeeded(facts):
        return  # no security claims for connections that were not established
    print()
    print("To read this traffic later, a record-now-decrypt-later attacker must break ALL of:")
    print("  - X25519 (a large quantum computer does this), AND")
    print(f"  - {suite.pq_kem} (post-quantum: no known quantum attack), AND")
    if suite.qkd:
        print("  - the QKD key (information-theoretic on the link; stays inside the operators' secure sites), AND")
    print("  - the X25519MLKEM768 exchange TLS itself ran.")
    print("Authentication was checked during the handshake, so a later break of it exposes nothing recorded.")
    print("This demo used a simulated QKD link; with real KMEs, point [kme] in the tunnel config at them.")


def run(args: argparse.Namespace) -> int:
    from ..exceptions import ConfigurationError  # noqa: PLC0415

    if not 1 <= args.connections <= 20:
        raise ConfigurationError("must be between 1 and 20", field="--connections")
    get_suite(args.suite)  # validate before starting anything
    link_settings(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="  log: %(message)s")
    stages = _Stages()
    with tempfile.TemporaryDirectory(prefix="hybridkex-demo-") as tmp:
        facts = asyncio.run(_run(args, Path(tmp), stages))
    _report(facts, stages)
    if _succeeded(facts):
        return 0
    ok = facts["ok"]
    failed = [r for r in ok if r not in (OK, CORRUPTED)]
    if failed:
        print(f"hybridkex demo: {len(failed)} of {len(ok)} connection(s) failed: {failed[0]}", file=sys.stderr)
    else:
        print(f"hybridkex demo: data came back altered on {ok.count(CORRUPTED)} of {len(ok)} connection(s)",
              file=sys.stderr)
    return 1


def _succeeded(facts: dict[str, Any]) -> bool:
    return all(r == OK for r in facts["ok"]) and len(facts["sessions"]) == len(facts["ok"])
