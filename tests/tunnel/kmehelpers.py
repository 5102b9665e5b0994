"""A real `hybridkex kme` process (that tests may stop, resume or kill) and secure tunnel configurations.

Everything listens on 127.0.0.1; every process started here is ended by the fixture that owns it.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path

from tunnelhelpers import PY, WAIT, TunnelProcess

#: Switches the insecure plain test channel OFF (TunnelProcess defaults to it).
SECURE_ENV = {"HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL": "", "HYBRIDKEX_TESTING": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_pki(directory: Path, *extra_saes: str) -> Path:
    subprocess.run([PY, "-m", "hybridkex", "pki", "init", str(directory)], check=True, capture_output=True,
                   timeout=60)
    for sae in extra_saes:
        subprocess.run([PY, "-m", "hybridkex", "pki", "issue", str(directory), sae], check=True, capture_output=True,
                       timeout=60)
    return directory


def make_psk(path: Path) -> Path:
    subprocess.run([PY, "-m", "hybridkex", "genpsk", str(path)], check=True, capture_output=True, timeout=60)
    return path


class KMEProcess:
    """``hybridkex kme`` on fixed ports (so a restart comes back at the same URLs): KME A, KME B."""

    def __init__(self, pki: Path, *, args: Iterable[str] = ()) -> None:
        self.pki = pki
        self.port_a, self.port_b = free_port(), free_port()
        self.args = list(args)
        self.proc: subprocess.Popen[str] | None = None
        self.url_a = self.url_b = ""
        self.start()

    def start(self) -> None:
        log = open(self.pki / "kme.log", "ab")  # noqa: SIM115 - owned by the process; a file never blocks it
        self.proc = subprocess.Popen(
            [PY, "-m", "hybridkex", "kme", "--pki", str(self.pki), "--port-a", str(self.port_a), "--port-b",
             str(self.port_b), "--log-level", "warning", *self.args],
            stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        urls: dict[str, str] = {}
        assert self.proc.stdout is not None
        while len(urls) < 2:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"hybridkex kme exited: {(self.pki / 'kme.log').read_text()}")
            if m := re.match(r"(KME-[AB]) (https://\S+)", line):
                urls[m.group(1)] = m.group(2)
        self.url_a, self.url_b = urls["KME-A"], urls["KME-B"]

    def pause(self) -> None:
        """SIGSTOP: the KME keeps its sockets but answers nothing (requests time out)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: connections are refused from now on."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def secure_toml(*, listen: str, target: str, identity: str, peer: str, peer_sae: str, psk: Path, kme_url: str,
                sae: str, pki: Path, extra: str = "") -> str:
    """One PSK peer, QKD required, the KME at ``kme_url``, JSON logs; ``extra`` appends tables."""
    return "\n".join([
        f'listen = "{listen}"', f'target = "{target}"', f'identity = "{identity}"', "",
        "[[peers]]", f'identity = "{peer}"', 'mode = "psk"', f'psk_file = "{psk}"', f'sae_id = "{peer_sae}"', "",
        "[kme]", f'url = "{kme_url}"', f'sae_id = "{sae}"', f'cert = "{pki / (sae + ".crt")}"',
        f'key = "{pki / (sae + ".key")}"', f'ca = "{pki / "ca.crt"}"', "",
        "[logging]", 'format = "json"', "",
    ]) + extra + "\n"


def start_secure(role: str, path: Path, text: str, procs: list[TunnelProcess]) -> TunnelProcess:
    """Write ``text`` to ``path`` and start a tunnel over the REAL secure channel; waits for ``listening``."""
    path.write_text(text)
    proc = TunnelProcess(role, path, env=SECURE_ENV)
    procs.append(proc)
    return proc.started()
