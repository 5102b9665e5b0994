"""Protect an existing, unmodified service with ``hybridkex tunnel``: real processes, one machine.

    python examples/tunnel_http_service.py

What it starts (everything on 127.0.0.1, in a temporary directory removed at the end):

    urllib ─HTTP─▶ tunnel client ══ hybridkex ══▶ tunnel server ─HTTP─▶ python -m http.server
                        │     (ML-KEM + X25519 + QKD,       │
                        │      then TLS 1.3)                │
                      KME A ◀═══ simulated QKD link ═══▶ KME B   (hybridkex kme: ETSI GS QKD 014,
                                                                  mutual-TLS HTTPS)

1. ``python -m http.server``: the service to protect. It knows nothing about hybridkex.
2. ``hybridkex pki init``: a throwaway CA and certificates for the KMEs and SAEs.
3. ``hybridkex kme``: two simulated KMEs sharing a simulated QKD link.
4. ``hybridkex genpsk``: the pre-shared key that authenticates the two tunnel ends.
5. ``hybridkex tunnel server`` in front of the http.server, ``hybridkex tunnel client`` next to us.
6. urllib fetches a file through the tunnel client's port, as if the service were local.

Every process is stopped and the directory removed on exit, also on Ctrl-C or an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HYBRIDKEX = [sys.executable, "-m", "hybridkex"]  # the same as the `hybridkex` command
STARTUP_TIMEOUT = 60.0  # seconds any one process may take to come up
# urllib would honour http_proxy/HTTP_PROXY from the environment: talk to 127.0.0.1 directly.
URLOPEN = urllib.request.build_opener(urllib.request.ProxyHandler({})).open


class Processes:
    """The processes this example starts; each one's output goes to a log file in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:  # the child keeps its own copy of the file descriptor
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.running.append((name, proc, log))
        print(f"started {name} (pid {proc.pid})")
        return proc, log

    def wait_for(self, proc: subprocess.Popen[bytes], log: Path, pattern: str) -> re.Match[str]:
        """Wait until the log has a line matching ``pattern`` (bounded; fails if the process exits)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            for line in log.read_text(errors="replace").splitlines():
                if m := re.search(pattern, line):
                    return m
            if proc.poll() is not None:
                raise RuntimeError(f"{log.stem} exited with status {proc.returncode}:\n{log.read_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"{log.stem} did not start within {STARTUP_TIMEOUT}s:\n{log.read_text()}")

    def stop_all(self) -> None:
        """SIGTERM (graceful stop) to each, newest first; SIGKILL whatever has not exited after 10 s."""
        for _, proc, _ in reversed(self.running):
            if proc.poll() is None:
                proc.terminate()
        for name, proc, _ in reversed(self.running):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            how = f"exit status {proc.returncode}" if proc.returncode >= 0 else signal.strsignal(-proc.returncode)
            print(f"stopped {name} (pid {proc.pid}: {how})")


def run(*args: str) -> None:
    """Run a one-shot command; raise with its output if it fails."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=STARTUP_TIMEOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")


def tunnel_config(path: Path, *, listen: str, target: str, identity: str, peer: str, peer_sae: str,
                  psk: Path, kme_url: str, sae: str, pki: Path) -> Path:
    """A tunnel configuration (docs/tunnel.md): the peer it trusts, its KME, JSON logs."""
    path.write_text(f"""\
listen = "{listen}"
target = "{target}"
identity = "{identity}"

[[peers]]
identity = "{peer}"
mode = "psk"
psk_file = "{psk}"
sae_id = "{peer_sae}"      # the peer's SAE ID at its KME

[policy]
qkd = "required"           # every connection mixes in a fresh QKD key, or fails

[kme]                      # this side's KME (ETSI GS QKD 014, mutual TLS)
url = "{kme_url}"
sae_id = "{sae}"
cert = "{pki / f"{sae}.crt"}"
key = "{pki / f"{sae}.key"}"
ca = "{pki / "ca.crt"}"

[logging]
format = "json"
""")
    return path


def json_events(log: Path, event: str) -> list[dict[str, Any]]:
    """The tunnel's JSON log records of one kind."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                out.append(record)
    return out


def demo(workdir: Path, procs: Processes) -> int:
    # 1. The service to protect: a stock http.server, serving a directory with one file in it.
    site = workdir / "site"
    site.mkdir()
    data = os.urandom(256 * 1024)
    (site / "data.bin").write_bytes(data)
    web, web_log = procs.start("python -m http.server", sys.executable, "-u", "-m", "http.server", "0",
                               "--bind", "127.0.0.1", "--directory", str(site))
    web_port = int(procs.wait_for(web, web_log, r"Serving HTTP on \S+ port (\d+)").group(1))

    # 2.-4. The PKI, the simulated KME pair and the tunnel's pre-shared key.
    pki = workdir / "pki"
    run(*HYBRIDKEX, "pki", "init", str(pki))
    kme, kme_log = procs.start("hybridkex kme", *HYBRIDKEX, "kme", "--pki", str(pki), "--port-a", "0",
                               "--port-b", "0")
    url_a = procs.wait_for(kme, kme_log, r"^KME-A (https://\S+)").group(1)
    url_b = procs.wait_for(kme, kme_log, r"^KME-B (https://\S+)").group(1)
    psk = workdir / "tunnel.psk"
    run(*HYBRIDKEX, "genpsk", str(psk))  # 32 random bytes, hex, mode 0600

    # 5. The tunnel server (SAE sae-b at KME B) in front of the service ...
    server_cfg = tunnel_config(workdir / "server.toml", listen="127.0.0.1:0", target=f"127.0.0.1:{web_port}",
                               identity="web.example", peer="laptop.example", peer_sae="sae-a", psk=psk,
                               kme_url=url_b, sae="sae-b", pki=pki)
    server, server_log = procs.start("hybridkex tunnel server", *HYBRIDKEX, "tunnel", "server",
                                     "--config", str(server_cfg))
    server_port = int(procs.wait_for(server, server_log, r'"event": ?"listening".*"address": ?"[^"]*:(\d+)"')
                      .group(1))
    # ... and the tunnel client (SAE sae-a at KME A), whose plain side listens for local applications.
    client_cfg = tunnel_config(workdir / "client.toml", listen="127.0.0.1:0", target=f"127.0.0.1:{server_port}",
                               identity="laptop.example", peer="web.example", peer_sae="sae-b", psk=psk,
                               kme_url=url_a, sae="sae-a", pki=pki)
    client, client_log = procs.start("hybridkex tunnel client", *HYBRIDKEX, "tunnel", "client",
                                     "--config", str(client_cfg))
    client_port = int(procs.wait_for(client, client_log, r'"event": ?"listening".*"address": ?"[^"]*:(\d+)"')
                      .group(1))
    print(f"\nhttp.server on 127.0.0.1:{web_port}; tunnel server on 127.0.0.1:{server_port}; "
          f"tunnel client on 127.0.0.1:{client_port}\n")

    # 6. A standard HTTP client, pointed at the tunnel client instead of the service.
    url = f"http://127.0.0.1:{client_port}/data.bin"
    with URLOPEN(url, timeout=30) as resp:
        body = resp.read()
        same = hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
        print(f"GET {url} -> {resp.status}, {len(body)} bytes, "
              f"SHA-256 {'matches' if same else 'DIFFERS FROM'} the file on disk")
        print(f"  served by      {resp.headers.get('Server')} (the unmodified service)")

    # What the tunnel server logged about that connection's handshake (never any key material).
    facts = json_events(server_log, "handshake_ok")[-1]["session"]
    print(f"  suite          {facts['suite']}")
    print(f"  components     {', '.join(facts['components'])}")
    print(f"  QKD key IDs    {', '.join(facts['qkd_key_ids'])}")
    print(f"  peer           {facts['peer_identity']} (authenticated by {facts['auth']})")
    print(f"  TLS            {facts['tls_cipher']}, key exchange group {facts['tls_group']}")

    # Plain HTTP straight to the tunnel server gets nothing: no handshake, no service.
    try:
        URLOPEN(f"http://127.0.0.1:{server_port}/data.bin", timeout=30).close()
        print("plain HTTP to the tunnel server was SERVED (unexpected)")
        return 1
    except (urllib.error.URLError, ConnectionError, OSError) as exc:
        print(f"plain HTTP straight to the tunnel server -> refused ({type(exc).__name__})")
    print()
    secured = "QKD" in facts["suite"].upper() and any(c.startswith("ML-KEM") for c in facts["components"])
    return 0 if same and secured else 1


def main() -> int:
    # Turn SIGTERM into an exception too, so `kill` cleans up like Ctrl-C (KeyboardInterrupt) does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    workdir = Path(tempfile.mkdtemp(prefix="hybridkex-tunnel-example-"))
    print(f"working directory {workdir}")
    procs = Processes(workdir)
    try:
        return demo(workdir, procs)
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    finally:
        # Cleanup must finish even if Ctrl-C is pressed again meanwhile.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"removed {workdir}")


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress shows at once
    sys.exit(main())
