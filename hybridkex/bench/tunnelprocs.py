"""The processes the data-path benchmark measures: the service, the hybridkex tunnel pair (with the
simulated KME) and, when installed, an stunnel pair with TLS 1.3 external PSK.

Every process runs on 127.0.0.1, logs to a file in the run's temporary directory, and is stopped
by :meth:`Procs.close`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from ..exceptions import ConfigurationError
from ..qkd.pki import DemoPKI
from .kmeproc import KMEProcessPair

__all__ = ["Procs", "Relay", "cpu_seconds", "stunnel_binary"]

_START_TIMEOUT: Final = 60.0
_ROOT = str(Path(__file__).resolve().parents[2])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stunnel_binary() -> str | None:
    """The stunnel executable (Debian's ``stunnel4`` package installs both names), or None."""
    return shutil.which("stunnel4") or shutil.which("stunnel")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HYBRIDKEX_TESTING", "HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL")}
    # The child processes import the same hybridkex as this one, even from a source tree.
    env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigurationError(f"{what} exited at start: {log.read_text(errors='replace').strip()[-300:]}",
                                     field="bench")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise ConfigurationError(f"{what} did not listen within {_START_TIMEOUT:g} s", field="bench")


@dataclass
class Relay:
    """A way to reach the service: a port, and the processes whose CPU counts as the relay's."""

    id: str
    label: str
    port: int
    pids: tuple[int, ...] = ()

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids)


class Procs:
    """Starts and owns every process of one data-path benchmark run."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self._kme: KMEProcessPair | None = None
        self.notes: list[str] = []

    def _spawn(self, name: str, argv: list[str],
               env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
        log_path = self.dir / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed in close(); a file never blocks the child
        self._logs.append(log)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,  # noqa: S603
                                env={**_env(), **(env or {})}, cwd=self.dir)
        self._procs.append(proc)
        return proc, log_path

    def service(self) -> Relay:
        port_file = self.dir / "service.port"
        proc, log = self._spawn("service", [sys.executable, "-m", "hybridkex.bench.tunnelload", str(port_file)])
        deadline = time.monotonic() + _START_TIMEOUT
        while not port_file.is_file():
            if proc.poll() is not None or time.monotonic() > deadline:
                why = log.read_text(errors="replace").strip()[-300:]
                raise ConfigurationError(f"the benchmark service did not start: {why}", field="bench")
            time.sleep(0.02)
        return Relay("direct", "direct TCP (no tunnel)", int(port_file.read_text()))

    # -- hybridkex -------------------------------------------------------------------------------

    def _tunnel(self, role: str, text: str, name: str, env: dict[str, str] | None,
                workers: int = 1) -> tuple[list[int], int, str]:
        """Start one tunnel process; (its PIDs: the process, or the supervisor and its workers; port; event loop)."""
        cfg = self.dir / f"{name}-{role}.toml"
        cfg.write_text(text)
        proc, log = self._spawn(f"{name}-{role}",
                                [sys.executable, "-m", "hybridkex", "tunnel", role, "--config", str(cfg)], env)
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            loop = ""
            for line in log.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        continue
                    if rec.get("event") == "listening":
                        loop = str(rec.get("event_loop"))
                        if workers == 1:
                            return [proc.pid], int(str(rec["address"]).rsplit(":", 1)[1]), loop
                    if rec.get("event") == "workers_ready":
                        return ([proc.pid, *rec["workers"]], int(str(rec["address"]).rsplit(":", 1)[1]), loop)
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise ConfigurationError(f"the tunnel {role} did not start: {log.read_text(errors='replace').strip()[-400:]}",
                                 field="bench")

    def hybridkex(self, service_port: int, *, name: str = "hybridkex", label: str = "",
                  env: dict[str, str] | None = None, workers: int = 1, client_workers: int = 1) -> Relay:
        """The tunnel pair (QKD required, simulated KME process, bootstrap PSK), as users run it; with
        ``workers`` > 1 the server runs that many worker processes sharing an SQLite ``[state]``, with
        ``client_workers`` > 1 the client that many (each its own session with the server; no state)."""
        if self._kme is None:
            self._kme = KMEProcessPair(DemoPKI.create(self.dir / "pki"))
        kme = self._kme
        pki = kme.pki
        psk = self.dir / f"{name}.psk"
        fd = os.open(psk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))

        def toml(*, target: str, identity: str, peer: str, peer_sae: str, kme_url: str, sae: str) -> str:
            return "\n".join([
                'listen = "127.0.0.1:0"', f'target = "{target}"', f'identity = "{identity}"', "",
                "[[peers]]", f'identity = "{peer}"', 'mode = "psk"', f'psk_file = "{psk}"', f'sae_id = "{peer_sae}"',
                "", "[policy]", 'qkd = "required"', "", "[limits]", "handshake_rate = 0", "",
                "[kme]", f'url = "{kme_url}"', f'sae_id = "{sae}"', f'cert = "{pki.cert(sae)}"',
                f'key = "{pki.key(sae)}"', f'ca = "{pki.ca_cert}"', "",
                "[logging]", 'format = "json"', ""])

        server = toml(target=f"127.0.0.1:{service_port}", identity="server.bench", peer="client.bench",
                      peer_sae="sae-a", kme_url=kme.url_b, sae="sae-b")
        if workers > 1:  # the workers share their steady-state anti-replay in one SQLite file
            server = f"workers = {workers}\n" + server + f'\n[state]\nurl = "{self.dir / (name + "-state.sqlite3")}"\n'
        spids, sport, loop = self._tunnel("server", server, name, env, workers)
        client = toml(target=f"127.0.0.1:{sport}", identity="client.bench", peer="server.bench", peer_sae="sae-b",
                      kme_url=kme.url_a, sae="sae-a")
        if client_workers > 1:
            client = f"workers = {client_workers}\n" + client
        cpids, cport, _ = self._tunnel("client", client, name, env, client_workers)
        return Relay(name, f"{label or 'hybridkex tunnel pair (QKD required)'}, {loop} event loop", cport,
                     (*cpids, *spids))

    # -- stunnel ---------------------------------------------------------------------------------

    def stunnel(self, service_port: int) -> Relay | None:
        """An stunnel client/server pair with TLS 1.3 external PSK, or None (and a note) when absent."""
        binary = stunnel_binary()
        if binary is None:
            self.notes.append("stunnel is not installed (Debian: apt-get install stunnel4): no stunnel baseline")
            return None
        secrets_file = self.dir / "stunnel.psk"
        fd = os.open(secrets_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"bench:{secrets.token_hex(32)}\n")
        sport, cport = _free_port(), _free_port()
        # stunnel's PSK callbacks are OpenSSL's TLS 1.2-style ones, which TLS 1.3 can use only with a
        # SHA-256 suite.
        common = ["foreground = yes", "pid =", "debug = 6", "sslVersionMin = TLSv1.3",
                  "ciphersuites = TLS_AES_128_GCM_SHA256", f"PSKsecrets = {secrets_file}", "socket = l:TCP_NODELAY=1",
                  "socket = r:TCP_NODELAY=1"]
        pids = []
        for role, accept, connect, extra in (("server", sport, service_port, []),
                                             ("client", cport, sport, ["client = yes", "PSKidentity = bench"])):
            conf = self.dir / f"stunnel-{role}.conf"
            conf.write_text("\n".join([*common, f"[{role}]", f"accept = 127.0.0.1:{accept}",
                                       f"connect = 127.0.0.1:{connect}", *extra]) + "\n")
            proc, log = self._spawn(f"stunnel-{role}", [binary, str(conf)])
            _wait_port(accept, proc, f"stunnel {role}", log)
            pids.append(proc.pid)
        version = subprocess.run([binary, "-version"], capture_output=True, text=True,  # noqa: S603
                                 timeout=10, check=False)
        first = next((ln for ln in (version.stdout + version.stderr).splitlines() if ln.startswith("stunnel")), "")
        self.stunnel_version = first.strip()
        return Relay("stunnel", "stunnel pair (TLS 1.3 external PSK)", cport, (pids[1], pids[0]))

    def stunnel_protocol(self) -> str:
        """What the stunnel server's log says was negotiated (e.g. ``TLSv1.3 ciphersuite: ...``)."""
        log = self.dir / "stunnel-server.log"
        for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
            if " ciphersuite: " in line and "LOG" in line:
                return line.split("]: ", 1)[-1].strip()
        return "?"

    stunnel_version = ""

    def close(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self._procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._kme is not None:
            self._kme.stop()
        for log in self._logs:
            log.close()
