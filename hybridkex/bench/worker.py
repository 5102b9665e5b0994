"""The client worker process: ``python -m hybridkex.bench.worker`` (started by the benchmark).

Reads one JSON request per line on stdin, answers one JSON line on stdout:

* ``{"op": "latency", "variant", "spec", "address", "count"}``: that many sequential handshakes;
  answers the client-side wall time of each (TCP connect to verified TLS session), in ms;
* ``{"op": "throughput", "variant", "spec", "address", "clients", "seconds"}``: ``clients``
  threads doing handshakes back to back for ``seconds``; answers the count and the elapsed time;
* ``{"op": "hold", "variant", "spec", "address"}``: one connection, kept open until
  ``{"op": "release"}`` (the counting proxy reads the setup's bytes meanwhile);
* ``{"op": "ping"}`` and ``{"op": "exit"}``.

Clients are built once per variant and reused, like a long-running client process would.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from typing import Any

from .endpoints import ClientKit, ClientSpec

_kits: dict[str, ClientKit] = {}


def _kit(msg: dict[str, Any]) -> ClientKit:
    kit = _kits.get(msg["variant"])
    if kit is None:
        kit = _kits[msg["variant"]] = ClientKit(ClientSpec.from_json(msg["spec"]))
    return kit


def _one(kit: ClientKit, address: tuple[str, int]) -> float:
    """One connection: TCP connect to a verified TLS session, client-side wall time in ms."""
    t0 = time.perf_counter()
    conn = kit.connect(address)
    elapsed = (time.perf_counter() - t0) * 1e3
    with contextlib.suppress(Exception):
        conn.close()
    return elapsed


def _latency(msg: dict[str, Any]) -> dict[str, Any]:
    kit = _kit(msg)
    address = (msg["address"][0], int(msg["address"][1]))
    samples: list[float] = []
    errors = 0
    last = ""
    for _ in range(int(msg["count"])):
        try:
            samples.append(_one(kit, address))
        except Exception as exc:  # counted and reported; the run goes on
            errors += 1
            last = f"{type(exc).__name__}: {exc}"
    return {"samples_ms": samples, "errors": errors, "last_error": last}


_held: list[Any] = []


def _hold(msg: dict[str, Any]) -> dict[str, Any]:
    """One connection set up and kept open until ``release``."""
    _held.append(_kit(msg).connect((msg["address"][0], int(msg["address"][1]))))
    return {"ok": True}


def _release() -> dict[str, Any]:
    while _held:
        with contextlib.suppress(Exception):
            _held.pop().close()
    return {"ok": True}


def _throughput(msg: dict[str, Any]) -> dict[str, Any]:
    kit = _kit(msg)
    address = (msg["address"][0], int(msg["address"][1]))
    clients, seconds = int(msg["clients"]), float(msg["seconds"])
    counts = [0] * clients
    errors = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def run(i: int) -> None:
        start.wait()
        while time.perf_counter() < stop_at[0]:
            try:
                _one(kit, address)
                counts[i] += 1
            except Exception:
                errors[i] += 1

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join(seconds + 60)
    return {"handshakes": sum(counts), "elapsed_s": time.perf_counter() - t0, "errors": sum(errors)}


def main() -> int:
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg.get("op")
        if op == "exit":
            break
        try:
            if op == "ping":
                answer: dict[str, Any] = {"ok": True}
            elif op == "latency":
                answer = _latency(msg)
            elif op == "throughput":
                answer = _throughput(msg)
            elif op == "hold":
                answer = _hold(msg)
            elif op == "release":
                answer = _release()
            else:
                answer = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # reported to the benchmark process as one line
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    _release()
    for kit in _kits.values():
        kit.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
