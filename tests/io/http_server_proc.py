"""A hybridkex HTTP server in its own process, for test_io_socketserver.py.

Reads a JSON config from stdin (the bootstrap PSK in hex: kept off the command line), serves the
given directory with http.server.SimpleHTTPRequestHandler over HybridHTTPServer on 127.0.0.1,
prints "PORT <n>" once listening, and exits when stdin reaches EOF.  QKD is disabled: the in-memory
QKD link cannot span processes (ML-KEM + X25519 still go into the PSK).
"""

from __future__ import annotations

import functools
import http.server
import json
import sys
import threading

from hybridkex import Policy
from hybridkex.api import HybridHTTPServer, ServerConfig
from hybridkex.protocol import PSKAuthenticator, ResponderConfig


def main() -> int:
    cfg = json.loads(sys.stdin.readline())
    responder = ResponderConfig(cfg["identity"], [PSKAuthenticator({cfg["peer"]: bytes.fromhex(cfg["psk"])})],
                                Policy(qkd="disabled"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=cfg["directory"])
    with HybridHTTPServer(("127.0.0.1", 0), handler, ServerConfig(responder, timeout=5.0)) as httpd:
        print(f"PORT {httpd.server_address[1]}", flush=True)
        t = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
        t.start()
        sys.stdin.read()  # until the test closes our stdin
        httpd.shutdown()
        t.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
