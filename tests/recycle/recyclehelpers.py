"""Shared pieces of the recycled-authentication tests: a pair of peers, each with its own SQLite
store, running real handshakes in memory (the protocol tests' ConnectionPair) or over loopback."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from protocol.helpers import (  # tests/ is on the path (pyproject's pythonpath); protocol is a package
    INI_ID,
    PSK,
    RES_ID,
    ConnectionPair,
    DeterministicRandom,
    Outcome,
    QKDPair,
    clock,
    configs,
    split_frames,
)

from hybridkex.exceptions import HybridKEXError
from hybridkex.io import run_initiator, run_responder
from hybridkex.protocol import (
    NEED_DATA,
    HandshakeComplete,
    Initiator,
    InitiatorConfig,
    PSKAuthenticator,
    QKDKeysByIdRequired,
    QKDKeysRequired,
    Responder,
    ResponderConfig,
    Session,
)
from hybridkex.recycle import RecycledAuthenticator, RecyclePolicy, SQLiteAuthKeyStore

__all__ = ["INI_ID", "PSK", "RES_ID", "ConnectionPair", "DeterministicRandom", "Initiator", "Peers", "QKDPair",
           "Responder", "clock", "feed", "loopback_pair", "recycled_configs", "split_frames"]


def recycled_configs(ini_store: SQLiteAuthKeyStore | None, res_store: SQLiteAuthKeyStore | None, *,
                     policy: str = "bootstrap-once", ini_psk: bytes | None = PSK, res_psk: bytes | None = PSK,
                     qkd: str = "required", ini_policy: str | None = None,
                     res_policy: str | None = None) -> tuple[InitiatorConfig, ResponderConfig]:
    """Matching configurations: the recycled authenticator first, then (unless None) the bootstrap PSK."""
    ini, res = configs(qkd=qkd)
    ini_auths: list[Any] = []
    res_auths: list[Any] = []
    if ini_store is not None:
        ini_auths.append(RecycledAuthenticator(ini_store, RecyclePolicy(ini_policy or policy)))  # type: ignore[arg-type]
    if res_store is not None:
        res_auths.append(RecycledAuthenticator(res_store, RecyclePolicy(res_policy or policy)))  # type: ignore[arg-type]
    if ini_psk is not None:
        ini_auths.append(PSKAuthenticator({RES_ID: ini_psk}))
    if res_psk is not None:
        res_auths.append(PSKAuthenticator({INI_ID: res_psk}))
    return replace(ini, authenticators=tuple(ini_auths)), replace(res, authenticators=tuple(res_auths))


class SkewedClock:
    """The stores' wall clock plus ``skew`` seconds (to step past the grace period without sleeping)."""

    def __init__(self) -> None:
        self.skew = 0.0

    def __call__(self) -> float:
        return time.time() + self.skew


@dataclass
class Peers:
    """Two peers with a store each; :meth:`handshake` runs one real handshake in memory and records
    the rotations as the blocking driver would (initiator first: it rotates once its Finished is sent)."""

    ini_store: SQLiteAuthKeyStore
    res_store: SQLiteAuthKeyStore
    qkd: QKDPair
    policy: str = "bootstrap-once"
    seed: int = 1
    clock: SkewedClock | None = None

    @classmethod
    def create(cls, tmp: Path, *, policy: str = "bootstrap-once", max_keys: int = 8, grace: float = 60.0) -> Peers:
        now = SkewedClock()
        return cls(SQLiteAuthKeyStore(tmp / "initiator.sqlite3", max_keys=max_keys, grace=grace, clock=now),
                   SQLiteAuthKeyStore(tmp / "responder.sqlite3", max_keys=max_keys, grace=grace, clock=now),
                   QKDPair.create(), policy, clock=now)

    def close(self) -> None:
        self.ini_store.close()
        self.res_store.close()

    def configs(self, **kwargs: Any) -> tuple[InitiatorConfig, ResponderConfig]:
        kwargs.setdefault("policy", self.policy)
        return recycled_configs(self.ini_store, self.res_store, **kwargs)

    def handshake(self, ini_cfg: InitiatorConfig | None = None, res_cfg: ResponderConfig | None = None, *,
                  record: bool = True, **run_kwargs: Any) -> Outcome:
        if ini_cfg is None or res_cfg is None:
            i, r = self.configs()
            ini_cfg, res_cfg = ini_cfg or i, res_cfg or r
        self.seed += 2
        out = ConnectionPair.create(ini_cfg, res_cfg, self.qkd, seed=self.seed).run(**run_kwargs)
        if record:
            if out.ini_session is not None:
                for a in ini_cfg.authenticators:
                    a.after_handshake(out.ini_session)
            if out.res_session is not None:
                for a in res_cfg.authenticators:
                    a.after_handshake(out.res_session)
        return out

    def key_ids(self, side: str) -> list[bytes]:
        store, local, peer = ((self.ini_store, INI_ID, RES_ID) if side == "initiator"
                              else (self.res_store, RES_ID, INI_ID))
        return [k.key_id for k in store.keys(local, peer)]


def loopback_pair(ini_cfg: InitiatorConfig, res_cfg: ResponderConfig, qkd: QKDPair | None = None, *,
                  timeout: float = 20.0) -> tuple[Session | BaseException, Session | BaseException]:
    """One handshake over a real loopback TCP connection with the blocking driver (rotations included)."""
    results: dict[str, Session | BaseException] = {}
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(timeout)
        port = server.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = server.accept()
                with conn:
                    results["res"] = run_responder(conn, res_cfg, qkd.res if qkd else None, timeout=timeout)
            except BaseException as exc:  # reported to the test
                results["res"] = exc

        t = threading.Thread(target=serve)
        t.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
                results["ini"] = run_initiator(sock, ini_cfg, qkd.ini if qkd else None, timeout=timeout)
        except BaseException as exc:
            results["ini"] = exc
        t.join(timeout + 5)
    return results["ini"], results.get("res", TimeoutError("responder thread did not finish"))




def feed(conn: Initiator | Responder, data: bytes, qkd: QKDPair | None = None,
         ) -> tuple[list[bytes], Session | HybridKEXError | None]:
    """Feed recorded (or forged) bytes to one side, answering its QKD requests: (frames it sent, result)."""
    result: Session | HybridKEXError | None = None
    try:
        if data:
            conn.receive_data(data)
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, QKDKeysRequired | QKDKeysByIdRequired):
                assert qkd is not None
                manager = qkd.ini if isinstance(conn, Initiator) else qkd.res
                conn.provide_qkd_keys(manager.answer(event))
            elif isinstance(event, HandshakeComplete):
                result = event.session
                break
    except HybridKEXError as exc:
        result = exc
    return split_frames(conn.data_to_send()), result
