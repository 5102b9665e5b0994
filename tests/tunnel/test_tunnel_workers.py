"""``hybridkex tunnel server --workers 2``: real supervisor and worker processes on 127.0.0.1 (the insecure
plain test channel, so that what is measured is the supervisor, not the handshake).

Connections are spread over both workers (each log line names its worker and PID; the test's own
local port identifies its connection in the server's ``handshake_ok``), /metrics is the sum over the
workers, a SIGKILLed worker is restarted while load continues and only connections that were at the
killed worker fail, SIGHUP reaches every worker (and a bad file none), SIGTERM drains, and nothing is
left behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kmehelpers import SECURE_ENV, free_port
from tunnelhelpers import PY, TEST_ENV, WAIT, EchoService, TunnelProcess, expected_echo, metric, scrape, wait_until

from hybridkex import cli
from hybridkex.tunnel import supervisor
from hybridkex.tunnel.logs import configure_logging

pytestmark = pytest.mark.timeout(90)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "tunnel.md"

HANDSHAKE = b"HKX-INSECURE-PLAIN/1 client-a\n"


def _toml(tmp: Path, *, peers: tuple[str, ...] = ("client-a",), workers: int = 2, echo_port: int = 9,
          extra: str = "") -> str:
    lines = ['listen = "127.0.0.1:0"', f'target = "127.0.0.1:{echo_port}"', 'identity = "server"',
             f"workers = {workers}", ""]
    for peer in peers:
        psk = tmp / f"{peer}.psk"
        if not psk.exists():
            psk.write_bytes(os.urandom(32))
            psk.chmod(0o600)
        lines += ["[[peers]]", f'identity = "{peer}"', 'mode = "psk"', f'psk_file = "{psk}"', ""]
    lines += ["[policy]", 'qkd = "disabled"', "steady = false", "", "[metrics]", "enabled = true",
              'listen = "127.0.0.1:0"', "", "[health]", "enabled = true", "", "[logging]", 'format = "json"', ""]
    return "\n".join(lines) + extra


class Supervised(TunnelProcess):
    def started(self) -> Supervised:
        super().started()
        ready = self.wait_event("workers_ready")
        self.worker_pids = list(ready["workers"])
        return self


@pytest.fixture(scope="module")
def module_echo() -> Iterator[EchoService]:
    service = EchoService()
    yield service
    service.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, module_echo: EchoService) -> Iterator[Supervised]:
    """One supervisor for the three tests below, in their order: load and SIGKILL, SIGHUP, SIGTERM last."""
    tmp = tmp_path_factory.mktemp("workers")
    cfg = tmp / "server.toml"
    cfg.write_text(_toml(tmp, echo_port=module_echo.port))
    # A TMPDIR of its own: the SIGTERM test checks that this supervisor's metrics directory is gone,
    # which supervisors started by tests on other xdist workers must not disturb.
    (tmp / "tmp").mkdir()
    proc = Supervised("server", cfg, env={"TMPDIR": str(tmp / "tmp")})
    try:
        yield proc.started()
    finally:
        proc.stop()


def exchange(port: int, payload: bytes) -> tuple[int, bool]:
    """One connection straight to the server (the test plays the tunnel client): (local port, echoed ok)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        local = s.getsockname()[1]
        try:
            s.sendall(HANDSHAKE + b"E" + payload)
            s.shutdown(socket.SHUT_WR)
            data = bytearray()
            while chunk := s.recv(65536):
                data += chunk
        except OSError:
            return local, False
    return local, bytes(data) == b"OK server\n" + expected_echo(payload)


def served_by(proc: TunnelProcess) -> dict[int, int]:
    """Local port of the test's connection -> PID of the worker that completed its handshake."""
    return {int(r["peer_addr"].rsplit(":", 1)[1]): r["pid"] for r in proc.events("handshake_ok")}


class Load:
    """Connections one after another in a few threads; each outcome with its start time and local port."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.results: list[tuple[float, int, bool]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                local, ok = exchange(self.port, os.urandom(2000))
            except OSError:
                local, ok = 0, False
            with self.lock:
                self.results.append((started, local, ok))

    def count(self) -> int:
        with self.lock:
            return len(self.results)

    def finish(self) -> list[tuple[float, int, bool]]:
        self.stop.set()
        for t in self.threads:
            t.join(WAIT)
        return self.results


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()




def test_workers_share_the_port_metrics_sum_and_a_killed_worker_is_replaced(server: Supervised) -> None:
    assert len(set(server.worker_pids)) == 2 and server.metrics_port is not None
    results = [exchange(server.port, os.urandom(1000)) for _ in range(40)]
    assert all(ok for _, ok in results)
    wait_until(lambda: len(served_by(server)) >= 40, "40 handshake_ok lines")
    by_worker = served_by(server)
    per_pid = {pid: sum(1 for local, _ in results if by_worker[local] == pid) for pid in server.worker_pids}
    assert all(n > 0 for n in per_pid.values()), per_pid  # the kernel gave each worker some

    # The relay adds a connection's bytes in batches, the last when it closes: after its log line.
    port = server.metrics_port
    wait_until(lambda: metric(scrape(port), "hybridkex_tunnel_bytes_total", direction="in") >= 40 * 1001,
               "every connection's bytes counted")
    samples = scrape(server.metrics_port)  # parsed by prometheus_client's parser
    assert metric(samples, "hybridkex_tunnel_handshakes_total", outcome="ok") == 40  # summed over both
    assert metric(samples, "hybridkex_tunnel_connections_total") == 40
    assert metric(samples, "hybridkex_tunnel_bytes_total", direction="in") == 40 * 1001  # "E" + payload
    assert metric(samples, "hybridkex_tunnel_workers") == 2
    assert metric(samples, "hybridkex_tunnel_info", role="server") == 1  # "max", not a sum

    # SIGKILL one worker under load: it is restarted, and only connections it held fail.
    load = Load(server.port)
    wait_until(lambda: load.count() >= 20, "load running")
    victim = server.worker_pids[0]
    kill_sent = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    # SIGKILL is not instant: the worker is gone (its sockets closed) when the supervisor reaped it; its main
    # thread turns zombie earlier, while the others still exit.
    server.wait_event("worker_exited", pid=victim)
    killed_at = time.monotonic()
    restarted = server.wait_for(lambda r: r.get("event") == "worker_started" and r["pid"] not in server.worker_pids,
                                "worker 1 restarted")
    assert restarted["worker"] == 1
    n = load.count()
    wait_until(lambda: load.count() >= n + 40, "40 connections after the restart")
    results_under_load = load.finish()
    failed = [(t, local) for t, local, ok in results_under_load if not ok]
    oks = [(t, local) for t, local, ok in results_under_load if ok]
    wait_until(lambda: all(local in served_by(server) for _, local in oks), "every handshake_ok logged")
    handled = served_by(server)
    survivors = {server.worker_pids[1], restarted["pid"]}
    for t, local in failed:
        assert t < killed_at, "a connection started after the kill failed"
        assert handled.get(local) not in survivors, "a connection a live worker took failed"
    # Lost: at most the one connection each load thread had in flight at the kill, plus those the
    # kernel queued at the dying worker's listening socket until it was closed (SO_REUSEPORT hashes
    # new connections to it until then; seen in CI: 5 failures with 4 threads).
    assert len([t for t, _ in failed if t < kill_sent]) <= len(load.threads), (failed, kill_sent, killed_at)
    assert {handled[local] for t, local in oks if t > killed_at} == survivors  # the new worker serves too
    assert server.events("worker_exited")[0]["exit"] == -signal.SIGKILL
    samples = scrape(server.metrics_port)
    documented = re.findall(r"^\| `(hybridkex_tunnel_\w+)` \|", DOCS.read_text().split("**With `--workers N`**")[-1],
                            re.MULTILINE)
    assert set(documented) == {"hybridkex_tunnel_workers", "hybridkex_tunnel_worker_restarts_total",
                               "hybridkex_tunnel_supervisor_reloads_total"}
    assert all(any(name == n or n.startswith(name.removesuffix("_total")) for n, _ in samples) for name in documented)
    assert metric(samples, "hybridkex_tunnel_worker_restarts_total") == 1
    assert metric(samples, "hybridkex_tunnel_workers") == 2
    assert metric(samples, "hybridkex_tunnel_active_connections") == 0  # livesum: the dead worker's are gone
    ok_total = 40 + sum(1 for *_, ok in results_under_load if ok)
    assert metric(samples, "hybridkex_tunnel_handshakes_total", outcome="ok") >= ok_total  # the dead one's kept
    server.worker_pids = [restarted["pid"], server.worker_pids[1]]  # for the tests below


def test_sighup_reaches_every_worker_and_a_bad_file_none(server: Supervised, module_echo: EchoService) -> None:
    good = server.config.read_text()
    server.config.write_text(_toml(server.config.parent, peers=("client-a", "client-b"), echo_port=module_echo.port))
    server.send_signal(signal.SIGHUP)
    for pid in server.worker_pids:
        server.wait_event("config_reloaded", pid=pid, added=["client-b"])
    mark = len(server.records())
    server.config.write_text(good.replace('identity = "server"', 'identity = 7'))
    server.send_signal(signal.SIGHUP)
    failed = server.wait_event("config_reload_failed", start=mark)
    assert "identity" in failed["msg"] and "worker" not in failed  # the supervisor's one line
    time.sleep(0.5)
    assert not [r for r in server.records()[mark:] if r.get("event") in ("config_reloaded", "config_reload_failed")
                and "worker" in r]
    samples = scrape(server.metrics_port or 0)
    assert metric(samples, "hybridkex_tunnel_supervisor_reloads_total", outcome="error") == 1
    assert metric(samples, "hybridkex_tunnel_config_reloads_total", outcome="ok") == 2
    server.config.write_text(good)


def test_sigterm_drains_every_worker_and_leaves_nothing(server: Supervised) -> None:
    private = server.config.parent / "tmp"
    before = set(private.glob("hybridkex-workers-*"))
    assert len(before) == 1  # this supervisor's, while it runs
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as s:
        s.sendall(HANDSHAKE + b"E" + b"x" * 100)
        buf = b""
        while len(buf) < len(b"OK server\n") + 100:
            buf += s.recv(65536)
        server.send_signal(signal.SIGTERM)
        server.wait_event("draining")
        s.sendall(b"y" * 100)  # the open connection is still served while the workers drain
        while len(buf) < len(b"OK server\n") + 200:
            buf += s.recv(65536)
        assert server.proc.poll() is None
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    assert server.wait_exit() == 0
    assert not [pid for pid in server.worker_pids if _alive(pid)]  # no orphaned workers
    stopped = server.events("stopped")
    assert {r.get("pid") for r in stopped if "worker" in r} == set(server.worker_pids)
    assert {str(k): v for k, v in stopped[-1]["exits"].items()} == {"1": 0, "2": 0}
    assert not list(private.glob("hybridkex-workers-*"))  # the private metrics directory is gone


def _run(tmp_path: Path, text: str, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """In this process: these errors come before any worker is started."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    code = cli.main(["tunnel", "server", "--config", str(cfg), *args])
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.mark.parametrize(("change", "args", "message"), [
    (("steady = false\n", ""), (), "workers: 2 workers need a [state] table"),
    (("", ""), ("--workers", "0"), "option --workers (workers): must be between 1 and 256, got 0"),
    (("", ""), ("--workers", "two"), "expected an integer, got 'two'"),
])
def test_configuration_errors_are_one_line(tmp_path: Path, change: tuple[str, str], args: tuple[str, ...],
                                           message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = _run(tmp_path, _toml(tmp_path).replace(*change), *args, capsys=capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_a_port_in_use_is_one_line_before_any_worker_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    for k, v in TEST_ENV.items():
        monkeypatch.setenv(k, v)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        text = _toml(tmp_path).replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
        code, lines = _run(tmp_path, text, capsys=capsys)
    assert code == 2 and len(lines) == 1, lines
    assert f"listen: cannot listen on 127.0.0.1:{port}: address already in use" in lines[0]
    assert not _children_with_worker_index()


def test_a_worker_that_cannot_start_stops_the_supervisor_with_one_line(tmp_path: Path, pki: Path) -> None:
    # The KME is down: the supervisor's configuration check passes (it contacts no KME), the first
    # worker fails to start; the others are never started, so the error is printed once.
    peer = '[[peers]]\nidentity = "client-a"\n'
    kme = (f'[kme]\nurl = "https://127.0.0.1:{free_port()}"\nsae_id = "sae-b"\ncert = "{pki / "sae-b.crt"}"\n'
           f'key = "{pki / "sae-b.key"}"\nca = "{pki / "ca.crt"}"\n\n')
    text = _toml(tmp_path).replace('qkd = "disabled"\n', "").replace(peer, peer + 'sae_id = "sae-a"\n')
    text = text.replace("[metrics]", kme + "[metrics]")
    cfg = tmp_path / "kme-down.toml"
    cfg.write_text(text.replace('format = "json"', 'format = "text"\nlevel = "warning"'))
    done = subprocess.run([PY, "-m", "hybridkex", "tunnel", "server", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **SECURE_ENV}, check=False)
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("hybridkex: error:")]
    assert done.returncode == 7 and len(errors) == 1 and "is the KME running?" in errors[0], done.stderr
    assert done.stderr.count("worker=2") == 0  # the second worker never started


def test_no_so_reuseport_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delattr(socket, "SO_REUSEPORT")
    for k, v in TEST_ENV.items():
        monkeypatch.setenv(k, v)
    cfg = tmp_path / "s.toml"
    cfg.write_text(_toml(tmp_path))
    assert cli.main(["tunnel", "server", "--config", str(cfg)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == ["hybridkex: error: workers: needs SO_REUSEPORT, which this platform lacks; run with workers = 1"]


def _children_with_worker_index() -> dict[int, str]:
    """This process's children that are tunnel workers: PID -> worker index (from their environment)."""
    out: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != os.getpid():
                continue
            env = dict(e.split("=", 1) for e in (proc / "environ").read_text().split("\0") if "=" in e)
        except (OSError, ValueError, IndexError):
            continue
        if "HYBRIDKEX_TUNNEL_WORKER" in env:
            out[int(proc.name)] = env["HYBRIDKEX_TUNNEL_WORKER"]
    return out


def test_a_worker_that_keeps_dying_makes_the_supervisor_give_up_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(supervisor, "_MAX_CRASHES", 3)  # the real 6 deaths, 0.1 s doubling, take ~4 s more
    monkeypatch.setattr(supervisor, "_BACKOFF_FIRST", 0.01)
    for k, v in TEST_ENV.items():
        monkeypatch.setenv(k, v)
    cfg = tmp_path / "s.toml"
    cfg.write_text(_toml(tmp_path).replace('format = "json"', 'format = "text"'))
    stop = threading.Event()
    killed: list[int] = []

    def killer() -> None:  # worker 2 exists only once worker 1 listened: from then on, kill worker 1
        while not stop.is_set() and not any(i == "2" for i in _children_with_worker_index().values()):
            time.sleep(0.05)
        while not stop.is_set():
            for pid, index in _children_with_worker_index().items():
                if index == "1" and pid not in killed:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    # Records go to stderr as it is now (capsys's): an earlier in-process test of this worker process
    # may have left the tunnel's handler on another stream, which configure_logging() keeps.
    configure_logging("text", "info", stream=sys.stderr)
    try:
        code = cli.main(["tunnel", "server", "--config", str(cfg)])
    finally:
        stop.set()
        thread.join(WAIT)
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("hybridkex: error:")]
    assert code == 1 and len(killed) == 3, err
    assert errors == ["hybridkex: error: tunnel worker 1 died 3 times in a row, each within 10 s of starting "
                      "(last: killed by SIGKILL); giving up, see the log above"]
    assert err.count("worker_exited") == 2  # two restarts were logged before it gave up
    assert not _children_with_worker_index()  # worker 2 was stopped too
