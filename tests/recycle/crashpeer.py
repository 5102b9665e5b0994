"""A long-lived peer process for the crash tests (run by test_recycle_crash.py, not collected).

    python crashpeer.py initiator|responder STORE_PATH write-behind|sync

Runs one real handshake over loopback per command read from stdin (one JSON object a line) with the
blocking driver and its own SQLite store (grace 0: a superseded key is gone at once, so a side that
used a key before it was durable would lock the pair out), and prints one JSON result a line.  A
command may name a point at which this process kills itself with SIGKILL: before/after each message
it sends (``before-send-1`` ...), after the handshake with its rotation queued but not written
(``store:queued``, write-behind only) or inside the rotation's transaction (``store:begin`` ...: the
writer thread's, with write-behind).  ``{"flush": true}`` waits for the queued rotations and reports
the keys.

Responder: prints ``{"port": N}`` at start; each command ``{"kill": point|null}`` serves one
connection.  Initiator: prints ``{"ready": true}``; each command ``{"port": N, "kill": point|null}``
runs one handshake against that port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

from hybridkex.exceptions import HybridKEXError
from hybridkex.io import run_initiator, run_responder
from hybridkex.policy import Policy
from hybridkex.protocol import InitiatorConfig, PSKAuthenticator, ResponderConfig
from hybridkex.recycle import RecycledAuthenticator, SQLiteAuthKeyStore

INI_ID, RES_ID = "client.example", "server.example"
PSK = bytes(range(32))
TIMEOUT = 20.0

_kill_at: list[str | None] = [None]


def _maybe_die(where: str) -> None:
    if _kill_at[0] == where:
        os.kill(os.getpid(), signal.SIGKILL)


class KillSocket:
    """The socket the driver sees; dies at the scheduled point around each send (one per flight:
    handshake flights are far smaller than a loopback socket's buffer)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._sends = 0

    def send(self, data: bytes) -> int:
        self._sends += 1
        _maybe_die(f"before-send-{self._sends}")
        sent = self._sock.send(data)
        _maybe_die(f"after-send-{self._sends}")
        return sent

    def recv(self, n: int) -> bytes:
        return self._sock.recv(n)

    def fileno(self) -> int:
        return self._sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def settimeout(self, value: float | None) -> None:
        self._sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()


def _emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> int:
    role, path, writes = sys.argv[1], sys.argv[2], sys.argv[3]
    store = SQLiteAuthKeyStore(path, grace=0, write_behind=writes == "write-behind",
                               crash_hook=lambda stage: _maybe_die(f"store:{stage}"))
    local, peer = (INI_ID, RES_ID) if role == "initiator" else (RES_ID, INI_ID)
    auths = (RecycledAuthenticator(store, "bootstrap-once"), PSKAuthenticator({peer: PSK}))
    policy = Policy(qkd="disabled")
    server = None
    if role == "responder":
        res_cfg = ResponderConfig(RES_ID, auths, policy)
        server = socket.create_server(("127.0.0.1", 0))
        server.settimeout(TIMEOUT)
        _emit({"port": server.getsockname()[1]})
    else:
        ini_cfg = InitiatorConfig(INI_ID, auths, policy, peer_identity=RES_ID)
        _emit({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            store.close()
            return 0
        if cmd.get("flush"):
            store.flush()
            _emit({"keys": [k.key_id.hex() for k in store.keys(local, peer)]})
            continue
        _kill_at[0] = cmd.get("kill")
        result: dict[str, object] = {"ok": False}
        try:
            if server is not None:
                conn, _ = server.accept()
                with conn:
                    session = run_responder(KillSocket(conn), res_cfg, timeout=TIMEOUT)  # type: ignore[arg-type]
            else:
                with socket.create_connection(("127.0.0.1", cmd["port"]), timeout=TIMEOUT) as conn:
                    session = run_initiator(KillSocket(conn), ini_cfg, timeout=TIMEOUT)  # type: ignore[arg-type]
            used = session.info.auth_key_id
            result = {"ok": True, "mode": session.info.auth_mode, "used": used,
                      "new": session.next_auth_key_id().hex(),
                      "used_spent": used is not None and store.is_spent(local, peer, bytes.fromhex(used))}
            session.erase()
            if str(_kill_at[0]).startswith("store:"):
                store.flush()  # the writer reaches the point now, while this command's kill is armed
        except (HybridKEXError, OSError) as exc:
            result["error"] = type(exc).__name__
            result["detail"] = getattr(exc, "detail", "") or str(exc)
        result["keys"] = [k.key_id.hex() for k in store.keys(local, peer)]
        _emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
