"""The issue's fleet test, bounded (test_tunnel_workers_fleet_*.py): tunnel servers with 2 workers each
sharing one state, over the REAL secure channel (QKD required, a real KME, recycled authentication, the
steady state on), one tunnel client, N connections (200 by default; 2,000 with ``-m slow``).

PostgreSQL: two servers x 2 workers behind a round-robin TCP balancer written here; one worker is
SIGKILLed mid-run, later a whole server, then PostgreSQL is stopped and started again under load (one
typed line per failed handshake meanwhile, recovery without restarting a tunnel).  SQLite: one server
x 2 workers sharing one state file on this host; one worker SIGKILLed mid-run.  Either way: no
connection fails except those in flight at a killed process (or during the outage), no QKD key ID is
used twice, recycled authentication never fails (no lockout, a new key each full handshake), and
steady-state connections that land on another worker than their parent's are accepted there.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from kmehelpers import SECURE_ENV, KMEProcess, make_psk, secure_toml
from statehelpers import SEAL_KEY, raw_rows
from tunnelhelpers import (
    WAIT,
    EchoService,
    ThreadedService,
    TunnelProcess,
    echo_exchange,
    expected_echo,
    metric,
    scrape,
    stop_all,
    wait_until,
)

from hybridkex.state import open_state

SERVER, CLIENT = "server.example", "client-a"
THREADS = 4


class Balancer(ThreadedService):
    """Round-robin TCP balancer: each connection to the next backend that accepts it (a refused one is
    skipped, as a load balancer's health check would), bytes piped both ways with half-close."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self._next = itertools.count()
        self.per_backend: dict[int, int] = dict.fromkeys(backends, 0)
        super().__init__(backlog=256)

    def _serve(self, conn: socket.socket) -> None:
        start = next(self._next)
        for i in range(len(self.backends)):
            port = self.backends[(start + i) % len(self.backends)]
            try:
                upstream = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            except OSError:
                continue
            self.per_backend[port] += 1
            upstream.settimeout(None)
            conn.settimeout(None)
            t = threading.Thread(target=_pipe, args=(upstream, conn), daemon=True)
            t.start()
            _pipe(conn, upstream)
            t.join(2 * WAIT)
            upstream.close()
            break
        conn.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)


class Load:
    """THREADS threads of connections through the tunnel client, until ``total`` have finished."""

    def __init__(self, port: int, total: int, *, count_ok_only: bool = False) -> None:
        self.port, self.total, self.count_ok_only = port, total, count_ok_only
        self.results: list[tuple[float, float, bool]] = []  # (start, end, ok)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(THREADS)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while True:
            if self.done() >= self.total:
                return
            started = time.monotonic()
            payload = os.urandom(512)
            try:
                ok = echo_exchange(self.port, payload) == expected_echo(payload)
            except (OSError, AssertionError):
                ok = False
            with self.lock:
                self.results.append((started, time.monotonic(), ok))

    def done(self) -> int:
        with self.lock:
            return sum(ok for _, _, ok in self.results) if self.count_ok_only else len(self.results)

    def failed(self) -> int:
        with self.lock:
            return sum(not ok for _, _, ok in self.results)

    def join(self) -> list[tuple[float, float, bool]]:
        for t in self.threads:
            t.join(10 * WAIT)
        return self.results


class Supervised(TunnelProcess):
    def started(self) -> Supervised:
        super().started()
        self.worker_pids = list(self.wait_event("workers_ready", timeout=4 * WAIT)["workers"])
        return self

    def kill_all(self) -> None:
        """SIGKILL the supervisor and its workers: a host that died."""
        pids = {r["pid"] for r in self.events("worker_started")}
        self.proc.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(WAIT)
        # Gone when its port refuses connections: the orphaned workers are not ours to wait for, and a
        # threaded process's sockets outlive its main thread's exit.
        wait_until(lambda: _refused(self.port), "the killed server's port closed")


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
    except ConnectionRefusedError:
        return True
    return False


def _recycled(text: str) -> str:
    return text.replace('mode = "psk"', 'mode = "recycled"\nbootstrap = "psk"')




class Restartable(Protocol):
    def stop(self) -> None: ...
    def start(self) -> None: ...


def _outage(fleet: list[Supervised], client: TunnelProcess, db: Restartable) -> dict[str, Any]:
    """The state's database stopped (immediate) and started again under load, the tunnels left running:
    the connections that fail meanwhile, each server's log lines about it, and what succeeded after."""
    marks = [len(s.records()) for s in fleet]
    load = Load(client.port, 40, count_ok_only=True)
    wait_until(lambda: load.done() >= 10, "connections before the outage", timeout=20 * WAIT)
    down = time.monotonic()
    db.stop()
    # Down for longer than a pooled call waits for a connection (2 s), so calls meet the error rather
    # than ride the outage out: until connections have failed, two per thread, and a little more.
    wait_until(lambda: load.failed() >= 2 * THREADS, "connections failing during the outage", timeout=10 * WAIT)
    time.sleep(1.0)
    db.start()
    up = time.monotonic()
    results = load.join()
    after = [echo_exchange(client.port, b"after") == expected_echo(b"after") for _ in range(THREADS)]
    lines = [r for s, m in zip(fleet, marks, strict=True) for r in s.records()[m:]
             if r.get("event") in ("handshake_failed", "internal_error", "steady_refused")]
    return {"results": results, "down": down, "up": up, "after": after, "lines": lines}


def _check_outage(outage: dict[str, Any]) -> None:
    down, up = outage["down"], outage["up"]
    failed = [(s, e) for s, e, ok in outage["results"] if not ok]
    assert failed and all(e >= down for _, e in failed), (failed, down)  # none before the database stopped
    assert all(outage["after"]), outage["after"]  # back without restarting anything
    assert any(ok and s > up for s, _, ok in outage["results"]), "nothing succeeded after the restart"
    # Each failure is one typed line naming the database (URL password-free), never a traceback (every
    # record parsed as JSON) nor an internal error.
    failures = [r for r in outage["lines"] if r["event"] == "handshake_failed"]
    assert failures and not [r for r in outage["lines"] if r["event"] == "internal_error"], outage["lines"][:3]
    for r in failures:
        assert "\n" not in r["msg"], r
    unavailable = [r for r in failures if r["reason"].startswith("StateUnavailable")]
    # Besides: a steady-state identity whose parent's write the outage lost, refused here and retried by
    # the client as a full handshake.
    others = [r["reason"] for r in failures if r not in unavailable]
    assert unavailable and all(o.startswith("UnknownPSKIdentity") for o in others), others[:3]
    assert all("postgresql://" in r["reason"] and "unreachable" in r["reason"] for r in unavailable)


def run_fleet(tmp_path: Path, kme: KMEProcess, pki: Path, echo: EchoService, *, url: str, servers: int,
              total: int, restart: Restartable | None = None) -> None:
    """``restart``: after the kills, stop the state's database under load and start it again."""
    key_file = tmp_path / "state.key"
    key_file.write_text(SEAL_KEY.hex())
    key_file.chmod(0o600)
    psk = make_psk(tmp_path / "bootstrap.psk")
    procs: list[TunnelProcess] = []

    def start(cls: type[TunnelProcess], role: str, name: str, text: str) -> Any:
        (tmp_path / name).mkdir()
        path = tmp_path / name / f"{name}.toml"
        path.write_text(text)
        proc = cls(role, path, env=SECURE_ENV)
        procs.append(proc)
        return proc.started()

    try:
        fleet: list[Supervised] = []
        for n in range(servers):  # replicas: one identity, one SAE, one shared state
            text = secure_toml(listen="127.0.0.1:0", target=f"127.0.0.1:{echo.port}", identity=SERVER, peer=CLIENT,
                               peer_sae="sae-a", psk=psk, kme_url=kme.url_b, sae="sae-b", pki=pki)
            text = "workers = 2\n" + _recycled(text) + (
                f'\n[state]\nurl = "{url}"\nkey_file = "{key_file}"\npurge_every = 0.5\n'
                '\n[limits]\nhandshake_rate = 0\n'
                '\n[metrics]\nenabled = true\nlisten = "127.0.0.1:0"\n')
            fleet.append(start(Supervised, "server", f"server-{n}", text))
        balancer = Balancer([s.port for s in fleet]) if servers > 1 else None
        front = balancer.port if balancer else fleet[0].port
        text = secure_toml(listen="127.0.0.1:0", target=f"127.0.0.1:{front}", identity=CLIENT, peer=SERVER,
                           peer_sae="sae-b", psk=psk, kme_url=kme.url_a, sae="sae-a", pki=pki)
        client = start(TunnelProcess, "client", "client",
                       _recycled(text) + f'\n[recycle]\nstore = "{tmp_path / "client-keys.sqlite3"}"\n')

        load = Load(client.port, total)
        kills: list[tuple[float, float]] = []  # (signal sent, process gone)
        wait_until(lambda: load.done() >= total // 3, "a third of the connections", timeout=40 * WAIT)
        victim = fleet[0].worker_pids[0]
        sent = time.monotonic()
        os.kill(victim, signal.SIGKILL)  # one worker of one server
        # Gone when the supervisor reaped it (the main thread of a threaded process turns zombie before the
        # others have exited and its sockets are closed).
        fleet[0].wait_event("worker_exited", pid=victim)
        kills.append((sent, time.monotonic()))
        if servers > 1:
            wait_until(lambda: load.done() >= 2 * total // 3, "two thirds of the connections", timeout=40 * WAIT)
            sent = time.monotonic()
            fleet[1].kill_all()  # a whole server
            kills.append((sent, time.monotonic()))
        results = load.join()
        # The load may finish before the killed worker's replacement is up (about 2 s to start).
        wait_until(lambda: metric(scrape(fleet[0].metrics_port or 0), "hybridkex_tunnel_workers") == 2,
                   "the killed worker's replacement serving")
        samples = scrape(fleet[0].metrics_port or 0)  # the supervisor's sum over its workers, dead ones too
        logged = len(fleet[0].events("handshake_ok"))  # as many as the scrape saw (the outage's come later)
        outage = _outage(fleet[:1], client, restart) if restart else None
        # The servers purge the state themselves ([state] purge_every): an expired row goes, without the CLI.
        with open_state(url, seal_key=SEAL_KEY) as state:
            state.put_ticket("expired", b"row", b"x", expires_at=time.time() - 1)
        wait_until(lambda: ("expired", b"row") not in raw_rows(url, "state_tickets"), "the servers' own purge")
        purged = [r for p in fleet for r in p.events("state_purged")]
    finally:
        stop_all(procs)
        if servers > 1:
            balancer.close()

    assert len(results) >= total
    if outage:
        _check_outage(outage)
    assert purged and {r["worker"] for r in purged} == {1}, purged  # the first worker purges; the others never
    failed = [(s, e) for s, e, ok in results if not ok]
    # Only connections in flight at a killed process may fail: they started before it was gone and
    # ended after the signal.
    for s, e in failed:
        assert any(s < gone and e >= sent for sent, gone in kills), (s, e, kills)
    # A thread may lose two: the one in flight, and one more queued in the dying worker's backlog
    # before the kernel stopped routing to it (SO_REUSEPORT); never more than that per kill.
    assert len(failed) <= 2 * THREADS * len(kills), failed

    counted = metric(samples, "hybridkex_tunnel_handshakes_total", outcome="ok")
    assert logged - THREADS <= counted <= logged + THREADS, (counted, logged)  # a killed worker's last ones
    assert metric(samples, "hybridkex_qkd_pool_keys", peer="sae-a") >= 0  # the workers' collectors ran
    assert ("hybridkex_qkd_pool_keys", (("peer", "sae-a"),)) in samples
    assert metric(samples, "hybridkex_tunnel_workers") == 2
    server_ok = [r for p in fleet for r in p.events("handshake_ok")]
    ids = [i for r in server_ok for i in r["session"]["qkd_key_ids"]]
    assert len(ids) == len(set(ids)), "a QKD key ID was used twice"
    client_ok = client.events("handshake_ok")
    client_ids = [i for r in client_ok for i in r["session"]["qkd_key_ids"]]
    assert len(client_ids) == len(set(client_ids))
    # A killed worker may die between the client's end of a handshake and its own handshake_ok line.
    assert len(set(client_ids) - set(ids)) <= THREADS * len(kills)
    assert len(client_ok) >= len(results) - len(failed)
    # Recycled authentication: no lockout, every full handshake on a new key (the bootstrap once).
    auth_failed = [r for p in fleet for r in p.events("handshake_failed") if r.get("outcome") == "auth_failed"]
    assert not auth_failed, auth_failed[:3]
    full = [r["session"] for r in sorted(server_ok, key=lambda r: r["ts"]) if r["session"]["steady"] is None]
    auths = [s["auth"] for s in full]
    # The bootstrap PSK only at first contact: the load's threads may race to it (and finish after a
    # handshake that already used a recycled key), but never later.
    assert auths[0] == "psk" and auths.count("psk") <= THREADS and "psk" not in auths[2 * THREADS:], auths
    steady = [r for r in server_ok if r["session"]["steady"] is not None]
    assert steady, "no steady-state connection at all"
    # The parents are shared sealed in the state ([state] key_file): a steady-state connection at
    # another worker or server than its full handshake's is accepted there. A refusal (retried with a
    # full handshake the application never sees) happens only where a parent's background write had
    # not landed yet, or at a killed process: a few, never one per cross-worker connection.
    refused = [r for r in client.events("handshake_retried") if r["msg"].startswith("steady-state")]
    assert len(refused) <= 2 * THREADS * (len(kills) + 1), len(refused)
    assert len(full) <= len(server_ok) // 4, (len(full), len(server_ok))  # mostly one round trip
    with open_state(url, seal_key=SEAL_KEY) as state:
        [summary] = state.auth_keys().summaries()
        server_keys = {k.key_id.hex() for k in state.auth_keys().keys(SERVER, CLIENT)}
        # bootstrap-once retires the PSK at the first recycled handshake; with the parents shared the
        # load may need none after the first few (all bootstrap), and then the PSK stays.
        assert summary.bootstrap_retired or "recycled" not in auths, auths
    # Concurrent handshakes that start while K is the newest key all use K (docs/recycle.md, "Concurrent
    # handshakes"), whichever worker or server runs them; no more than the load has in flight.
    recycled_ids = collections.Counter(s.get("auth_key_id") for s in full if s["auth"] == "recycled")
    assert None not in recycled_ids and max(recycled_ids.values(), default=0) <= THREADS, recycled_ids
    with open_state(tmp_path / "client-keys.sqlite3") as client_state:
        client_keys = {k.key_id.hex() for k in client_state.auth_keys().keys(CLIENT, SERVER)}
    assert client_keys & server_keys, (client_keys, server_keys)  # no lockout: both sides hold the next key
    by_worker: dict[int, int] = {}
    for r in server_ok:
        by_worker[r["pid"]] = by_worker.get(r["pid"], 0) + 1
    assert len(by_worker) >= 2 * servers, by_worker  # every worker of every server served


