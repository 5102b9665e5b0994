"""Every example runs as written (a real process) and says what it claims."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_combine_keys_example() -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLES / "combine_keys.py")], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "both sides derived the same 32-byte TLS PSK" in proc.stdout
    assert "<redacted>" in proc.stdout



def test_recycled_auth_example(tmp_path: Path) -> None:
    """A PSK bootstrap, then recycled keys that retire it; a second run is recycled throughout."""
    def run() -> list[str]:
        proc = subprocess.run([sys.executable, str(EXAMPLES / "recycled_auth.py"), str(tmp_path)],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout.splitlines()

    first = run()
    assert first[:3] == ["connection 1: authenticated by psk", "connection 2: authenticated by recycled",
                         "connection 3: authenticated by recycled"], first
    assert all("newest epoch 3, bootstrap retired" in line for line in first[3:5]), first
    assert sorted(p.name for p in tmp_path.glob("*.sqlite3")) == ["client-keys.sqlite3", "server-keys.sqlite3"]
    again = run()
    assert all(line.endswith("recycled") for line in again[:3]) and "newest epoch 6" in again[3], again

# --- the connection examples (blocking, asyncio, http.server) ------------------------------------------

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
#: The examples must not be run with the tunnel's insecure test hook (they would then prove nothing).
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL", "HYBRIDKEX_TESTING")}


def run_example(name: str, timeout: float = 60) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=timeout,
                          check=False, env=CLEAN_ENV, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def session_blocks(stdout: str) -> list[dict[str, str]]:
    """The example's per-connection fact lines ("  suite   ...", "  QKD key IDs   ...") as dicts."""
    blocks: list[dict[str, str]] = []
    for line in stdout.splitlines():
        m = re.match(r"  (suite|components|QKD key IDs|peer|TLS) {2,}(.*)$", line)
        if m:
            if m.group(1) == "suite" or not blocks:
                blocks.append({})
            blocks[-1][m.group(1)] = m.group(2)
    return blocks


def assert_hybrid_session(block: dict[str, str]) -> str:
    """One connection's facts say ML-KEM + X25519 + QKD, TLS 1.3 over X25519MLKEM768; returns the key ID."""
    assert block["suite"] == "x25519-mlkem768-qkd-hkdfsha256", block
    for part in ("QKD (256-bit)", "X25519 (256-bit)", "ML-KEM-768 (256-bit)"):
        assert part in block["components"], block
    assert re.fullmatch(UUID, block["QKD key IDs"]), block
    assert block["TLS"].startswith("TLSv1.3 ") and block["TLS"].endswith("group X25519MLKEM768"), block
    return block["QKD key IDs"]


def test_echo_blocking_example() -> None:
    out = run_example("echo_blocking.py")
    assert re.search(r"^echo server listening on 127\.0\.0\.1:\d+$", out, re.M), out
    assert out.count("echoed back intact: True") == 2 and "False" not in out, out
    blocks = session_blocks(out)
    assert len(blocks) == 2
    client_ids = [assert_hybrid_session(b) for b in blocks]
    assert all(b["peer"] == "server.example (authenticated by psk)" for b in blocks)
    # The server's view of each connection names the client and the same QKD key as the client's.
    server_ids = re.findall(rf"^server: client\.example connected from 127\.0\.0\.1, QKD key ({UUID})$", out, re.M)
    assert server_ids == client_ids
    assert len(set(client_ids)) == 2, "a QKD key was used twice"
    assert out.rstrip().endswith("server stopped; done")


def test_echo_asyncio_example() -> None:
    out = run_example("echo_asyncio.py")
    assert re.search(r"^echo server listening on 127\.0\.0\.1:\d+$", out, re.M), out
    assert sorted(re.findall(r"^client (\d): echoed back intact: True$", out, re.M)) == ["1", "2", "3"], out
    blocks = session_blocks(out)
    assert len(blocks) == 3
    ids = [assert_hybrid_session(b) for b in blocks]
    assert len(set(ids)) == 3, "a QKD key was used twice"
    assert out.rstrip().endswith("server stopped; done")


def test_http_server_example() -> None:
    out = run_example("http_server.py")
    assert "GET /hello.txt -> 200 OK, 68 bytes" in out, out
    assert "  body           Hello from http.server, over ML-KEM-768 + X25519 + QKD and TLS 1.3." in out
    # The unmodified SimpleHTTPRequestHandler subclass learned the authenticated client from the session.
    assert "  server saw     X-Authenticated-Peer: browser.example" in out
    assert re.search(rf"^  QKD key IDs    {UUID}$", out, re.M), out
    assert re.search(r"^  TLS            TLSv1\.3 \S+, key exchange group X25519MLKEM768$", out, re.M), out
    assert re.search(r"^plain http\.client GET -> refused \(\w+\)$", out, re.M), out
    assert out.rstrip().endswith("server stopped; done")


# --- the tunnel in front of a real http.server (real processes) --------------------------------------


TUNNEL_PROCESSES = {"python -m http.server", "hybridkex kme", "hybridkex tunnel server", "hybridkex tunnel client"}


def _started(out: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in re.findall(r"^started (.+) \(pid (\d+)\)$", out, re.M)}


def _assert_cleaned_up(out: str, expected: set[str]) -> None:
    started = _started(out)
    assert expected <= set(started) <= TUNNEL_PROCESSES, out
    for name, pid in started.items():
        assert re.search(rf"^stopped {re.escape(name)} \(pid {pid}: ", out, re.M), out
        with pytest.raises(ProcessLookupError):  # reaped by the example: no orphan left running
            os.kill(pid, 0)
    workdir = re.search(r"^working directory (\S+)$", out, re.M)
    assert workdir, out
    assert re.search(rf"^removed {re.escape(workdir.group(1))}$", out, re.M), out
    assert not Path(workdir.group(1)).exists()


def test_tunnel_http_service_example() -> None:
    out = run_example("tunnel_http_service.py", timeout=120)
    m = re.search(r"^GET http://127\.0\.0\.1:(\d+)/data\.bin -> 200, 262144 bytes, SHA-256 matches the file on disk$",
                  out, re.M)
    assert m, out
    ports = re.search(r"^http\.server on 127\.0\.0\.1:(\d+); tunnel server on 127\.0\.0\.1:(\d+); "
                      r"tunnel client on 127\.0\.0\.1:(\d+)$", out, re.M)
    assert ports, out
    assert m.group(1) == ports.group(3)  # urllib went to the tunnel client, not to the service
    assert len(set(ports.groups())) == 3
    assert re.search(r"^  served by      SimpleHTTP/\S+ Python/\S+ \(the unmodified service\)$", out, re.M), out
    # What the tunnel server logged about the handshake: QKD + X25519 + ML-KEM, PSK peer, PQ TLS group.
    assert "  suite          x25519-mlkem768-qkd-hkdfsha256" in out
    assert "  components     QKD:256, X25519:256, ML-KEM-768:256" in out
    assert re.search(rf"^  QKD key IDs    {UUID}$", out, re.M), out
    assert "  peer           laptop.example (authenticated by psk)" in out
    assert re.search(r"^  TLS            \S+, key exchange group X25519MLKEM768$", out, re.M), out
    assert re.search(r"^plain HTTP straight to the tunnel server -> refused \(\w+\)$", out, re.M), out
    _assert_cleaned_up(out, TUNNEL_PROCESSES)
    # The tunnel processes stopped gracefully on SIGTERM.
    for name in ("hybridkex kme", "hybridkex tunnel server", "hybridkex tunnel client"):
        assert re.search(rf"^stopped {name} \(pid \d+: exit status 0\)$", out, re.M), out


def test_tunnel_http_service_example_cleans_up_on_ctrl_c() -> None:
    # SIGINT may be inherited as ignored (a test runner started in the background); a terminal's Ctrl-C
    # is live, so restore the default disposition in the child before it starts Python.
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "tunnel_http_service.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=CLEAN_ENV, cwd=EXAMPLES.parent,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # bounded: the example exits by itself if we never interrupt it
            seen.append(line)
            if line.startswith("started hybridkex tunnel server"):
                proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers (here to the example only)
                break
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(seen) + rest
    assert proc.returncode == 130, out
    assert "\ninterrupted\n" in out
    # (The tunnel client, if the example got that far before the signal arrived, is covered too.)
    _assert_cleaned_up(out, {"python -m http.server", "hybridkex kme", "hybridkex tunnel server"})


def test_asyncio_workers_example_shares_the_steady_state_across_processes() -> None:
    """Two server processes on one port (SO_REUSEPORT) and one state: both serve, and connections
    after the first are one round trip whichever process they reach."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "asyncio_workers.py"), "2"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"(\d) of 2 processes served; (\d+) of 12 connections were one round trip", proc.stdout)
    assert m, proc.stdout
    # The kernel hashes connections to the processes: both get some (all 12 on one: p = 2**-11).
    assert int(m.group(1)) == 2, proc.stdout
    # The first is a full handshake (its parent is in the state before it completes); one more is
    # tolerated for a steady-state key a loaded machine fails to fetch in time (the client then
    # falls back to a full handshake, as it must).
    assert int(m.group(2)) >= 10, proc.stdout
    pids = set(re.findall(r"served by PID (\d+), steady", proc.stdout))
    assert len(pids) == 2, proc.stdout  # steady-state connections were accepted by both processes
